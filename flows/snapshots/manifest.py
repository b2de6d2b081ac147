"""A snapshot's manifest: the one type that builds, writes, reads and checks ``manifest.json``.

Ingest (files and built-ins) and the benchmarks build a :class:`Manifest`; the store writes
it with :meth:`Manifest.to_json` and reads it back with :meth:`Manifest.from_json`, which
refuses another format (:class:`SnapshotOutdated`, with the command that replaces it) and a
malformed manifest (a one-line ValueError naming the snapshot and the key). Everything
downstream reads attributes, never keys, so a renamed or missing field fails here, once.

Keys written, in this order: ``format``, ``id``, ``name``, ``source``, ``created``, ``kind``
("images" or "unpaired"), ``layout``, ``image_size``, ``channels``, ``pixels`` ("uint8" or
"float32"), ``preprocessing``, ``num_images``, ``counts`` ({class or domain: count}),
``split_counts`` ({"train" | "val" | "test": {class or domain: count}}), ``classes`` (names
in label order, or null), ``domains`` ({"x", "y"} names, or null), ``has_truth``,
``content_sha256`` (built-ins only), ``files``, ``quarantined``, ``shards``. Manifests of
format 3 written before this module also hold ``family_data``; it is accepted and dropped
(what it said is :meth:`Manifest.facts`' kind). Unknown keys are ignored, so that a
snapshot on a user's disk never stops loading over a key nothing reads.

Frozen dataclasses throughout: a manifest is a value, and pickles into Ray tasks and Prefect
stages as one.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gan_core.presets import DataFacts

FORMAT_VERSION = 3
SPLITS = ("train", "val", "test")
KINDS = ("images", "unpaired")
PIXEL_BYTES = {"uint8": 1, "float32": 4}
LABEL_BYTES = 8  # int64

Kind = Literal["images", "unpaired"]
Pixels = Literal["uint8", "float32"]


class SnapshotOutdated(ValueError):
    """A snapshot written in another manifest format than this ganflow reads."""


def check_format(manifest: Mapping, name: str | None = None) -> Mapping:
    """The raw manifest, or SnapshotOutdated (one line, with the command that replaces it)."""
    version = manifest.get("format", 1)
    if version == FORMAT_VERSION:
        return manifest
    sid, name = manifest.get("id", "?"), name or manifest.get("name", "?")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise SnapshotOutdated(
            f"snapshot {sid} ({name}) was written by a newer ganflow (format {version}); "
            f"upgrade ganflow to read it (this one reads format {FORMAT_VERSION})"
        )
    source = shlex.quote(str(manifest.get("source", "SOURCE")))
    raise SnapshotOutdated(
        f"snapshot {sid} ({name}) was written by an older ganflow (format {version}); "
        f"re-ingest its source: ganflow ingest {source} --name {shlex.quote(name)}"
    )


def row_bytes(channels: int, image_size: int, pixels: str, arrays: Iterable[str]) -> int:
    """Bytes of one row of a part over its arrays (images and truth: pixels; labels: int64).
    The one rule that sizes shards: the in-process writer and the cluster's write tasks must
    cut a part at the same rows to write the same files."""
    image = channels * image_size * image_size * PIXEL_BYTES[pixels]
    return sum(LABEL_BYTES if a == "labels" else image for a in arrays)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Shard:
    """One .npy file of a snapshot: shard ``shard`` of array ``array`` of a part ("data", or
    a domain "x"/"y") of a split; ``count`` rows."""

    file: str
    split: str
    part: str
    array: str
    shard: int
    count: int
    dtype: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class FileRecord:
    """A source file the snapshot was made from; ``quarantined``: why it was left out."""

    path: str
    sha256: str
    bytes: int
    group: str
    quarantined: str | None = None


@dataclass(frozen=True)
class Quarantined:
    """A source entry left out (unreadable, not an image, outside the layout)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Domains:
    """What the two domains of an unpaired snapshot are."""

    x: str
    y: str


@dataclass(frozen=True)
class Manifest:
    """What a snapshot holds (the module docstring lists the fields). Built without
    ``shards``; the store adds them when it writes the manifest, after the shards."""

    id: str
    name: str
    source: str
    kind: Kind
    layout: str
    image_size: int
    channels: int
    pixels: Pixels
    preprocessing: Mapping[str, Any]
    num_images: int
    counts: Mapping[str, int]
    split_counts: Mapping[str, Mapping[str, int]]
    classes: tuple[str, ...] | None = None
    domains: Domains | None = None
    has_truth: bool = False
    content_sha256: str | None = None
    files: tuple[FileRecord, ...] = ()
    quarantined: tuple[Quarantined, ...] = ()
    shards: tuple[Shard, ...] = ()
    created: str = field(default_factory=utc_now)
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Lists become tuples whatever a builder passes, so that equal manifests compare equal.
        for key in ("files", "quarantined", "shards"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        sid = self.id
        _check(sid, self.kind in KINDS, "kind", self.kind, f"one of {', '.join(KINDS)}")
        _check(sid, self.pixels in PIXEL_BYTES, "pixels", self.pixels, "uint8 or float32")
        _check(sid, self.channels in (1, 3), "channels", self.channels, "1 or 3")
        size = self.image_size
        _check(sid, _is_int(size) and size > 0, "image_size", size, "a positive integer")
        have = sorted(self.split_counts)
        _check(sid, have == sorted(SPLITS), "split_counts", have, "train, val and test")

    # -- what training reads ---------------------------------------------------------------

    def facts(self) -> DataFacts:
        """What the snapshot is, as the config that trains on it must agree with."""
        classes = tuple(self.classes or ())
        unpaired = self.kind == "unpaired"
        return DataFacts(
            kind="unpaired" if unpaired else ("labelled" if classes else "unlabelled"),
            image_size=self.image_size,
            channels=self.channels,
            classes=classes,
            has_truth=self.has_truth,
            name=self.name or self.id,
        )

    def row_bytes(self, arrays: Iterable[str]) -> int:
        return row_bytes(self.channels, self.image_size, self.pixels, arrays)

    def shards_of(self, split: str, part: str) -> list[Shard]:
        return [s for s in self.shards if s.split == split and s.part == part]

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON values, in the order manifest.json has always had."""
        out: dict[str, Any] = {
            "format": self.format,
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "created": self.created,
            "kind": self.kind,
            "layout": self.layout,
            "image_size": self.image_size,
            "channels": self.channels,
            "pixels": self.pixels,
            "preprocessing": _plain(self.preprocessing),
            "num_images": self.num_images,
            "counts": dict(self.counts),
            "split_counts": {s: dict(c) for s, c in self.split_counts.items()},
            "classes": None if self.classes is None else list(self.classes),
            "domains": None if self.domains is None else {"x": self.domains.x, "y": self.domains.y},
            "has_truth": self.has_truth,
        }
        if self.content_sha256 is not None:
            out["content_sha256"] = self.content_sha256
        out["files"] = [_file_dict(f) for f in self.files]
        out["quarantined"] = [{"path": q.path, "reason": q.reason} for q in self.quarantined]
        out["shards"] = [_shard_dict(s) for s in self.shards]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, snapshot: str, name: str | None = None) -> Manifest:
        """A stored manifest.json, checked. ``snapshot``: the id it was read under (errors
        name it); ``name``: the name it was resolved through, which it then carries."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"snapshot {snapshot}: manifest.json is not JSON ({exc})") from None
        return cls.from_dict(data, snapshot, name)

    @classmethod
    def from_dict(cls, data: Any, snapshot: str, name: str | None = None) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError(f"snapshot {snapshot}: manifest.json is not a JSON object")
        check_format(data, name)
        r = _Reader(data, snapshot)
        sid = r.get("id", str)
        if sid != snapshot:  # its shards are found under its id: another folder is not it
            raise r.fail(f"has 'id' = {_short(sid)}, not the id it is stored under")
        stored_name = r.get("name", str)
        domains = r.get("domains", (dict, type(None)))
        return cls(
            format=FORMAT_VERSION,
            id=sid,
            name=name or stored_name,
            source=r.get("source", str),
            created=r.get("created", str),
            kind=r.get("kind", str),
            layout=r.get("layout", str),
            image_size=r.get("image_size", int),
            channels=r.get("channels", int),
            pixels=r.get("pixels", str),
            preprocessing=r.get("preprocessing", dict),
            num_images=r.get("num_images", int),
            counts=r.get("counts", dict),
            split_counts=r.get("split_counts", dict),
            classes=r.strings("classes"),
            domains=None if domains is None else Domains(*r.fields("domains", domains, ("x", "y"))),
            has_truth=r.get("has_truth", bool),
            content_sha256=r.get("content_sha256", (str, type(None)), None),
            files=[
                FileRecord(*r.fields(f"files[{i}]", f, FILE_KEYS, ("quarantined",)))
                for i, f in enumerate(r.get("files", list))
            ],
            quarantined=[
                Quarantined(*r.fields(f"quarantined[{i}]", q, ("path", "reason")))
                for i, q in enumerate(r.get("quarantined", list))
            ],
            shards=[
                Shard(*r.fields(f"shards[{i}]", sh, SHARD_KEYS))
                for i, sh in enumerate(r.get("shards", list))
            ],
        )


FILE_KEYS = ("path", "sha256", "bytes", "group")
SHARD_KEYS = ("file", "split", "part", "array", "shard", "count", "dtype", "bytes", "sha256")


def _shard_dict(s: Shard) -> dict[str, Any]:
    return {k: getattr(s, k) for k in SHARD_KEYS}


def _file_dict(f: FileRecord) -> dict[str, Any]:
    out = {"path": f.path, "sha256": f.sha256, "bytes": f.bytes, "group": f.group}
    if f.quarantined is not None:
        out["quarantined"] = f.quarantined
    return out


def _plain(value: Any) -> Any:
    """A mapping as a JSON-ready dict, nested ones too (a caller may pass a read-only view)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(sid: str, ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ValueError(f"snapshot {sid}: manifest {key!r} is {value!r}, not {want}")


_REQUIRED = object()


class _Reader:
    """Keys of a raw manifest, each checked as it is read (one-line errors naming the key)."""

    def __init__(self, data: dict, snapshot: str):
        self.data, self.sid = data, snapshot

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"snapshot {self.sid}: manifest.json {problem}; re-ingest its source")

    def get(self, key: str, types: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        if key not in self.data:
            if default is not _REQUIRED:
                return default
            raise self.fail(f"lacks the key {key!r}")
        value = self.data[key]
        if not _is(value, types):
            raise self.fail(f"has {key!r} = {_short(value)}, not {_names(types)}")
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.get(key, (list, type(None)))
        if value is not None and not all(isinstance(v, str) for v in value):
            raise self.fail(f"has {key!r} = {_short(value)}, not a list of strings")
        return None if value is None else tuple(value)

    def fields(
        self, where: str, item: Any, keys: tuple[str, ...], optional: tuple[str, ...] = ()
    ) -> tuple:
        """An object's values under keys (each required), then under optional keys."""
        if not isinstance(item, dict):
            raise self.fail(f"has {where} = {_short(item)}, not an object")
        missing = [k for k in keys if k not in item]
        if missing:
            raise self.fail(f"lacks the key {missing[0]!r} in {where}")
        return tuple(item[k] for k in keys) + tuple(item.get(k) for k in optional)


def _is(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not an int here
    return isinstance(value, types)


def _names(types: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", dict: "an object"}
    names |= {list: "a list", type(None): "null"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names[t] for t in types)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."

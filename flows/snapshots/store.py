"""The snapshot store: versioned, content-addressed datasets that training reads.

Layout under the storage root (:func:`flows.settings.snapshot_root`, local or ``s3://``)::

    <id>/train-00000.images.npy ...   shards per split part (train, val, test; train-x,
                               train-y ... for two domains), one .npy per array: images
                               [n, C, H, W] uint8 0..255 (float32 in [-1, 1] only when the
                               source's pixels are float), labels int64 [n], truth (CycleGAN
                               ground truth T(x), built-in pairs only); shard k of a part holds
                               the same rows in each of its arrays
    <id>/manifest.json         written last: a snapshot exists once its manifest does
    refs/names/<name>/<created>-<id>.json    name -> id history (latest = last)
    refs/sources/<fingerprint>.json          listing fingerprint -> id (the no-work fast path)

Atomicity: shards are written first, each in one put (a rename from a temporary file on local
disks, one PUT on S3), then the manifest, which lists every shard with its sha256. A crash
before the manifest leaves only an unreferenced folder that nothing lists or loads, and the
rerun (same id, since the id hashes the source content) overwrites it. An interrupted or
failed write (Ctrl-C included) removes its own shards and temporary files; what a killed
process leaves (SIGKILL, power loss) in a local root is removed by the next successful
ingest once it is an hour old (:meth:`Store.sweep`; younger, it may be a writer at work). Readers check every
shard's hash, so a shard replaced under a manifest is detected, not trained on.

Why ``.npy`` shards of 8-bit pixels: a quarter of float32's bytes (what sources hold: a
decoded 8-bit image is 8-bit), and a row is at a fixed offset of a plain file, so training
reads minibatches by index from a node's local copy (:mod:`flows.snapshots.cache`) without
loading a split, with no reader beyond numpy's header parser. Pixels become [-1, 1] per
minibatch on the device (``x / 127.5 - 1``). Parquet (Ray Data's native format) would add a
decode per row and does not give Algorithm 1's seeded per-rank sampling with exact resume.
Shards are read with ``allow_pickle=False`` (object arrays refused): nothing loaded from
storage can run code.

The manifest's type, keys and checks are :mod:`flows.snapshots.manifest`'s: every manifest
written or read here is a :class:`~flows.snapshots.manifest.Manifest`. ``format`` is
FORMAT_VERSION; snapshots of another format are refused with the command that re-ingests them
(format 2 added the val split; format 3 stores uint8 .npy shards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid

import numpy as np

from flows.settings import check_name as settings_check_name
from flows.settings import snapshot_root
from flows.snapshots.manifest import Manifest, Shard, SnapshotOutdated
from flows.storage import StorageError, describe, get_filesystem, is_remote, join, with_retries

SHARD_BYTES = 64 << 20
STALE_S = 3600.0
"""Age after which a manifest-less snapshot folder or a temporary file is a leftover."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ID_RE = re.compile(r"^[0-9a-f]{20}$")
_RAISE = object()


def shard_ranges(n: int, row_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard of a part of n rows of row_bytes (all arrays): about
    SHARD_BYTES each; an empty part is one empty shard."""
    step = max(1, SHARD_BYTES // max(1, row_bytes))
    return [(start, min(start + step, n)) for start in range(0, max(n, 1), step)]


def shard_file(part: str, k: int, array: str) -> str:
    return f"{part}-{k:05d}.{array}.npy"


class SnapshotNotFound(ValueError):
    """No snapshot matches a ref (id, name or builtin) in a storage root."""

    def __init__(self, ref: str, root: str):
        super().__init__(
            f"no snapshot {ref!r} in {root} (not an id or a name there; "
            "`ganflow datasets` lists them, `ganflow ingest` makes one)"
        )
        self.ref, self.root = ref, root

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling: rebuild from (ref, root).
        return (type(self), (self.ref, self.root))


def check_name(name: str) -> str:
    # The shared rule (flows.settings.check_name), plus "refs": the folder of the name index.
    if name == "refs":
        raise ValueError("snapshot name 'refs' is reserved (the name index's folder)")
    return settings_check_name(name, "snapshot name")


def digest(obj) -> str:
    """sha256 of a JSON-serialisable object in canonical form (the snapshot id's hash)."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


class Store:
    """One storage root. Every call goes through storage retries and one-line errors."""

    def __init__(self, root: str | None = None):
        self.url = root or snapshot_root()
        self.fs, self.path = get_filesystem(self.url)

    def _call(self, fn, *args, what: str | None = None, missing=_RAISE, **kwargs):
        try:
            return with_retries(fn, *args, **kwargs)
        except FileNotFoundError as exc:
            if missing is not _RAISE:
                return missing
            raise describe(exc, what or self.url) from None
        except (OSError, ConnectionError, TimeoutError) as exc:
            raise describe(exc, what or self.url) from None
        except StorageError:
            raise
        except Exception as exc:  # botocore/aiohttp errors that s3fs does not translate
            if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp"):
                raise describe(exc, what or self.url) from None
            raise

    def _p(self, *parts: str) -> str:
        return join(self.path, *parts)

    def put(self, rel: str, data: bytes) -> None:
        self._call(_put_bytes, self.fs, self._p(rel), data, what=join(self.url, rel))

    def get(self, rel: str) -> bytes | None:
        return self._call(self.fs.cat_file, self._p(rel), what=join(self.url, rel), missing=None)

    def ls(self, rel: str) -> list[str]:
        """Base names under a folder; [] when it does not exist."""
        path = self._p(rel)
        self.fs.invalidate_cache(path)
        names = self._call(self.fs.ls, path, detail=False, what=join(self.url, rel), missing=[])
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names)

    def check_root(self) -> None:
        """Fail early and in one line when a remote root's bucket is missing or denied."""
        if is_remote(self.url):
            bucket = self.path.split("/", 1)[0]
            if self._call(self.fs.ls, bucket, what=self.url, missing=None) is None:
                raise StorageError(
                    f"bucket {bucket!r} of the storage root {self.url} does not exist"
                )

    # -- manifests and refs ------------------------------------------------------------------

    def manifest(self, snapshot_id: str, name: str | None = None) -> Manifest | None:
        """The snapshot's manifest, checked (SnapshotOutdated for another format, ValueError
        when malformed); None when it has none. ``name``: the name it is resolved through."""
        raw = self.get(f"{snapshot_id}/manifest.json")
        return None if raw is None else Manifest.from_json(raw, snapshot_id, name)

    def source_ref(self, fingerprint: str) -> Manifest | None:
        raw = self.get(f"refs/sources/{fingerprint}.json")
        if raw is None:
            return None
        return self.manifest(json.loads(raw)["id"])

    def latest_for_name(self, name: str) -> str | None:
        refs = self.ls(f"refs/names/{name}")
        return refs[-1].rsplit("-", 1)[-1].removesuffix(".json") if refs else None

    def add_refs(self, manifest: Manifest, name: str, fingerprint: str | None) -> None:
        """Point name (and the source fingerprint) at the snapshot; after the manifest exists."""
        check_name(name)
        sid = manifest.id
        if self.latest_for_name(name) != sid:
            ns = time.time_ns()
            stamp = (
                time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns / 1e9)) + f".{ns // 1000 % 10**6:06d}"
            )
            self.put(f"refs/names/{name}/{stamp}Z-{sid}.json", json.dumps({"id": sid}).encode())
        if fingerprint:
            self.put(f"refs/sources/{fingerprint}.json", json.dumps({"id": sid}).encode())

    def write_snapshot(
        self, manifest: Manifest, parts: dict[str, dict[str, np.ndarray]]
    ) -> Manifest:
        """Shards first, manifest last. parts: {'train' | 'val' | 'test' | 'train-x' ...:
        arrays}."""
        started: list[str] = []

        def write() -> Manifest:
            shards: list[Shard] = []
            for part, arrays in sorted(parts.items()):
                per_row = manifest.row_bytes(arrays)
                stored = sum(a[0:1].nbytes for a in arrays.values())
                if len(arrays["images"]) and stored != per_row:
                    # Shards cut by another row size than the cluster's write tasks use
                    # would give the same snapshot other files.
                    raise ValueError(
                        f"snapshot {manifest.id}: part {part} has {stored} bytes a row, its "
                        f"manifest ({manifest.channels} ch, {manifest.image_size}px, "
                        f"{manifest.pixels}) says {per_row}"
                    )
                for k, (start, stop) in enumerate(shard_ranges(len(arrays["images"]), per_row)):
                    rows = {key: a[start:stop] for key, a in arrays.items()}
                    shards.extend(self.put_shard(manifest.id, part, k, rows, started))
            return self.finish_snapshot(manifest, shards)

        return self.cleaning_up(manifest.id, started, write)

    def cleaning_up(self, sid: str, started: list[str], write):
        """write(), or on any failure (Ctrl-C included) none of the shard files in
        ``started`` left without a manifest (unless another writer of the same snapshot
        finished it meanwhile: its manifest lists them)."""
        try:
            return write()
        except BaseException:
            if self.get(f"{sid}/manifest.json") is None:
                for f in started:
                    with contextlib.suppress(Exception):
                        self.fs.rm_file(self._p(f"{sid}/{f}"))
                if not is_remote(self.url):
                    with contextlib.suppress(OSError):
                        os.rmdir(self._p(sid))  # only when empty
            raise

    def put_shard(
        self, sid: str, part: str, k: int, arrays: dict[str, np.ndarray], started: list[str]
    ) -> list[Shard]:
        """Shard k of a part: one .npy per array (sorted by name), each in one put; returns
        their manifest entries. Each file's name is added to ``started`` before its put, so a
        write cut short is cleaned up."""
        split, _, domain = part.partition("-")
        entries = []
        for key in sorted(arrays):
            rows = arrays[key]
            data = npy_bytes(rows)
            fname = shard_file(part, k, key)
            started.append(fname)
            self.put(f"{sid}/{fname}", data)
            entries.append(
                Shard(
                    file=fname,
                    split=split,
                    part=domain or "data",
                    array=key,
                    shard=k,
                    count=len(rows),
                    dtype=rows.dtype.str,
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        return entries

    def finish_snapshot(self, manifest: Manifest, shards: list[Shard]) -> Manifest:
        """The manifest, written last: from now on the snapshot exists."""
        manifest = dataclasses.replace(manifest, shards=tuple(shards))
        self.put(f"{manifest.id}/manifest.json", manifest.to_json().encode())
        return manifest

    def sweep(self, stale_s: float = STALE_S) -> list[str]:
        """Remove what an ingest killed outright (SIGKILL, power loss) left in a local root:
        snapshot folders without a manifest and temporary files, untouched for stale_s (a
        writer at work now touches its files within seconds). Ctrl-C leaves nothing: the
        writer cleans up itself. Returns the paths removed."""
        if is_remote(self.url) or not os.path.isdir(self.path):
            return []
        removed: list[str] = []
        cutoff = time.time() - stale_s
        for entry in os.listdir(self.path):
            folder = os.path.join(self.path, entry)
            if not os.path.isdir(folder) or os.path.islink(folder):
                continue
            if _ID_RE.match(entry) and not os.path.exists(os.path.join(folder, "manifest.json")):
                if _newest_mtime(folder) < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
                continue
            for dirpath, _, files in os.walk(folder):
                for f in files:
                    p = os.path.join(dirpath, f)
                    if ".tmp-" in f and _mtime(p) < cutoff:
                        with contextlib.suppress(OSError):
                            os.remove(p)
                            removed.append(p)
        return removed

    def list(self) -> list[Manifest]:
        """Every snapshot this ganflow reads, oldest first; those of another format are left
        out (resolving one says how to replace it)."""
        out = []
        for entry in self.ls(""):
            if _ID_RE.match(entry):
                with contextlib.suppress(SnapshotOutdated):
                    m = self.manifest(entry)
                    if m is not None:
                        out.append(m)
        return sorted(out, key=lambda m: m.created)

    def resolve(self, ref: str) -> Manifest:
        """The manifest for an id, or the latest of a name (then named so). SnapshotNotFound
        when neither, SnapshotOutdated when it was written in another format."""
        if _ID_RE.match(ref):
            m = self.manifest(ref)
            if m is not None:
                return m
        if _NAME_RE.match(ref) and ref != "refs":
            sid = self.latest_for_name(ref)
            m = self.manifest(sid, name=ref) if sid else None
            if m is not None:
                return m
        raise SnapshotNotFound(ref, self.url)

    def shard_path(self, manifest: Manifest, file: str) -> str:
        """A shard's path in this root's filesystem."""
        return self._p(f"{manifest.id}/{file}")

    def corrupt(self, manifest: Manifest, file: str) -> ValueError:
        return ValueError(
            f"snapshot {manifest.id} in {self.url}: shard {file} is missing or does not "
            "match its manifest hash; re-ingest the source"
        )


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return float("inf")  # gone or unreadable: not ours to remove


def _newest_mtime(folder: str) -> float:
    newest = _mtime(folder)
    for dirpath, _, files in os.walk(folder):
        for f in files:
            newest = max(newest, _mtime(os.path.join(dirpath, f)))
    return newest


def npy_bytes(array: np.ndarray) -> bytes:
    """One array as .npy bytes; equal arrays give equal bytes (the header is a function of
    dtype and shape), so concurrent writers of one snapshot write identical shards."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _put_bytes(fs, path: str, data: bytes) -> None:
    """Write one object atomically: one PUT on object stores, write-then-rename on disks.

    (The single seam through which every snapshot byte is written: tests inject faults here.)
    """
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        except BaseException:  # Ctrl-C included: no stray .tmp
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        fs.pipe_file(path, data)

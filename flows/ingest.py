"""Ingest: raw images wherever they live -> a validated, versioned dataset snapshot.

The pipeline is a chain of plain functions (scan, fetch, plan, decode, assemble, write), run
by :func:`run_pipeline`. ``ingest()`` runs it directly; the Prefect flow
(:mod:`flows.ingest_flow`) runs the same chain with each stage as a task. Both return the
same result dict.

Stored size (``--image-size``, default auto): the source's resolution. Auto picks the most
common shorter side among the source's images (an npz file counts once per image; ties go to
the smaller side), clamped to 8..256 px: 256 caps the memory and disk a photo collection
takes by default, 8 is training's smallest size. The sizes come from the files' headers, read
as the files are fetched, so nothing is decoded twice; a file whose header is readable but
whose pixels are corrupt still counts (it is quarantined later). An explicit ``--image-size``
takes any integer in 8..512, training's range. Built-in datasets are stored at 16 px unless
a size is given.

Resize (``--resize``, default crop): a non-square image is cut to its largest centered square
(left and top offsets floor((w - side) / 2) and floor((h - side) / 2)), then resized with
gan_core's rule (:func:`gan_core.data.resize`: bilinear, align_corners=False, antialiased
when shrinking); ``stretch`` skips the crop and distorts the aspect ratio instead.

Identity: the snapshot id hashes the content (sha256 of every source file with its class or
domain and given split) and the preprocessing (resolved size, resize mode, channels, split
fractions, layout), never paths, times or names, so re-ingesting the same files gives the
same id, and auto resolving to 32 px gives the id of an explicit ``--image-size 32``.
Re-ingesting unchanged data costs one listing: the listing's fingerprint (paths, sizes, ETags
or mtimes, and the options as given, "auto" included) maps to the id in ``refs/sources``;
when only the listing changed (touched files, a copy elsewhere), files are read and hashed
again but nothing is decoded when the id already exists.

Splits (classes, flat and npz layouts, and CycleGAN folders without testA/testB): within each
class or domain of n images, images are ordered by the sha256 of their content; the first
round(n * test_fraction) are the test split, the next round(n * (test_fraction +
val_fraction)) - round(n * test_fraction) the val split, the rest train. The splits are thus
stratified, stable across machines, independent of file names and listing order, and test
does not change with val_fraction. CycleGAN folders with testA/testB keep their test split;
val is then round(m * val_fraction) of each domain's m train images, in the same hash order.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

from flows.layouts import (
    LAYOUTS,
    Assignment,
    Decoded,
    IngestError,
    SourceFile,
    archive_stem,
    assign,
    class_names,
    decode_files,
    detect_layout,
    header_dims,
    is_archive,
    is_ignored,
    iter_archive,
)
from flows.settings import ganflow_home
from flows.snapshots import FORMAT_VERSION, SPLITS, Store, check_name, digest
from flows.storage import describe, get_filesystem, is_remote, join, mask_secrets, with_retries

Progress = Callable[[str, int, int], None]
_GAN_CORE_RESIZE = "bilinear, align_corners=False, antialiased when shrinking"
RESIZE_RULES = {
    "crop": "largest centered square (offsets floor((w - side) / 2), floor((h - side) / 2)), "
    f"then {_GAN_CORE_RESIZE}, to image_size x image_size",
    "stretch": f"{_GAN_CORE_RESIZE}, stretched to image_size x image_size",
}
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 512  # training's range (gan_core.config DataConfig)
AUTO_IMAGE_SIZE_CAP = 256
BUILTIN_IMAGE_SIZE = 16
_READ_BATCH = 256


@dataclass(frozen=True)
class IngestOptions:
    """How raw files become a snapshot. Everything but max_bad_fraction and max_archive_bytes
    enters the id (image_size as resolved)."""

    layout: str = "auto"
    """auto, classes, cyclegan, flat or npz."""
    image_size: int | None = None
    """Side of the square images stored, in pixels (8..512); None: auto, the source's
    resolution (see the module docstring; 16 for built-in datasets)."""
    channels: int | None = None
    """1 or 3; None: 1 when every image is grayscale, else 3."""
    test_fraction: float = 0.2
    """Share of every class or domain held out as the test split (when the layout has none)."""
    max_bad_fraction: float = 0.1
    """Fail when more than this share of the files is quarantined."""
    max_archive_bytes: int = 4 << 30
    """Cap on an archive's uncompressed size (decompression bombs)."""
    # Fields added later go last, so that positional construction keeps its meaning.
    resize_mode: str = "crop"
    """crop: the largest centered square, then resize; stretch: resize the whole image."""
    val_fraction: float = 0.1
    """Share of every class or domain taken as the val split from the images not in test."""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        size = self.image_size
        if size is not None and (
            not isinstance(size, int)
            or isinstance(size, bool)
            or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE
        ):
            raise ValueError(
                f"image_size: must be an integer in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} "
                f"(training's range) or auto, got {size!r}"
            )
        if self.resize_mode not in RESIZE_RULES:
            raise ValueError(
                f"resize_mode: must be one of {', '.join(RESIZE_RULES)}, got {self.resize_mode!r}"
            )
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels: must be 1 or 3, got {self.channels!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: must be in [0, 1), got {self.test_fraction!r}")
        if not 0.0 <= self.val_fraction < 1.0 or self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError(
                f"val_fraction: must be in [0, 1) with test_fraction + val_fraction < 1, got "
                f"{self.val_fraction!r} (test_fraction {self.test_fraction!r})"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction!r}")

    def preprocessing(self) -> dict:
        """What enters the id (and the manifest); image_size is "auto" until resolved."""
        return {
            "image_size": self.image_size or "auto",
            "channels": self.channels or "auto",
            "test_fraction": self.test_fraction,
            "val_fraction": self.val_fraction,
            "resize_mode": self.resize_mode,
            "resize": RESIZE_RULES[self.resize_mode],
            "pixels": "x / 127.5 - 1, float32 in [-1, 1]",
        }


def auto_image_size(dims: Iterable[tuple[int, int, int] | None]) -> int:
    """The stored side for image_size auto, from (images, height, width) headers (None
    skipped): the most common shorter side (ties: the smaller), clamped to 8..256; 16 when
    no header is readable (nothing usable is stored then: every file is quarantined)."""
    sides: Counter[int] = Counter()
    for d in dims:
        if d is not None:
            sides[min(d[1], d[2])] += d[0]
    if not sides:
        return BUILTIN_IMAGE_SIZE
    side = min(sides, key=lambda s: (-sides[s], s))
    return max(MIN_IMAGE_SIZE, min(side, AUTO_IMAGE_SIZE_CAP))


@dataclass(frozen=True)
class Scan:
    """A source's listing: (relative path, size, change token) per file, and its fingerprint."""

    url: str
    entries: tuple[tuple[str, int, str], ...]
    single_file: bool
    fingerprint: str


@dataclass
class Plan:
    """What the snapshot will hold; ``options`` has image_size resolved (never auto)."""

    layout: str
    files: list[SourceFile]
    assignments: list[Assignment]
    quarantined: list[dict]
    classes: list[str] | None
    snapshot_id: str
    options: IngestOptions


def _shown(url: str) -> str:
    return mask_secrets(url)


def default_name(source: str) -> str:
    if source.startswith("builtin:"):
        return "builtin-" + source.split(":", 1)[1]
    stem = archive_stem(source.rstrip("/")) or "dataset"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    return stem[:100] or "dataset"


# ---------------------------------------------------------------------------------------------
# Stages.


def scan_source(url: str, options: IngestOptions) -> Scan:
    """List the source (no reads). IngestError/StorageError in one line for wrong paths,
    missing buckets, denied access or an empty source."""
    fs, path = get_filesystem(url)
    try:
        info = with_retries(fs.info, path)
        if info["type"] == "directory":
            found = with_retries(fs.find, path, detail=True)
        else:
            found = {path: info}
    except FileNotFoundError:
        if is_remote(url):
            bucket = path.split("/", 1)[0]
            try:
                with_retries(fs.ls, bucket)
            except FileNotFoundError:
                raise IngestError(
                    f"bucket {bucket!r} does not exist (source {_shown(url)})"
                ) from None
            except Exception as exc:
                raise describe(exc, _shown(url)) from None
        raise IngestError(f"source not found: {_shown(url)}") from None
    except IngestError:
        raise
    except Exception as exc:
        raise describe(exc, _shown(url)) from None
    entries = []
    for full, inf in sorted(found.items()):
        if inf.get("type") == "directory":
            continue
        rel = (
            posixpath.basename(full)
            if info["type"] != "directory"
            else full[len(path) :].lstrip("/")
        )
        token = str(inf.get("ETag") or inf.get("mtime") or inf.get("LastModified") or "")
        entries.append((rel, int(inf.get("size") or 0), token))
    if not [e for e in entries if not is_ignored(e[0])]:
        raise IngestError(f"source is empty: {_shown(url)} holds no files")
    fingerprint = digest(
        {
            "format": FORMAT_VERSION,
            "source": url,
            "entries": entries,
            "layout": options.layout,
            "preprocessing": options.preprocessing(),
        }
    )
    return Scan(url, tuple(entries), info["type"] != "directory", fingerprint)


def fetch_source(
    scan: Scan, options: IngestOptions, spool: str, progress: Progress | None = None
) -> list[SourceFile]:
    """Read every file once (concurrently on object stores) and hash it; open archives safely.

    Memory holds one batch of bytes at a time: a local file is re-read from where it is when
    decoded, a remote file or an archive member is kept in ``spool`` (a local folder the
    caller removes) under its content hash, never under a name taken from the source.
    """
    fs, path = get_filesystem(scan.url)
    remote = is_remote(scan.url)
    rels = [e[0] for e in scan.entries if not is_ignored(e[0])]
    base = posixpath.dirname(path) if scan.single_file else path
    out: list[SourceFile] = []
    for start in range(0, len(rels), _READ_BATCH):
        batch = rels[start : start + _READ_BATCH]
        full = [join(base, r) for r in batch]
        try:
            # cat_ranges, not cat: s3fs fetches the batch concurrently (one GET per file), and
            # cat would first send one HEAD per file to expand the paths (2x the requests).
            blobs = with_retries(fs.cat_ranges, full, None, None)
        except Exception as exc:
            raise describe(exc, _shown(scan.url)) from None
        for rel, f, data in zip(batch, full, blobs):
            out.append(_source_file(rel, data, spool if remote else None, f))
        del blobs
        if progress:
            progress("read", min(start + _READ_BATCH, len(rels)), len(rels))
    if len(out) == 1 and is_archive(out[0].path):
        archive = out[0]
        members = iter_archive(archive.read(), archive.path, options.max_archive_bytes)
        out = sorted(
            (_source_file(p, d, spool) for p, d in members if not is_ignored(p)),
            key=lambda f: f.path,
        )
        if not out:
            raise IngestError(f"source is empty: archive {_shown(scan.url)} holds no files")
    return out


def _source_file(rel: str, data: bytes, spool: str | None, local: str = "") -> SourceFile:
    sha = hashlib.sha256(data).hexdigest()
    if spool is not None:
        local = os.path.join(spool, sha)
        if not os.path.exists(local):  # equal contents share one copy
            with open(local, "wb") as f:
                f.write(data)
    # The header is read here, from bytes already in memory, so that image_size auto is known
    # before decoding (which shrinks as it goes) at no extra read.
    return SourceFile(rel, sha, len(data), local, header_dims(rel, data))


def plan_snapshot(files: list[SourceFile], options: IngestOptions) -> Plan:
    """Detect the layout, place every file (class/domain, given split), resolve the stored
    size (auto: from the kept files' headers), compute the id."""
    layout, prefix = detect_layout([f.path for f in files], options.layout)
    kept, assignments, quarantined = [], [], []
    for f in files:
        if is_ignored(f.path):
            continue
        rel = f.path[len(prefix) :] if f.path.startswith(prefix) else f.path
        a = assign(rel, layout)
        if isinstance(a, str):
            quarantined.append({"path": f.path, "reason": a})
        else:
            kept.append(f)
            assignments.append(a)
    if layout == "cyclegan" and not any(a.split == "test" for a in assignments):
        assignments = [Assignment(a.group, None) for a in assignments]  # no testA/B: hold out
    classes = class_names({a.group for a in assignments}) if layout == "classes" else None
    if options.image_size is None:
        options = replace(options, image_size=auto_image_size(f.dims for f in kept))
    snapshot_id = digest(
        {
            "format": FORMAT_VERSION,
            "layout": layout,
            "preprocessing": options.preprocessing(),
            "items": sorted([f.sha256, a.group, a.split or ""] for f, a in zip(kept, assignments)),
        }
    )[:20]
    return Plan(layout, kept, assignments, quarantined, classes, snapshot_id, options)


def decode_plan(
    plan: Plan, workers: int = 0, progress: Progress | None = None
) -> list[Decoded | str]:
    """Decoded files (or quarantine reasons) in plan order, every image cropped and shrunk to
    the plan's stored size as it arrives, so memory follows the output, not the source."""
    cb = (lambda done, total: progress("decode", done, total)) if progress else None
    size, mode = plan.options.image_size, plan.options.resize_mode
    return decode_files(
        [(f.path, f) for f in plan.files],
        workers=workers,
        progress=cb,
        finish=lambda d: shrink(d, size, mode),
    )


def _pixels(batch: np.ndarray):
    """[n, h, w, c] uint8 or float in [-1, 1] -> [n, c, h, w] float32 in [-1, 1]."""
    import torch

    t = torch.from_numpy(batch)
    t = t.float() / 127.5 - 1.0 if batch.dtype == np.uint8 else t.float()
    return t.permute(0, 3, 1, 2).contiguous()


def _by_shape(arrays: list[np.ndarray]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault((a.shape, a.dtype.str), []).append(i)
    return list(groups.values())


def center_square(a: np.ndarray) -> np.ndarray:
    """The largest centered square of an [h, w, c] array (a view); when h - w is odd, the
    extra row or column is dropped at the bottom or right."""
    h, w = a.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return a[top : top + side, left : left + side]


def shrink(d: Decoded, size: int, resize_mode: str = "crop") -> Decoded:
    """The resize rule applied at decode time (RESIZE_RULES[resize_mode]): images become
    [size, size, c] float32 in [-1, 1], channels kept (the snapshot's channel count is known
    only once all are seen; luma and resize are both linear, so converting channels afterwards
    gives the same)."""
    from gan_core.data import resize

    images = [center_square(a) for a in d.images] if resize_mode == "crop" else list(d.images)
    out: list[np.ndarray] = list(images)
    for idx in _by_shape(images):
        t = resize(_pixels(np.stack([images[i] for i in idx])), size)
        for j, i in enumerate(idx):
            # A copy, so no stored image keeps its full-size source array alive.
            out[i] = t[j].permute(1, 2, 0).numpy().copy()
    return Decoded(out, d.labels, d.hashes, d.gray)


def _to_images(arrays: list[np.ndarray], channels: int, size: int):
    """[n, C, size, size] float32 in [-1, 1] from [h, w, c] arrays (uint8 or float in [-1, 1])."""
    import torch

    from gan_core.data import resize

    out = torch.empty(len(arrays), channels, size, size)
    for idx in _by_shape(arrays):
        t = _pixels(np.stack([arrays[i] for i in idx]))
        if t.shape[1] == 3 and channels == 1:  # ITU-R 601 luma, Pillow's "L" weights
            t = (0.299 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3]).clamp(-1, 1)
        elif t.shape[1] == 1 and channels == 3:
            t = t.expand(-1, 3, -1, -1)
        out[idx] = resize(t.contiguous(), size)
    return out


def split_ranks(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """(n_test, n_val) for a group of n images whose split is not given: the first n_test in
    content-hash order are test, the next n_val val. Rounded cumulatively, so test is the same
    whatever val_fraction is and test + val never exceeds n."""
    n_test = round(n * test_fraction)
    return n_test, round(n * (test_fraction + val_fraction)) - n_test


def assemble(
    plan: Plan, decoded: list[Decoded | str], source: str, name: str
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Validate, split and resize: the manifest (without shards) and the arrays per part
    ('train', 'val', 'test', or 'train-x' ... for two domains)."""
    options = plan.options
    quarantined = list(plan.quarantined)
    items = []  # (group, given split, hash, key, array, label)
    files_meta = []
    labelled_npz = set()
    for f, a, d in zip(plan.files, plan.assignments, decoded):
        meta = {"path": f.path, "sha256": f.sha256, "bytes": f.size, "group": a.group}
        if isinstance(d, str):
            quarantined.append({"path": f.path, "reason": d})
            files_meta.append({**meta, "quarantined": d})
            continue
        files_meta.append(meta)
        if plan.layout == "npz":
            labelled_npz.add(d.labels is not None)
        for i, (arr, h) in enumerate(zip(d.images, d.hashes)):
            if plan.layout == "classes":
                label = plan.classes.index(a.group)
            elif d.labels is not None:
                label = d.labels[i]
            else:
                label = None
            group = str(label) if plan.layout == "npz" and label is not None else a.group
            items.append((group, a.split, h, (f.path, i), arr, label, d.gray))
    total = len(plan.files) + len(plan.quarantined)
    shown = _shown(source)
    if not items:
        first = (
            f" (first: {quarantined[0]['path']}: {quarantined[0]['reason']})" if quarantined else ""
        )
        raise IngestError(f"nothing usable in {shown}: all {total} files quarantined{first}")
    if len(quarantined) / max(total, 1) > options.max_bad_fraction:
        q = quarantined[0]
        raise IngestError(
            f"{len(quarantined)} of {total} files in {shown} are unusable "
            f"({100 * len(quarantined) / total:.0f}%, limit {100 * options.max_bad_fraction:.0f}%, "
            f"see --max-bad-fraction); first: {q['path']}: {q['reason']}"
        )
    if len(labelled_npz) > 1:
        raise IngestError(f"some .npz files in {shown} have labels and others do not")
    channels = options.channels or (1 if all(it[6] for it in items) else 3)

    # Splits: per group, by content hash (stable, stratified, name-independent). A given test
    # split (testA/testB) is kept and val comes out of the given train images.
    splits: list[str] = [""] * len(items)
    hashed: dict[str, list[int]] = {}
    given_train: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it[1] is None:
            hashed.setdefault(it[0], []).append(i)
        elif it[1] == "train":
            given_train.setdefault(it[0], []).append(i)
        else:
            splits[i] = it[1]
    for idx in hashed.values():
        n_test, n_val = split_ranks(len(idx), options.test_fraction, options.val_fraction)
        idx.sort(key=lambda i: (items[i][2], items[i][3]))
        for rank, i in enumerate(idx):
            splits[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    for idx in given_train.values():
        n_val = round(len(idx) * options.val_fraction)
        idx.sort(key=lambda i: (items[i][2], items[i][3]))
        for rank, i in enumerate(idx):
            splits[i] = "val" if rank < n_val else "train"

    unpaired = plan.layout == "cyclegan"
    has_labels = not unpaired and items[0][5] is not None
    parts_idx: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        part = f"{splits[i]}-{it[0]}" if unpaired else splits[i]
        parts_idx.setdefault(part, []).append(i)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for part, idx in sorted(parts_idx.items()):
        idx.sort(key=lambda i: (items[i][0], items[i][3]))
        arrays = {
            "images": _to_images([items[i][4] for i in idx], channels, options.image_size).numpy()
        }
        if has_labels:
            arrays["labels"] = np.array([items[i][5] for i in idx], dtype=np.int64)
        parts[part] = arrays

    def count(sel):
        c: dict[str, int] = {}
        for i in sel:
            c[items[i][0] or "all"] = c.get(items[i][0] or "all", 0) + 1
        return dict(sorted(c.items()))

    manifest = {
        "format": FORMAT_VERSION,
        "id": plan.snapshot_id,
        "name": name,
        "source": shown,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": "unpaired" if unpaired else "images",
        "layout": plan.layout,
        "image_size": options.image_size,
        "channels": channels,
        "preprocessing": options.preprocessing(),
        "num_images": len(items),
        "counts": count(range(len(items))),
        "split_counts": {
            s: count([i for i in range(len(items)) if splits[i] == s]) for s in SPLITS
        },
        "family_data": "unpaired" if unpaired else "labelled" if has_labels else "unlabelled",
        "classes": plan.classes
        if plan.layout == "classes"
        else ([str(c) for c in range(max(it[5] for it in items) + 1)] if has_labels else None),
        "domains": {"x": "A", "y": "B"} if unpaired else None,
        "has_truth": False,
        "files": files_meta,
        "quarantined": quarantined,
    }
    return manifest, parts


# ---------------------------------------------------------------------------------------------
# The pipeline, run directly or by the Prefect flow.

Call = Callable[..., object]


def _direct(stage: str, fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def _result(manifest: dict, name: str, store: Store, reused: bool) -> dict:
    return {
        "id": manifest["id"],
        "name": name,
        "num_images": manifest["num_images"],
        "counts": manifest["counts"],
        "split_counts": manifest["split_counts"],
        "family_data": manifest["family_data"],
        "quarantined": manifest["quarantined"],
        "layout": manifest["layout"],
        "image_size": manifest["image_size"],
        "channels": manifest["channels"],
        "source": manifest["source"],
        "root": _shown(store.url),
        "reused": reused,
    }


def run_pipeline(
    source: str,
    *,
    name: str | None = None,
    options: IngestOptions | None = None,
    root: str | None = None,
    workers: int = 0,
    progress: Progress | None = None,
    call: Call = _direct,
) -> dict:
    """Source -> snapshot. ``call(stage, fn, *args)`` runs each stage (directly, or as a task)."""
    options = options or IngestOptions()
    name = check_name(name or default_name(source))
    store = Store(root)
    call("check-root", store.check_root)
    if source.startswith("builtin:"):
        return call("ingest-builtin", ingest_builtin, source, options, store.url, name)
    scan = call("scan", scan_source, source, options)
    hit = call("lookup", store.source_ref, scan.fingerprint)
    if hit is not None:
        call("refs", store.add_refs, hit, name, None)
        return _result(hit, name, store, reused=True)
    spool_root = ganflow_home() / "tmp"
    spool_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ingest-", dir=spool_root) as spool:
        files = call("fetch", fetch_source, scan, options, spool, progress)
        plan = call("plan", plan_snapshot, files, options)
        existing = call("lookup", store.manifest, plan.snapshot_id)
        if existing is not None:
            call("refs", store.add_refs, existing, name, scan.fingerprint)
            return _result(existing, name, store, reused=True)
        decoded = call("decode", decode_plan, plan, workers, progress)
    manifest, parts = call("assemble", assemble, plan, decoded, scan.url, name)
    manifest = call("write", store.write_snapshot, manifest, parts)
    call("refs", store.add_refs, manifest, name, scan.fingerprint)
    return _result(manifest, name, store, reused=False)


def ingest(source: str, **kwargs) -> dict:
    """Ingest without Prefect (same stages, same result); see run_pipeline for arguments."""
    return run_pipeline(source, **kwargs)


def ingest_builtin(
    ref: str, options: IngestOptions, root: str | None = None, name: str | None = None
) -> dict:
    """A built-in dataset as a snapshot whose tensors equal gan_core's load_builtin exactly,
    split for split (train, val, test). Stored at options.image_size, 16 px when auto; the
    splits are gan_core's fixed ones, so the fractions and resize_mode options do not apply."""
    from gan_core.data import BUILTIN_DATASETS, load_builtin

    if ref not in BUILTIN_DATASETS:
        raise IngestError(f"unknown built-in dataset {ref!r}; known: {', '.join(BUILTIN_DATASETS)}")
    if options.channels not in (None, 1):
        raise IngestError(f"{ref} has 1 channel; --channels {options.channels} is not supported")
    store = Store(root)
    name = check_name(name or default_name(ref))
    size = options.image_size or BUILTIN_IMAGE_SIZE
    fingerprint = digest({"format": FORMAT_VERSION, "builtin": ref, "size": size})
    hit = store.source_ref(fingerprint)
    if hit is not None:
        store.add_refs(hit, name, None)
        return _result(hit, name, store, reused=True)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for split in SPLITS:
        data = load_builtin(ref, size, split)
        if hasattr(data, "x_truth"):
            parts[f"{split}-x"] = {
                "images": data.x.images.numpy(),
                "labels": data.x.labels.numpy(),
                "truth": data.x_truth.numpy(),
            }
            parts[f"{split}-y"] = {"images": data.y.images.numpy(), "labels": data.y.labels.numpy()}
        else:
            parts[split] = {"images": data.images.numpy(), "labels": data.labels.numpy()}
    content = hashlib.sha256()
    for part, arrays in sorted(parts.items()):
        for key, a in sorted(arrays.items()):
            content.update(f"{part}/{key}{a.shape}".encode())
            content.update(np.ascontiguousarray(a).tobytes())
    snapshot_id = digest(
        {
            "format": FORMAT_VERSION,
            "builtin": ref,
            "image_size": size,
            "content": content.hexdigest(),
        }
    )[:20]
    manifest = store.manifest(snapshot_id)
    if manifest is None:
        unpaired = "train-x" in parts

        def counts(split):
            if unpaired:
                return {d: len(parts[f"{split}-{d}"]["images"]) for d in ("x", "y")}
            labels = parts[split]["labels"]
            return {str(c): int((labels == c).sum()) for c in np.unique(labels)}

        split_counts = {s: counts(s) for s in SPLITS}
        total = {k: sum(split_counts[s].get(k, 0) for s in SPLITS) for k in split_counts["train"]}
        manifest = store.write_snapshot(
            {
                "format": FORMAT_VERSION,
                "id": snapshot_id,
                "name": name,
                "source": ref,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kind": "unpaired" if unpaired else "images",
                "layout": "cyclegan" if unpaired else "classes",
                "image_size": size,
                "channels": 1,
                "preprocessing": {"image_size": size, "builtin": "gan_core.data.load_builtin"},
                "num_images": sum(total.values()),
                "counts": total,
                "split_counts": split_counts,
                "family_data": "unpaired" if unpaired else "labelled",
                "classes": [str(c) for c in range(10)],
                "domains": {"x": "digits", "y": "appearance_transform(digits)"}
                if unpaired
                else None,
                "has_truth": unpaired,
                "content_sha256": content.hexdigest(),
                "files": [],
                "quarantined": [],
            },
            parts,
        )
        reused = False
    else:
        reused = True
    store.add_refs(manifest, name, fingerprint)
    return _result(manifest, name, store, reused=reused)


# ---------------------------------------------------------------------------------------------
# Command line.


class _Bar:
    """A progress bar on stderr: redrawn in place on a terminal, one line per stage otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or (not self.tty and done < total):
            return
        width = 30
        fill = int(width * done / max(total, 1))
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        line = (
            f"[ingest] {stage:6} |{'#' * fill}{'.' * (width - fill)}| {done}/{total} {rate:,.0f}/s"
        )
        end = "\n" if done >= total else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
        if done >= total:
            self.t0 = time.perf_counter()


def cmd_ingest(args: argparse.Namespace) -> dict:
    options = IngestOptions(
        layout=args.layout,
        image_size=args.image_size,
        channels=args.channels,
        test_fraction=args.test_fraction,
        max_bad_fraction=args.max_bad_fraction,
        resize_mode=args.resize,
        val_fraction=args.val_fraction,
    )
    kwargs = dict(
        name=args.name,
        options=options,
        root=args.root,
        workers=args.workers,
        progress=_Bar(not args.quiet),
    )
    if args.no_prefect:
        result = ingest(args.source, **kwargs)
    else:
        from flows.ingest_flow import run_flow

        result = run_flow(args.source, debug=args.debug, **kwargs)
    if not args.json:
        verb = "unchanged" if result["reused"] else "created"
        counts = ", ".join(f"{k}={v}" for k, v in result["counts"].items())
        print(
            f"snapshot {result['id']} ({result['name']}) {verb}: {result['num_images']} images [{counts}]"
        )
        print(
            f"  layout {result['layout']}, {result['image_size']}px x {result['channels']} ch, in {result['root']}"
        )
        sizes = {s: sum(result["split_counts"].get(s, {}).values()) for s in SPLITS}
        print("  splits " + ", ".join(f"{s} {n}" for s, n in sizes.items()))
        for q in result["quarantined"]:
            print(f"  quarantined {q['path']}: {q['reason']}")
    keys = ("id", "name", "num_images", "counts", "split_counts", "quarantined", "reused")
    return {k: result[k] for k in (*keys, "layout", "image_size")}


def cmd_datasets(args: argparse.Namespace) -> dict:
    store = Store(args.root)
    store.check_root()
    rows = [
        {
            k: m.get(k)
            for k in (
                "id",
                "name",
                "created",
                "num_images",
                "counts",
                "source",
                "layout",
                "image_size",
                "channels",
            )
        }
        for m in store.list()
    ]
    if not args.json:
        if not rows:
            print(f"no snapshots in {_shown(store.url)} (ganflow ingest SOURCE makes one)")
        for r in rows:
            counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items())
            print(
                f"{r['id']}  {r['name']:20} {r['created']}  {r['num_images']:6d} images  [{counts}]  {r['source']}"
            )
    return {"root": _shown(store.url), "snapshots": rows}


def _image_size_arg(text: str) -> int | None:
    """--image-size: 'auto' (None) or an integer in training's range."""
    if text == "auto":
        return None
    try:
        size = int(text)
    except ValueError:
        size = None
    if size is None or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be auto or an integer in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (training's "
            f"range), got {text!r}"
        )
    return size


def add_commands(sub, add_common) -> None:
    p = sub.add_parser(
        "ingest",
        help="validate raw images (local, s3:// or builtin:) into a versioned dataset snapshot",
    )
    p.add_argument(
        "source", help="local path, s3://bucket/prefix, an archive, or builtin:digits[-unpaired]"
    )
    p.add_argument("--name", help="snapshot name (default: from the source)")
    p.add_argument("--layout", default="auto", choices=LAYOUTS, help="default: auto-detect")
    p.add_argument(
        "--image-size",
        type=_image_size_arg,
        default=None,
        metavar="auto|N",
        help=f"stored image side in pixels, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (default: auto: "
        "the most common shorter side among the source's images, ties to the smaller, "
        f"clamped to {MIN_IMAGE_SIZE}..{AUTO_IMAGE_SIZE_CAP}; built-in datasets: "
        f"{BUILTIN_IMAGE_SIZE})",
    )
    p.add_argument(
        "--resize",
        choices=tuple(RESIZE_RULES),
        default="crop",
        help="non-square images: crop to the largest centered square, then resize (default), "
        "or stretch to the square",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="default: 1 if all images are grayscale, else 3",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="test share per class or domain (default: 0.2)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="validation share per class or domain, taken from the images not in test; "
        "test + val must stay below 1 (default: 0.1)",
    )
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.1,
        help="fail above this share of unusable files (default: 0.1)",
    )
    p.add_argument(
        "--root", help="storage root (default: GANFLOW_STORAGE_ROOT or GANFLOW_HOME/snapshots)"
    )
    p.add_argument(
        "--workers", type=int, default=0, help="decode processes (default: min(cpus, 8))"
    )
    p.add_argument(
        "--no-prefect",
        action="store_true",
        help="run the stages directly, without a Prefect flow run",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p)
    p.set_defaults(func=cmd_ingest)

    d = sub.add_parser("datasets", help="list dataset snapshots with their counts and sources")
    d.add_argument(
        "--root", help="storage root (default: GANFLOW_STORAGE_ROOT or GANFLOW_HOME/snapshots)"
    )
    add_common(d)
    d.set_defaults(func=cmd_datasets)

"""Ingest: raw images wherever they live -> a validated, versioned dataset snapshot.

The pipeline is a chain of plain functions (scan, fetch, plan, decode, assemble, write), run
by :func:`run_pipeline`. ``ingest()`` runs it directly; the Prefect flow
(:mod:`flows.orchestration.ingest`) runs the same chain with each stage as a task. Both return the
same :class:`IngestResult`.

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

import errno
import hashlib
import os
import posixpath
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from flows.ingest.layouts import (
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
from flows.snapshots.manifest import (
    FORMAT_VERSION,
    SPLITS,
    Domains,
    FileRecord,
    Manifest,
    Quarantined,
    row_bytes,
)
from flows.snapshots.store import Store, digest, shard_ranges
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
PIXELS_UINT8 = (
    "uint8 0..255 (x / 127.5 - 1 gives [-1, 1], per minibatch); resized pixels rounded to the "
    "nearest 8-bit value"
)
PIXEL_RULE = f"{PIXELS_UINT8} when every source is 8-bit; else float32 in [-1, 1]"
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
            "pixels": PIXEL_RULE,
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
    """A source's listing: (relative path, size, change token) per file, and its fingerprint;
    ``skipped``: (relative path, reason) of entries that are not files to read (links that
    loop or dangle, devices, pipes), quarantined with that reason."""

    url: str
    entries: tuple[tuple[str, int, str], ...]
    single_file: bool
    fingerprint: str
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass
class Plan:
    """What the snapshot will hold; ``options`` has image_size resolved (never auto)."""

    layout: str
    files: list[SourceFile]
    assignments: list[Assignment]
    quarantined: list[Quarantined]
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


def _walk_local(root: str) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Files under a local folder as {path: {"size", "mtime"}} (fsspec's find reports a link
    to a folder as "other", which then cannot be read), and (relative path, reason) for what
    is skipped.

    Links are followed: a link to a file is that file, a link to a folder is walked like a
    folder (a dataset assembled from links is common), except a link to a folder that
    contains it (a loop: walked, it would never end). A link that dangles or loops on itself
    and anything that is not a regular file (pipe, socket, device: reading a pipe would block)
    is skipped with the reason, and counts as a quarantined file."""
    files: dict[str, dict] = {}
    skipped: list[tuple[str, str]] = []

    def rel(p: str) -> str:
        return os.path.relpath(p, root).replace(os.sep, "/")

    def walk(folder: str, ancestors: tuple[str, ...]) -> None:
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            skipped.append((rel(folder) + "/", f"unreadable folder ({exc.strerror or exc})"))
            return
        for entry in names:
            p = os.path.join(folder, entry)
            link = os.path.islink(p)
            try:
                st = os.stat(p)  # follows links
            except OSError as exc:
                if link:
                    why = "a link loop" if exc.errno == errno.ELOOP else "a dangling link"
                    skipped.append((rel(p), f"{why}; not followed"))
                else:
                    skipped.append((rel(p), f"unreadable ({exc.strerror or exc})"))
                continue
            if stat.S_ISDIR(st.st_mode):
                real = os.path.realpath(p)
                if real in ancestors:
                    skipped.append((rel(p), "a link to a folder that contains it (a loop)"))
                    continue
                walk(p, (*ancestors, real))
            elif stat.S_ISREG(st.st_mode):
                files[p] = {"type": "file", "size": st.st_size, "mtime": st.st_mtime}
            else:
                skipped.append((rel(p), "not a regular file (pipe, socket or device)"))

    walk(root, (os.path.realpath(root),))
    return files, skipped


def scan_source(url: str, options: IngestOptions) -> Scan:
    """List the source (no reads). IngestError/StorageError in one line for wrong paths,
    missing buckets, denied access or an empty source."""
    fs, path = get_filesystem(url)
    skipped: list[tuple[str, str]] = []
    local_dir = not is_remote(url) and os.path.isdir(path)  # a folder, or a link to one
    if not (is_remote(url) or local_dir or os.path.isfile(path)) and os.path.lexists(path):
        why = "a dangling link or a link loop" if os.path.islink(path) else "not a file"
        raise IngestError(f"source {_shown(url)} is {why}")
    try:
        if local_dir:
            info = {"type": "directory"}
            found, skipped = _walk_local(path)
        else:
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
    skipped = [(r, why) for r, why in skipped if not is_ignored(r)]
    if not [e for e in entries if not is_ignored(e[0])]:
        first = f" (skipped {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise IngestError(f"source is empty: {_shown(url)} holds no files{first}")
    listing = {
        "format": FORMAT_VERSION,
        "source": url,
        "entries": entries,
        "layout": options.layout,
        "preprocessing": options.preprocessing(),
    }
    if skipped:  # only then, so that listings without skipped entries keep their fingerprint
        listing["skipped"] = skipped
    fingerprint = digest(listing)
    return Scan(url, tuple(entries), info["type"] != "directory", fingerprint, tuple(skipped))


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
            # cat_ranges hands a file's error back in its place instead of raising it.
            if isinstance(data, FileNotFoundError):
                raise IngestError(
                    f"{rel}: removed from {_shown(scan.url)} while being ingested; run the "
                    "ingest again"
                )
            if isinstance(data, BaseException):
                raise describe(data, _shown(join(scan.url, rel))) from None
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


def plan_snapshot(
    files: list[SourceFile], options: IngestOptions, skipped: Iterable[tuple[str, str]] = ()
) -> Plan:
    """Detect the layout, place every file (class/domain, given split), resolve the stored
    size (auto: from the kept files' headers), compute the id. ``skipped``: the scan's
    entries that were not read (Scan.skipped), quarantined with their reasons."""
    layout, prefix = detect_layout([f.path for f in files], options.layout)
    kept, assignments = [], []
    quarantined = [Quarantined(p, why) for p, why in skipped]
    for f in files:
        if is_ignored(f.path):
            continue
        rel = f.path[len(prefix) :] if f.path.startswith(prefix) else f.path
        a = assign(rel, layout)
        if isinstance(a, str):
            quarantined.append(Quarantined(f.path, a))
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
    [size, size, c], uint8 when they were (rounded to the nearest 8-bit value after resizing,
    so an image already at the stored size is kept exactly), else float32 in [-1, 1]; channels
    kept (the snapshot's channel count is known only once all are seen; see _to_images)."""
    from gan_core.data import resize, to_uint8

    images = [center_square(a) for a in d.images] if resize_mode == "crop" else list(d.images)
    out: list[np.ndarray] = list(images)
    for idx in _by_shape(images):
        t = resize(_pixels(np.stack([images[i] for i in idx])), size)
        if images[idx[0]].dtype == np.uint8:
            t = to_uint8(t)
        for j, i in enumerate(idx):
            # A copy, so no stored image keeps its full-size source array alive.
            out[i] = t[j].permute(1, 2, 0).numpy().copy()
    return Decoded(out, d.labels, d.hashes, d.gray)


_CONVERT_CHUNK = 1024


def _to_images(arrays: list[np.ndarray], channels: int, size: int, eight_bit: bool) -> np.ndarray:
    """[n, C, size, size] from [h, w, c] arrays: uint8 when eight_bit (every source image of
    the snapshot is 8-bit), else float32 in [-1, 1]. Converted a chunk at a time, so the
    float intermediate stays small whatever n is; each image's result depends on it alone,
    so any slice of a part converts to the same bytes as the whole part."""
    from gan_core.data import resize, to_uint8

    out = np.empty((len(arrays), channels, size, size), np.uint8 if eight_bit else np.float32)
    for group in _by_shape(arrays):
        for start in range(0, len(group), _CONVERT_CHUNK):
            idx = group[start : start + _CONVERT_CHUNK]
            t = _pixels(np.stack([arrays[i] for i in idx]))
            if t.shape[1] == 3 and channels == 1:  # ITU-R 601 luma, Pillow's "L" weights
                t = (0.299 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3]).clamp(-1, 1)
            elif t.shape[1] == 1 and channels == 3:
                t = t.expand(-1, 3, -1, -1)
            t = resize(t.contiguous(), size)
            out[idx] = (to_uint8(t) if eight_bit else t).numpy()
    return out


def split_ranks(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """(n_test, n_val) for a group of n images whose split is not given: the first n_test in
    content-hash order are test, the next n_val val. Rounded cumulatively, so test is the same
    whatever val_fraction is and test + val never exceeds n."""
    n_test = round(n * test_fraction)
    return n_test, round(n * (test_fraction + val_fraction)) - n_test


@dataclass(frozen=True)
class DecodedMeta:
    """A Decoded without its pixels: what arranging a snapshot needs (the cluster path keeps
    the pixels in Ray's object store, where the write tasks read them)."""

    labels: list[int] | None
    hashes: list[str]
    gray: bool
    eight_bit: bool

    @classmethod
    def of(cls, d: Decoded) -> DecodedMeta:
        return cls(d.labels, d.hashes, d.gray, all(a.dtype == np.uint8 for a in d.images))


Image = Callable[[int, int], np.ndarray]
"""(file index in the plan, image index in the file) -> that image's decoded pixels."""


@dataclass(frozen=True)
class Arrangement:
    """Where every stored image comes from: per part ('train', 'val', 'test', 'train-x' ...),
    (file index in the plan, image index in the file) in stored order, and the labels."""

    parts: dict[str, list[tuple[int, int]]]
    labels: dict[str, np.ndarray | None]
    channels: int
    size: int
    eight_bit: bool

    def row_bytes(self, part: str) -> int:
        arrays = ["images"] if self.labels[part] is None else ["images", "labels"]
        return row_bytes(self.channels, self.size, "uint8" if self.eight_bit else "float32", arrays)

    def shards(self, part: str) -> list[tuple[int, int]]:
        """[start, stop) of each shard of the part (the store's rule)."""
        return shard_ranges(len(self.parts[part]), self.row_bytes(part))

    def arrays(self, part: str, start: int, stop: int, image: Image) -> dict[str, np.ndarray]:
        """Rows [start, stop) of a part as stored: images converted, labels."""
        refs = self.parts[part][start:stop]
        pixels = [image(f, i) for f, i in refs]
        out = {"images": _to_images(pixels, self.channels, self.size, self.eight_bit)}
        if self.labels[part] is not None:
            out["labels"] = self.labels[part][start:stop]
        return out


def assemble(
    plan: Plan, decoded: list[Decoded | str], source: str, name: str
) -> tuple[Manifest, dict[str, dict[str, np.ndarray]]]:
    """Validate, split and resize: the manifest (without shards) and the arrays per part
    ('train', 'val', 'test', or 'train-x' ... for two domains)."""
    metas = [d if isinstance(d, str) else DecodedMeta.of(d) for d in decoded]
    manifest, arrangement = arrange(plan, metas, source, name)

    def image(f: int, i: int) -> np.ndarray:
        return decoded[f].images[i]

    parts = {
        part: arrangement.arrays(part, 0, len(refs), image)
        for part, refs in sorted(arrangement.parts.items())
    }
    return manifest, parts


def arrange(
    plan: Plan, decoded: list[DecodedMeta | str], source: str, name: str
) -> tuple[Manifest, Arrangement]:
    """Validate and split, from the decoded files' metadata alone: the manifest (without
    shards) and where each stored row comes from. Quarantine, the bad-share limit and the
    splits are decided here, before any pixel is converted or written."""
    options = plan.options
    quarantined = list(plan.quarantined)
    items = []  # (group, given split, hash, key, (file, image) index, label, gray)
    files_meta: list[FileRecord] = []
    labelled_npz = set()
    eight_bit = True
    for fi, (f, a, d) in enumerate(zip(plan.files, plan.assignments, decoded)):
        if isinstance(d, str):
            quarantined.append(Quarantined(f.path, d))
            files_meta.append(FileRecord(f.path, f.sha256, f.size, a.group, quarantined=d))
            continue
        files_meta.append(FileRecord(f.path, f.sha256, f.size, a.group))
        eight_bit = eight_bit and d.eight_bit
        if plan.layout == "npz":
            labelled_npz.add(d.labels is not None)
        for i, h in enumerate(d.hashes):
            if plan.layout == "classes":
                label = plan.classes.index(a.group)
            elif d.labels is not None:
                label = d.labels[i]
            else:
                label = None
            group = str(label) if plan.layout == "npz" and label is not None else a.group
            items.append((group, a.split, h, (f.path, i), (fi, i), label, d.gray))
    total = len(plan.files) + len(plan.quarantined)
    shown = _shown(source)
    if not items:
        first = f" (first: {quarantined[0].path}: {quarantined[0].reason})" if quarantined else ""
        raise IngestError(f"nothing usable in {shown}: all {total} files quarantined{first}")
    if len(quarantined) / max(total, 1) > options.max_bad_fraction:
        q = quarantined[0]
        raise IngestError(
            f"{len(quarantined)} of {total} files in {shown} are unusable "
            f"({100 * len(quarantined) / total:.0f}%, limit {100 * options.max_bad_fraction:.0f}%, "
            f"see --max-bad-fraction); first: {q.path}: {q.reason}"
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
    refs: dict[str, list[tuple[int, int]]] = {}
    labels: dict[str, np.ndarray | None] = {}
    for part, idx in sorted(parts_idx.items()):
        idx.sort(key=lambda i: (items[i][0], items[i][3]))
        refs[part] = [items[i][4] for i in idx]
        labels[part] = np.array([items[i][5] for i in idx], dtype=np.int64) if has_labels else None
    arrangement = Arrangement(refs, labels, channels, options.image_size, eight_bit)

    def count(sel):
        c: dict[str, int] = {}
        for i in sel:
            c[items[i][0] or "all"] = c.get(items[i][0] or "all", 0) + 1
        return dict(sorted(c.items()))

    if plan.layout == "classes":
        classes = plan.classes
    elif has_labels:
        classes = [str(c) for c in range(max(it[5] for it in items) + 1)]
    else:
        classes = None
    manifest = Manifest(
        id=plan.snapshot_id,
        name=name,
        source=shown,
        kind="unpaired" if unpaired else "images",
        layout=plan.layout,
        image_size=options.image_size,
        channels=channels,
        pixels="uint8" if eight_bit else "float32",
        preprocessing=options.preprocessing(),
        num_images=len(items),
        counts=count(range(len(items))),
        split_counts={s: count([i for i in range(len(items)) if splits[i] == s]) for s in SPLITS},
        classes=classes,
        domains=Domains("A", "B") if unpaired else None,
        has_truth=False,
        files=files_meta,
        quarantined=quarantined,
    )
    return manifest, arrangement


@dataclass(frozen=True)
class IngestResult:
    """What an ingest returns: the snapshot's summary under the name it was given, where it
    is stored (credentials masked) and whether an earlier ingest had already made it."""

    id: str
    num_images: int
    counts: Mapping[str, int]
    split_counts: Mapping[str, Mapping[str, int]]
    quarantined: tuple[Quarantined, ...]
    layout: str
    image_size: int
    channels: int
    source: str
    name: str
    root: str
    reused: bool

    @classmethod
    def of(cls, manifest: Manifest, name: str, store: Store, reused: bool) -> IngestResult:
        return cls(
            id=manifest.id,
            num_images=manifest.num_images,
            counts=manifest.counts,
            split_counts=manifest.split_counts,
            quarantined=tuple(manifest.quarantined),
            layout=manifest.layout,
            image_size=manifest.image_size,
            channels=manifest.channels,
            source=manifest.source,
            name=name,
            root=_shown(store.url),
            reused=reused,
        )

    def to_dict(self) -> dict:
        """As JSON values, in the order the command line's --json has always printed."""
        return {
            "id": self.id,
            "num_images": self.num_images,
            "counts": dict(self.counts),
            "split_counts": {s: dict(c) for s, c in self.split_counts.items()},
            "quarantined": [{"path": q.path, "reason": q.reason} for q in self.quarantined],
            "layout": self.layout,
            "image_size": self.image_size,
            "channels": self.channels,
            "source": self.source,
            "name": self.name,
            "root": self.root,
            "reused": self.reused,
        }

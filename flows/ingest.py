"""Ingest: raw images wherever they live -> a validated, versioned dataset snapshot.

The pipeline is a chain of plain functions (scan, fetch, plan, decode, assemble, write), run
by :func:`run_pipeline`. ``ingest()`` runs it directly; the Prefect flow
(:mod:`flows.ingest_flow`) runs the same chain with each stage as a task. Both return the
same result dict.

Identity: the snapshot id hashes the content (sha256 of every source file with its class or
domain and given split) and the preprocessing (size, channels, split fraction, resize rule,
layout), never paths, times or names. Re-ingesting unchanged data costs one listing: the
listing's fingerprint (paths, sizes, ETags or mtimes) maps to the id in ``refs/sources``; when
only the listing changed (touched files, a copy elsewhere), files are read and hashed again
but nothing is decoded when the id already exists.

Held-out split (classes, flat and npz layouts, and CycleGAN folders without testA/testB):
within each class or domain, images are ordered by the sha256 of their content and the first
round(test_fraction * n) are held out. The split is thus stratified, stable across machines,
and independent of file names and listing order.
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
from collections.abc import Callable
from dataclasses import dataclass

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
    is_archive,
    is_ignored,
    iter_archive,
)
from flows.settings import ganflow_home
from flows.snapshots import FORMAT_VERSION, Store, check_name, digest
from flows.storage import describe, get_filesystem, is_remote, join, mask_secrets, with_retries

Progress = Callable[[str, int, int], None]
RESIZE_RULE = "bilinear, align_corners=False, antialiased when shrinking, stretched to image_size x image_size"
_READ_BATCH = 256


@dataclass(frozen=True)
class IngestOptions:
    """How raw files become a snapshot. Everything but max_bad_fraction enters the id."""

    layout: str = "auto"
    """auto, classes, cyclegan, flat or npz."""
    image_size: int = 16
    """Side of the square images stored, in pixels."""
    channels: int | None = None
    """1 or 3; None: 1 when every image is grayscale, else 3."""
    test_fraction: float = 0.2
    """Share of every class or domain held out as the test split (when the layout has none)."""
    max_bad_fraction: float = 0.1
    """Fail when more than this share of the files is quarantined."""
    max_archive_bytes: int = 4 << 30
    """Cap on an archive's uncompressed size (decompression bombs)."""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not isinstance(self.image_size, int) or not 4 <= self.image_size <= 1024:
            raise ValueError(f"image_size: must be an integer in 4..1024, got {self.image_size!r}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels: must be 1 or 3, got {self.channels!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: must be in [0, 1), got {self.test_fraction!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction!r}")

    def preprocessing(self) -> dict:
        return {
            "image_size": self.image_size,
            "channels": self.channels or "auto",
            "test_fraction": self.test_fraction,
            "resize": RESIZE_RULE,
            "pixels": "x / 127.5 - 1, float32 in [-1, 1]",
        }


@dataclass(frozen=True)
class Scan:
    """A source's listing: (relative path, size, change token) per file, and its fingerprint."""

    url: str
    entries: tuple[tuple[str, int, str], ...]
    single_file: bool
    fingerprint: str


@dataclass
class Plan:
    layout: str
    files: list[SourceFile]
    assignments: list[Assignment]
    quarantined: list[dict]
    classes: list[str] | None
    snapshot_id: str


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
    return SourceFile(rel, sha, len(data), local)


def plan_snapshot(files: list[SourceFile], options: IngestOptions) -> Plan:
    """Detect the layout, place every file (class/domain, given split), compute the id."""
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
    snapshot_id = digest(
        {
            "format": FORMAT_VERSION,
            "layout": layout,
            "preprocessing": options.preprocessing(),
            "items": sorted([f.sha256, a.group, a.split or ""] for f, a in zip(kept, assignments)),
        }
    )[:20]
    return Plan(layout, kept, assignments, quarantined, classes, snapshot_id)


def decode_plan(
    plan: Plan, image_size: int, workers: int = 0, progress: Progress | None = None
) -> list[Decoded | str]:
    """Decoded files (or quarantine reasons) in plan order, every image shrunk to the stored
    size as it arrives, so memory follows the output, not the source."""
    cb = (lambda done, total: progress("decode", done, total)) if progress else None
    return decode_files(
        [(f.path, f) for f in plan.files],
        workers=workers,
        progress=cb,
        finish=lambda d: shrink(d, image_size),
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


def shrink(d: Decoded, size: int) -> Decoded:
    """The resize rule applied at decode time: images become [size, size, c] float32 in
    [-1, 1], channels kept (the snapshot's channel count is known only once all are seen;
    luma and resize are both linear, so converting channels afterwards gives the same)."""
    from gan_core.data import resize

    out: list[np.ndarray] = list(d.images)
    for idx in _by_shape(d.images):
        t = resize(_pixels(np.stack([d.images[i] for i in idx])), size)
        for j, i in enumerate(idx):
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


def assemble(
    plan: Plan, decoded: list[Decoded | str], options: IngestOptions, source: str, name: str
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Validate, split and resize: the manifest (without shards) and the arrays per part."""
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

    # Held-out split: per group, by content hash (stable, stratified, name-independent).
    splits: list[str] = [""] * len(items)
    by_group: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it[1] is not None:
            splits[i] = it[1]
        else:
            by_group.setdefault(it[0], []).append(i)
    for idx in by_group.values():
        idx.sort(key=lambda i: (items[i][2], items[i][3]))
        n_test = round(len(idx) * options.test_fraction)
        for rank, i in enumerate(idx):
            splits[i] = "test" if rank < n_test else "train"

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
            s: count([i for i in range(len(items)) if splits[i] == s]) for s in ("train", "test")
        },
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
        decoded = call("decode", decode_plan, plan, options.image_size, workers, progress)
    manifest, parts = call("assemble", assemble, plan, decoded, options, scan.url, name)
    manifest = call("write", store.write_snapshot, manifest, parts)
    call("refs", store.add_refs, manifest, name, scan.fingerprint)
    return _result(manifest, name, store, reused=False)


def ingest(source: str, **kwargs) -> dict:
    """Ingest without Prefect (same stages, same result); see run_pipeline for arguments."""
    return run_pipeline(source, **kwargs)


def ingest_builtin(
    ref: str, options: IngestOptions, root: str | None = None, name: str | None = None
) -> dict:
    """A built-in dataset as a snapshot whose tensors equal gan_core's load_builtin exactly."""
    from gan_core.data import BUILTIN_DATASETS, load_builtin

    if ref not in BUILTIN_DATASETS:
        raise IngestError(f"unknown built-in dataset {ref!r}; known: {', '.join(BUILTIN_DATASETS)}")
    if options.channels not in (None, 1):
        raise IngestError(f"{ref} has 1 channel; --channels {options.channels} is not supported")
    store = Store(root)
    name = check_name(name or default_name(ref))
    fingerprint = digest({"format": FORMAT_VERSION, "builtin": ref, "size": options.image_size})
    hit = store.source_ref(fingerprint)
    if hit is not None:
        store.add_refs(hit, name, None)
        return _result(hit, name, store, reused=True)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for split in ("train", "test"):
        data = load_builtin(ref, options.image_size, split)
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
            "image_size": options.image_size,
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

        split_counts = {s: counts(s) for s in ("train", "test")}
        total = {
            k: split_counts["train"].get(k, 0) + split_counts["test"].get(k, 0)
            for k in split_counts["train"]
        }
        manifest = store.write_snapshot(
            {
                "format": FORMAT_VERSION,
                "id": snapshot_id,
                "name": name,
                "source": ref,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kind": "unpaired" if unpaired else "images",
                "layout": "cyclegan" if unpaired else "classes",
                "image_size": options.image_size,
                "channels": 1,
                "preprocessing": {
                    "image_size": options.image_size,
                    "builtin": "gan_core.data.load_builtin",
                },
                "num_images": sum(total.values()),
                "counts": total,
                "split_counts": split_counts,
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
        for q in result["quarantined"]:
            print(f"  quarantined {q['path']}: {q['reason']}")
    return {
        k: result[k]
        for k in ("id", "name", "num_images", "counts", "quarantined", "reused", "layout")
    }


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
        "--image-size", type=int, default=16, help="stored image side in pixels (default: 16)"
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="default: 1 if all images are grayscale, else 3",
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="held-out share per class (default: 0.2)"
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

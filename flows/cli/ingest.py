"""`ganflow ingest` and `ganflow datasets`: the command line of ingestion."""

from __future__ import annotations

import argparse
import sys
import time

from flows.ingest.cluster import CLUSTER_CHOICES
from flows.ingest.layouts import (
    LAYOUTS,
    IngestError,
)
from flows.ingest.runner import ingest
from flows.ingest.stages import (
    AUTO_IMAGE_SIZE_CAP,
    BUILTIN_IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    RESIZE_RULES,
    IngestOptions,
    _shown,
)
from flows.snapshots.manifest import SPLITS
from flows.snapshots.store import Store

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
    if args.workers < 0:
        raise IngestError(f"--workers must be >= 0 (0: min(cpus, 8)), got {args.workers}")
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
        cluster=args.cluster,
    )
    if args.no_prefect:
        result = ingest(args.source, **kwargs)
    else:
        from flows.orchestration.ingest import run_flow

        result = run_flow(args.source, debug=args.debug, **kwargs)
    if not args.json:
        r = result
        verb = "unchanged" if r.reused else "created"
        counts = ", ".join(f"{k}={v}" for k, v in r.counts.items())
        print(f"snapshot {r.id} ({r.name}) {verb}: {r.num_images} images [{counts}]")
        print(f"  layout {r.layout}, {r.image_size}px x {r.channels} ch, in {r.root}")
        sizes = {s: sum(r.split_counts.get(s, {}).values()) for s in SPLITS}
        print("  splits " + ", ".join(f"{s} {n}" for s, n in sizes.items()))
        for q in r.quarantined:
            print(f"  quarantined {q.path}: {q.reason}")
    out = result.to_dict()
    keys = ("id", "name", "num_images", "counts", "split_counts", "quarantined", "reused")
    return {k: out[k] for k in (*keys, "layout", "image_size")}


DATASET_COLUMNS = (
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


def cmd_datasets(args: argparse.Namespace) -> dict:
    store = Store(args.root)
    store.check_root()
    rows = [{k: d[k] for k in DATASET_COLUMNS} for d in (m.to_dict() for m in store.list())]
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
        "--workers",
        type=int,
        default=0,
        help="decode processes of a local ingest (default: min(cpus, 8))",
    )
    p.add_argument(
        "--cluster",
        choices=CLUSTER_CHOICES,
        default="auto",
        help="read and decode on the Ray cluster's workers: auto (default) when RAY_ADDRESS is "
        "set; yes always (without RAY_ADDRESS: a local Ray on this machine); no never. A local "
        "source must then be on a filesystem every node mounts at the same path",
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

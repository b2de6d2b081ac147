"""Reading snapshots: resolve a reference (id or name) to its manifest, list them, load a
split as gan_core data. Reads only: making snapshots is flows.ingest's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from flows.snapshots.manifest import SPLITS, Manifest
from flows.snapshots.store import Store

if TYPE_CHECKING:  # torch is imported when data is loaded: the CLI imports this module
    from gan_core.data import ImageSet, UnpairedSet


# ---------------------------------------------------------------------------------------------
# The interface training uses.


def resolve_snapshot(ref: str, root: str | None = None) -> Manifest:
    """The manifest for a snapshot id, or the latest snapshot of a name. SnapshotNotFound
    when neither exists, SnapshotOutdated when it was written in an older format."""
    return Store(root).resolve(ref)


def list_snapshots(root: str | None = None) -> list[Manifest]:
    """Every complete snapshot (manifest present) of this format in a root, oldest first."""
    return Store(root).list()


def _open_part(
    store: Store, manifest: Manifest, split: str, part: str, first_shard: bool = False
) -> tuple[ImageSet, object]:
    """One part of a split as stored rows read from this node's verified local copy, and its
    truth rows (built-in pairs) or None; labels (8 bytes a row) are read into memory."""
    import torch

    from flows.snapshots.cache import local_shards
    from gan_core.data import ImageSet, StoredRows

    shards = manifest.shards_of(split, part)
    if first_shard:
        shards = [s for s in shards if s.shard == 0]
    if not shards:  # an empty split (val_fraction 0)
        s = manifest.image_size
        return ImageSet(torch.zeros(0, manifest.channels, s, s)), None
    paths = local_shards(store, manifest, [s.file for s in shards])
    by_array: dict[str, list[str]] = {}
    for s in sorted(shards, key=lambda s: (s.array, s.shard)):
        by_array.setdefault(s.array, []).append(paths[s.file])
    labels = None
    if "labels" in by_array:
        labels = torch.from_numpy(
            np.concatenate([np.load(p, allow_pickle=False) for p in by_array["labels"]])
        )
    truth = StoredRows(by_array["truth"]) if "truth" in by_array else None
    return ImageSet(StoredRows(by_array["images"]), labels), truth


def open_dataset(
    ref: str,
    split: str = "train",
    root: str | None = None,
    *,
    image_size: int | None = None,
    first_shard: bool = False,
) -> ImageSet | UnpairedSet:
    """A snapshot's split ('train', 'val' or 'test') as gan_core data whose images are read
    by index from the node's verified local copy (gan_core.data.StoredRows): nothing is
    loaded whole. ImageSet (labels when the layout has classes) or, for CycleGAN layouts,
    UnpairedSet (x_truth only for built-in pairs, whose truth is known). An empty split
    (val_fraction 0) is an empty set.

    ref: snapshot id or name (its latest snapshot); callers resolve other references
    (``builtin:`` datasets, sources) first, with flows.ingest.ensure_snapshot. image_size: a
    check that the snapshot has that size. first_shard: only each part's first shard (a few
    thousand rows: what a dry run needs, without fetching the split). Same behaviour for local and s3:// roots (remote
    shards are fetched once per node, flows.snapshots.cache). A snapshot of another format is
    refused (SnapshotOutdated), not read.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    store = Store(root)
    manifest = store.resolve(ref)
    if image_size is not None and image_size != manifest.image_size:
        raise ValueError(
            f"snapshot {manifest.id} ({ref}) holds {manifest.image_size}px images, "
            f"not {image_size}px; ingest the source again with --image-size {image_size}"
        )
    if manifest.kind == "unpaired":
        from gan_core.data import UnpairedSet

        x, truth = _open_part(store, manifest, split, "x", first_shard)
        y, _ = _open_part(store, manifest, split, "y", first_shard)
        return UnpairedSet(x, y, truth)
    return _open_part(store, manifest, split, "data", first_shard)[0]


def load_dataset(
    ref: str,
    split: str = "train",
    root: str | None = None,
    *,
    image_size: int | None = None,
    limit: int | None = None,
    first_shard: bool = False,
) -> ImageSet | UnpairedSet:
    """:func:`open_dataset`'s split in memory as float32 in [-1, 1]: all of it, or at most
    ``limit`` rows spaced evenly over it (per domain for CycleGAN), which is how evaluation
    and the judge bound their memory on large snapshots."""
    from gan_core.data import in_memory

    data = open_dataset(ref, split, root, image_size=image_size, first_shard=first_shard)
    return in_memory(data, limit)


def lineage(manifest: Manifest) -> dict[str, str]:
    """What an MLflow run records about its dataset input (params/tags, flat strings)."""
    return {
        "dataset.id": manifest.id,
        "dataset.name": manifest.name,
        "dataset.source": manifest.source,
        "dataset.num_images": str(manifest.num_images),
        "dataset.image_size": str(manifest.image_size),
    }

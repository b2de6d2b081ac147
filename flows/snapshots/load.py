"""Reading snapshots: resolve a reference (id or name) to its manifest, list them, load a
split as gan_core data. Reads only: making snapshots is flows.ingest's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from flows.snapshots.store import SPLITS, Store

if TYPE_CHECKING:  # torch is imported when data is loaded: the CLI imports this module
    from gan_core.data import ImageSet, UnpairedSet


# ---------------------------------------------------------------------------------------------
# The interface training uses.


def resolve_snapshot(ref: str, root: str | None = None) -> dict:
    """The manifest for a snapshot id, or the latest snapshot of a name. SnapshotNotFound
    when neither exists, SnapshotOutdated when it was written in an older format."""
    return Store(root).resolve(ref)


def list_snapshots(root: str | None = None) -> list[dict]:
    """Every complete snapshot (manifest present) in a root, oldest first."""
    return Store(root).list()


def _image_set(arrays: dict[str, np.ndarray], manifest: dict) -> ImageSet:
    import torch

    from gan_core.data import ImageSet

    if "images" not in arrays:  # an empty split
        s = manifest["image_size"]
        return ImageSet(torch.zeros(0, manifest["channels"], s, s))
    labels = torch.from_numpy(arrays["labels"]) if "labels" in arrays else None
    return ImageSet(torch.from_numpy(arrays["images"]), labels)


def load_dataset(
    ref: str, split: str = "train", root: str | None = None, *, image_size: int | None = None
) -> ImageSet | UnpairedSet:
    """A snapshot's split ('train', 'val' or 'test') as gan_core data: ImageSet (labels when
    the layout has classes) or, for CycleGAN layouts, UnpairedSet (x_truth only for built-in
    pairs, whose truth is known). An empty split (val_fraction 0) is an empty set.

    ref: snapshot id or name (its latest snapshot); callers resolve other references
    (``builtin:`` datasets, sources) first, with flows.ingest.ensure_snapshot. image_size: a
    check that the snapshot has that size. Same behaviour for local and s3:// roots. A
    snapshot of an older format is refused (SnapshotOutdated), not read.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    store = Store(root)
    manifest = store.resolve(ref)
    if image_size is not None and image_size != manifest["image_size"]:
        raise ValueError(
            f"snapshot {manifest['id']} ({ref}) holds {manifest['image_size']}px images, "
            f"not {image_size}px; ingest the source again with --image-size {image_size}"
        )
    if manifest["kind"] == "unpaired":
        import torch

        from gan_core.data import UnpairedSet

        x = store.read_part(manifest, split, "x")
        y = store.read_part(manifest, split, "y")
        truth = torch.from_numpy(x["truth"]) if "truth" in x else None
        return UnpairedSet(_image_set(x, manifest), _image_set(y, manifest), truth)
    return _image_set(store.read_part(manifest, split, "data"), manifest)


def lineage(manifest: dict) -> dict:
    """What an MLflow run records about its dataset input (params/tags, flat strings)."""
    return {
        "dataset.id": manifest["id"],
        "dataset.name": manifest["name"],
        "dataset.source": manifest["source"],
        "dataset.num_images": str(manifest["num_images"]),
        "dataset.image_size": str(manifest["image_size"]),
    }

"""Built-in datasets (scikit-learn's digits) as snapshots, so they get ids and lineage like any
other data."""

from __future__ import annotations

import hashlib

import numpy as np

from flows.ingest.layouts import (
    IngestError,
)
from flows.ingest.stages import (
    BUILTIN_IMAGE_SIZE,
    PIXELS_UINT8,
    IngestOptions,
    IngestResult,
    default_name,
)
from flows.snapshots.manifest import FORMAT_VERSION, SPLITS, Domains, Manifest
from flows.snapshots.store import Store, check_name, digest


def ingest_builtin(
    ref: str, options: IngestOptions, root: str | None = None, name: str | None = None
) -> IngestResult:
    """A built-in dataset as a snapshot whose images are gan_core's load_builtin stored in 8
    bits (gan_core.data.to_uint8: read back, each pixel is within 1/255 of it), split for
    split (train, val, test). Stored at options.image_size, 16 px when auto; the
    splits are gan_core's fixed ones, so the fractions and resize_mode options do not apply."""
    from gan_core.data import BUILTIN_DATASETS, load_builtin, to_uint8

    def u8(t) -> np.ndarray:
        return to_uint8(t).numpy()

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
        return IngestResult.of(hit, name, store, reused=True)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for split in SPLITS:
        data = load_builtin(ref, size, split)
        if hasattr(data, "x_truth"):
            parts[f"{split}-x"] = {
                "images": u8(data.x.images),
                "labels": data.x.labels.numpy(),
                "truth": u8(data.x_truth),
            }
            parts[f"{split}-y"] = {"images": u8(data.y.images), "labels": data.y.labels.numpy()}
        else:
            parts[split] = {"images": u8(data.images), "labels": data.labels.numpy()}
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
            Manifest(
                id=snapshot_id,
                name=name,
                source=ref,
                kind="unpaired" if unpaired else "images",
                layout="cyclegan" if unpaired else "classes",
                image_size=size,
                channels=1,
                pixels="uint8",
                preprocessing={
                    "image_size": size,
                    "builtin": "gan_core.data.load_builtin",
                    "pixels": PIXELS_UINT8,
                },
                num_images=sum(total.values()),
                counts=total,
                split_counts=split_counts,
                classes=[str(c) for c in range(10)],
                domains=Domains("digits", "appearance_transform(digits)") if unpaired else None,
                has_truth=unpaired,
                content_sha256=content.hexdigest(),
            ),
            parts,
        )
        reused = False
    else:
        reused = True
    store.add_refs(manifest, name, fingerprint)
    return IngestResult.of(manifest, name, store, reused=reused)

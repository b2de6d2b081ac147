"""The snapshot store: versioned, content-addressed datasets that training reads.

store (layout, atomic writes, manifests and refs) and load (resolve, list, read a split).
Imports nothing from flows.ingest: snapshots are read here and written there.
"""

from flows.snapshots.load import lineage, list_snapshots, load_dataset, resolve_snapshot
from flows.snapshots.store import (
    FORMAT_VERSION,
    SPLITS,
    SnapshotNotFound,
    SnapshotOutdated,
    Store,
    check_format,
    check_name,
    digest,
    npy_bytes,
)

__all__ = [
    "FORMAT_VERSION",
    "SPLITS",
    "SnapshotNotFound",
    "SnapshotOutdated",
    "Store",
    "check_format",
    "check_name",
    "digest",
    "lineage",
    "list_snapshots",
    "load_dataset",
    "npy_bytes",
    "resolve_snapshot",
]

"""The snapshot store: versioned, content-addressed datasets that training reads.

manifest (the Manifest type: built, written, read and checked there only), store (layout,
atomic writes and refs) and load (resolve, list, read a split).
Imports nothing from flows.ingest: snapshots are read here and written there.
"""

from flows.snapshots.load import lineage, list_snapshots, load_dataset, resolve_snapshot
from flows.snapshots.manifest import (
    FORMAT_VERSION,
    SPLITS,
    Manifest,
    Shard,
    SnapshotOutdated,
    check_format,
)
from flows.snapshots.store import (
    SnapshotNotFound,
    Store,
    check_name,
    digest,
    npy_bytes,
)

__all__ = [
    "FORMAT_VERSION",
    "SPLITS",
    "Manifest",
    "Shard",
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

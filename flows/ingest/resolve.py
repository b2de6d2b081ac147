"""The one resolver: any dataset reference a user can write -> a snapshot manifest.

Training and search take a resolved manifest: only the commands and flows (flows.cli,
flows.orchestration, and the benchmarks above them) resolve references here, once, on the
driver; workers then load by id and never race to ingest.
"""

from __future__ import annotations

import os

from flows.settings import snapshot_root
from flows.snapshots.load import resolve_snapshot
from flows.snapshots.manifest import Manifest
from flows.snapshots.store import SnapshotNotFound


def ensure_snapshot(ref: str, root: str | None = None, image_size: int | None = None) -> Manifest:
    """The manifest for ref: a snapshot id or name; ``builtin:NAME`` (ingested now, at
    image_size or 16 px; a no-op when already there); or a source (a local path, an archive,
    ``s3://bucket/prefix``), ingested at image_size or its own resolution (a no-op when its
    content was ingested before)."""
    from flows.ingest.stages import IngestOptions

    root = root or snapshot_root()
    if ref.startswith("builtin:"):
        from flows.ingest.builtin import ingest_builtin

        result = ingest_builtin(ref, IngestOptions(image_size=image_size or 16), root=root)
        return resolve_snapshot(result.id, root)
    try:
        return resolve_snapshot(ref, root)
    except SnapshotNotFound:
        if "/" not in ref and "://" not in ref:
            raise
    from flows.ingest.runner import ingest

    options = IngestOptions(image_size=image_size) if image_size else IngestOptions()
    return resolve_snapshot(ingest(ref, options=options, root=root).id, root)


def check_reference(ref: str, root: str | None = None) -> None:
    """What :func:`ensure_snapshot` would meet first, found without ingesting: a snapshot id
    or name that is not there (SnapshotNotFound), or a local source that does not exist
    (FileNotFoundError, "source not found: REF"). Built-ins and remote sources pass: a
    remote source is checked when it is read. Lets a pipeline refuse a bad reference before
    any work, by the resolver's own rules."""
    if ref.startswith("builtin:") or ("://" in ref and not ref.startswith("file://")):
        return
    try:
        resolve_snapshot(ref, root or snapshot_root())
        return
    except SnapshotNotFound:
        if "/" not in ref:  # not a path: a snapshot name that is not there
            raise
    if not os.path.exists(os.path.expanduser(ref.removeprefix("file://"))):
        raise FileNotFoundError(f"source not found: {ref}")

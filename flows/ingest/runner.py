"""The ingest pipeline run directly (the Prefect flow in flows.orchestration.ingest runs the
same stages as tasks): scan, fetch, plan, decode, assemble, write. Both return the same
:class:`IngestResult`. With a Ray cluster (``cluster``, auto: RAY_ADDRESS set), fetch and decode run as
Ray tasks (flows.ingest.cluster); the other stages, the write included, stay here."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable

from flows.ingest.builtin import ingest_builtin
from flows.ingest.cluster import (
    decode_on_cluster,
    fetch_on_cluster,
    runs_on_cluster,
    use_cluster,
    write_on_cluster,
)
from flows.ingest.layouts import IngestError
from flows.ingest.stages import (
    IngestOptions,
    IngestResult,
    Progress,
    arrange,
    assemble,
    decode_plan,
    default_name,
    fetch_source,
    plan_snapshot,
    scan_source,
)
from flows.settings import ganflow_home
from flows.snapshots.store import STALE_S, Store, check_name

Call = Callable[..., object]


def _direct(stage: str, fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def run_pipeline(
    source: str,
    *,
    name: str | None = None,
    options: IngestOptions | None = None,
    root: str | None = None,
    workers: int = 0,
    progress: Progress | None = None,
    call: Call = _direct,
    cluster: str | bool | None = None,
) -> IngestResult:
    """Source -> snapshot. ``call(stage, fn, *args)`` runs each stage (directly, or as a task).
    ``cluster``: fetch and decode on the Ray cluster: None or "auto" when RAY_ADDRESS is set,
    "yes" always (a local Ray without RAY_ADDRESS), "no" never; a single-file source is
    always fetched and decoded here. ``workers`` is the local decode's processes."""
    options = options or IngestOptions()
    wanted = use_cluster(cluster)
    name = check_name(name or default_name(source))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise IngestError(f"--workers must be an integer >= 0 (0: min(cpus, 8)), got {workers!r}")
    store = Store(root)
    call("check-root", store.check_root)
    if source.startswith("builtin:"):
        return call("ingest-builtin", ingest_builtin, source, options, store.url, name)
    scan = call("scan", scan_source, source, options)
    hit = call("lookup", store.source_ref, scan.fingerprint)
    if hit is not None:
        call("refs", store.add_refs, hit, name, None)
        _sweep(store)
        return IngestResult.of(hit, name, store, reused=True)
    spool_root = ganflow_home() / "tmp"
    spool_root.mkdir(parents=True, exist_ok=True)
    on_cluster = wanted and runs_on_cluster(scan)
    with tempfile.TemporaryDirectory(prefix="ingest-", dir=spool_root) as spool:
        if on_cluster:  # nothing is spooled: workers read the source where it lives
            files = call("fetch", fetch_on_cluster, scan, progress)
        else:
            files = call("fetch", fetch_source, scan, options, spool, progress)
        plan = call("plan", plan_snapshot, files, options, scan.skipped)
        existing = call("lookup", store.manifest, plan.snapshot_id)
        if existing is not None:
            call("refs", store.add_refs, existing, name, scan.fingerprint)
            _sweep(store)
            return IngestResult.of(existing, name, store, reused=True)
        if on_cluster:
            decoded = call("decode", decode_on_cluster, plan, progress)
        else:
            decoded = call("decode", decode_plan, plan, workers, progress)
    if on_cluster:
        # Pixels never come to the driver: they go from the decode tasks to the write tasks
        # through Ray's object store; the driver arranges from metadata and writes the manifest.
        manifest, layout = call("assemble", arrange, plan, decoded.metas, scan.url, name)
        manifest = call("write", write_on_cluster, store, manifest, layout, decoded, progress)
    else:
        manifest, parts = call("assemble", assemble, plan, decoded, scan.url, name)
        manifest = call("write", store.write_snapshot, manifest, parts)
    call("refs", store.add_refs, manifest, name, scan.fingerprint)
    _sweep(store)
    return IngestResult.of(manifest, name, store, reused=False)


def _sweep(store: Store) -> None:
    """After a successful ingest: remove what killed ingests left (Store.sweep), and their
    spool folders, an hour old or more (younger ones may belong to an ingest at work)."""
    store.sweep()
    spool_root = ganflow_home() / "tmp"
    if not spool_root.is_dir():
        return
    cutoff = time.time() - STALE_S
    for spool in spool_root.glob("ingest-*"):
        with contextlib.suppress(OSError):
            if spool.is_dir() and not spool.is_symlink() and spool.stat().st_mtime < cutoff:
                shutil.rmtree(spool, ignore_errors=True)


def ingest(source: str, **kwargs) -> IngestResult:
    """Ingest without Prefect (same stages, same result); see run_pipeline for arguments."""
    return run_pipeline(source, **kwargs)

"""The Prefect flow behind `ganflow ingest`: the stages of flows.ingest, each a task.

Imported only when a flow runs (Prefect is slow to import). Without PREFECT_API_URL the flow
runs against Prefect's ephemeral local server; deployments point PREFECT_API_URL at a server
and schedule ``ingest_flow`` with the same parameters as the command line.

Storage calls already retry transient errors with backoff (flows.storage.with_retries); the
read and write tasks add one more, slower layer of task retries for longer outages, limited
to transient errors so a wrong path or bad credentials fail at once.
"""

from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.ingest.runner import run_pipeline
from flows.ingest.stages import IngestOptions, IngestResult, Progress
from flows.storage import is_transient

_progress: ContextVar[Progress | None] = ContextVar("ganflow_ingest_progress", default=None)
_RETRIED_STAGES = {"scan", "fetch", "write", "refs"}


def _retry_transient(task_, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def _stage(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _as_task(stage: str, fn, *args, **kwargs):
    # No caching and no result persistence: stages pass file lists and arrays in memory, and
    # hashing them for a cache key would cost as much as the stage.
    retries = 2 if stage in _RETRIED_STAGES else 0
    t = task(
        _stage,
        name=f"ingest-{stage}",
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=retries,
        retry_delay_seconds=[2, 8],
        retry_condition_fn=_retry_transient,
    )
    return t(fn, *args, **kwargs)


@flow(name="ganflow-ingest", persist_result=False, validate_parameters=True)
def ingest_flow(
    source: str,
    name: str | None = None,
    layout: str = "auto",
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.2,
    max_bad_fraction: float = 0.1,
    root: str | None = None,
    workers: int = 0,
    resize_mode: str = "crop",
    val_fraction: float = 0.1,
    cluster: str = "auto",
) -> IngestResult:
    """Raw images at ``source`` -> a snapshot in ``root``; returns the snapshot summary.
    Parameters are IngestOptions' (image_size None: the source's resolution); ``cluster``:
    fetch and decode on the Ray cluster, auto (when RAY_ADDRESS is set), yes or no."""
    from prefect.artifacts import create_markdown_artifact

    from flows.orchestration.reports import artifact_key, ingest_markdown

    options = IngestOptions(
        layout=layout,
        image_size=image_size,
        channels=channels,
        test_fraction=test_fraction,
        max_bad_fraction=max_bad_fraction,
        resize_mode=resize_mode,
        val_fraction=val_fraction,
    )
    result = run_pipeline(
        source,
        name=name,
        options=options,
        root=root,
        workers=workers,
        progress=_progress.get(),
        call=_as_task,
        cluster=cluster,
    )
    create_markdown_artifact(
        ingest_markdown(result),
        key=artifact_key("ganflow-ingest", result.name),
        description="the snapshot: counts per class or domain and the quarantine report",
    )
    return result


@contextlib.contextmanager
def _quiet_prefect(enabled: bool):
    """Prefect logs failures with tracebacks to the console; the CLI prints one line instead
    (the flow run in the Prefect UI/API keeps the full record)."""
    logger = logging.getLogger("prefect")
    old = logger.level
    if enabled:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def run_flow(
    source: str,
    *,
    name: str | None = None,
    options: IngestOptions | None = None,
    root: str | None = None,
    workers: int = 0,
    progress: Progress | None = None,
    debug: bool = False,
    cluster: str = "auto",
) -> IngestResult:
    """Run ingest_flow with CLI-style arguments; raises the stage's own exception on failure."""
    o = options or IngestOptions()
    token = _progress.set(progress)
    try:
        with _quiet_prefect(not debug):
            return ingest_flow(
                source,
                name=name,
                layout=o.layout,
                image_size=o.image_size,
                channels=o.channels,
                test_fraction=o.test_fraction,
                max_bad_fraction=o.max_bad_fraction,
                root=root,
                workers=workers,
                resize_mode=o.resize_mode,
                val_fraction=o.val_fraction,
                cluster=cluster,
            )
    finally:
        _progress.reset(token)

"""Ingest: raw images wherever they live -> validated, versioned dataset snapshots.

layouts (what a folder means) -> stages (scan, fetch, plan, decode, assemble) -> runner (the
chain, run directly) and builtin (the built-in digits); cluster runs fetch and decode as Ray
tasks when a Ray cluster is configured (RAY_ADDRESS); resolve.ensure_snapshot turns any
dataset reference into a snapshot. The Prefect flow is flows.orchestration.ingest.
"""

from flows.ingest.builtin import ingest_builtin
from flows.ingest.layouts import IngestError
from flows.ingest.resolve import ensure_snapshot
from flows.ingest.runner import ingest, run_pipeline
from flows.ingest.stages import IngestOptions, IngestResult

__all__ = [
    "IngestError",
    "IngestOptions",
    "IngestResult",
    "ensure_snapshot",
    "ingest",
    "ingest_builtin",
    "run_pipeline",
]

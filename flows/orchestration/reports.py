"""What a person reads after a flow run: Markdown summaries of an ingest, a training run and
a search, recorded as Prefect artifacts by the flows (the retraining summary lives in
flows/orchestration/retraining.py). Plain functions of the results, so they are tested without Prefect."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.ingest.stages import IngestResult
    from flows.train.spec import TrainResult
    from flows.tune.summary import SearchResult

_MAX_ROWS = 100  # a quarantine of thousands of files is summarised, not pasted


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from free text."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key[:100] or "ganflow"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _cell(v) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def ingest_markdown(r: IngestResult) -> str:
    state = "reused (unchanged source)" if r.reused else "new"
    lines = [
        f"# Snapshot `{r.name}` ({state})",
        "",
        f"- id: `{r.id}`",
        f"- source: `{r.source}` ({r.layout} layout)",
        f"- stored in: `{r.root}`",
        f"- images: {r.num_images} at {r.image_size}x{r.image_size}, {r.channels} channel(s)",
        "",
        "| class / domain | train | val | test | total |",
        "|---|---|---|---|---|",
    ]
    split = r.split_counts
    for group, n in r.counts.items():
        train, val, test = (split.get(s, {}).get(group, 0) for s in ("train", "val", "test"))
        lines.append(f"| {_cell(group)} | {train} | {val} | {test} | {n} |")
    q = r.quarantined
    lines += ["", f"## Quarantined: {len(q)} file(s)"]
    if q:
        lines += ["", "| path | reason |", "|---|---|"]
        lines += [f"| {_cell(e.path)} | {_cell(e.reason)} |" for e in q[:_MAX_ROWS]]
        if len(q) > _MAX_ROWS:
            lines.append(f"| ... and {len(q) - _MAX_ROWS} more | |")
    return "\n".join(lines)


def train_markdown(r: TrainResult, tracking_uri: str) -> str:
    lines = [
        f"# Training run `{r.run_name}` ({r.family})",
        "",
        f"- MLflow run: `{r.run_id}` at `{tracking_uri}`",
        f"- snapshot: `{r.snapshot_id}`",
        f"- iterations: {r.steps}",
        f"- checkpoint: `{r.checkpoint}`",
        "",
        "| held-out metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_cell(v)} |" for k, v in sorted(r.metrics.items())]
    return "\n".join(lines)


def search_markdown(r: SearchResult) -> str:
    keys = sorted({k for t in r.trials for k in t.config})
    short = [k.split(".")[-1] for k in keys]
    lines = [
        f"# Search `{r.name}`: {len(r.trials)} trials, {r.metric} ({r.mode})",
        "",
        "| trial | " + " | ".join(short) + f" | {r.metric} | iterations | status |",
        "|---|" + "---|" * len(keys) + "---|---|---|",
    ]
    # The gate's reasons are a sentence each: listed under the table, so its rows stay short.
    failed = []
    for t in r.trials:
        status = "error" if t.error else "stopped early" if t.stopped_early else "completed"
        if t.gate and not t.error:
            status += ", fails gate"
            failed.append(t)
        cells = [_cell(t.config.get(k, "")) for k in keys]
        metric = "-" if t.metric is None else _cell(t.metric)
        lines.append(
            f"| {t.trial_id} | " + " | ".join(cells) + f" | {metric} | {t.step} | {status} |"
        )
    if failed:
        lines += ["", "Failing the gate (never the best, whatever their metric):", ""]
        lines += [f"- {t.trial_id}: {t.gate}" for t in failed]
    b = r.best
    done = [t for t in r.trials if not t.error and not t.stopped_early]
    if b is None and done and all(t.gate for t in done):
        lines += ["", "Best: none; no completed trial passed the gate."]
    elif b is None:
        lines += ["", "Best: no trial completed."]
    else:
        cfg = ", ".join(f"{k}={_fmt(v)}" for k, v in b.config.items())
        lines += [
            "",
            f"Best: {cfg} with {b.metric_name} = {_fmt(b.metric)} "
            f"(MLflow run `{b.run_id}`, checkpoint `{b.checkpoint}`).",
        ]
    return "\n".join(lines)

"""A finished search summarised: trial table, best trial, the MLflow parent run with the
metric-vs-(λ, k) picture, and result files under GANFLOW_HOME/searches."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flows.settings import ganflow_home
from flows.tune.request import SearchRequest, trial_params
from gan_core.evaluate import gate_failure


@dataclass(frozen=True)
class Trial:
    """One trial of a search: its sampled config, the val metric of its best step, the step
    it reached, how it ended (``gate``: why its figures fail promotion's gate, ``error``: one
    line) and its checkpoint; ``schedule`` for a PBT trial (its hyperparameters per step)."""

    trial_id: str | None
    config: Mapping[str, Any]
    metric: float | None
    step: int
    stopped_early: bool
    gate: str | None
    error: str | None
    checkpoint: str | None
    schedule: Any = None
    """PBT: [[first step, {field: value}], ...] as the trial reported it."""

    @property
    def completed(self) -> bool:
        return self.error is None and not self.stopped_early

    def to_dict(self) -> dict:
        out = {
            "trial_id": self.trial_id,
            "config": dict(self.config),
            "metric": self.metric,
            "step": self.step,
            "stopped_early": self.stopped_early,
            "gate": self.gate,
            "error": self.error,
            "checkpoint": self.checkpoint,
        }
        if self.schedule:
            out["schedule"] = self.schedule
        return out


@dataclass(frozen=True)
class BestTrial:
    """The search's winner: its config (also as ``overrides``, which ``ganflow train --set``
    and the retraining flow take as they are), its val metric and its run and checkpoint."""

    config: Mapping[str, Any]
    metric: float
    metric_name: str
    mode: str
    checkpoint: str | None
    trial_id: str | None
    run_id: str | None = None
    schedule: Any = None

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.config)

    def to_dict(self) -> dict:
        out = {
            "config": dict(self.config),
            "overrides": self.overrides,
            "metric": self.metric,
            "metric_name": self.metric_name,
            "mode": self.mode,
            "checkpoint": self.checkpoint,
            "trial_id": self.trial_id,
            "run_id": self.run_id,
        }
        if self.schedule:
            out["schedule"] = self.schedule
        return out


@dataclass(frozen=True)
class SearchResult:
    """A finished search: its name and storage path, the metric (val_<primary>) and mode
    trials were ranked by, every trial, and the best (None: no trial completed and passed
    the gate)."""

    name: str
    path: str
    metric: str
    mode: str
    trials: tuple[Trial, ...]
    best: BestTrial | None

    def trial(self, trial_id: str | None) -> Trial | None:
        return next((t for t in self.trials if t.trial_id == trial_id), None)

    def to_dict(self) -> dict:
        """As JSON values: result.json and `ganflow tune --json`, keys as they have always been."""
        return {
            "name": self.name,
            "path": self.path,
            "metric": self.metric,
            "mode": self.mode,
            "trials": [t.to_dict() for t in self.trials],
            "best": None if self.best is None else self.best.to_dict(),
        }


def _summarise(
    req: SearchRequest,
    name: str,
    grid,
    metric: str,
    mode: str,
    steps: int,
    parent: str | None,
    uri: str | None,
    path: str,
) -> SearchResult:
    trials = []
    for r in grid:
        params = trial_params(r.config or {})
        m = r.metrics or {}
        reached = int(m.get("step", 0))
        trials.append(
            Trial(
                trial_id=m.get("trial_id"),
                config=params,
                metric=m.get(metric),
                step=reached,
                stopped_early=r.error is None and reached < steps,
                # The val figures must pass the gate promotion applies, or the trial
                # cannot be the best (a cGAN that ignores its labels, say).
                gate=gate_failure(m, prefix="val_"),
                error=None if r.error is None else str(r.error).splitlines()[0][:300],
                checkpoint=m.get("checkpoint_path")
                or (r.checkpoint.path if r.checkpoint else None),
                schedule=m.get("pbt_schedule") or None,
            )
        )
    completed = [t for t in trials if t.completed and t.metric is not None and t.gate is None]
    best = None
    if completed:
        pick = min if mode == "min" else max
        b = pick(completed, key=lambda t: t.metric)
        # PBT: the final values, and the schedule that led to them.
        best = BestTrial(
            b.config, b.metric, metric, mode, b.checkpoint, b.trial_id, None, b.schedule
        )
    if uri and parent:
        best_run = _record_parent(uri, parent, name, trials, best, metric)
        if best is not None:
            best = replace(best, run_id=best_run)
    result = SearchResult(name, path, metric, mode, tuple(trials), best)
    out = ganflow_home() / "searches" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    if best is not None:
        import yaml

        (out / "best.yaml").write_text(yaml.safe_dump(best.overrides))
    return result


def _record_parent(
    uri: str, parent: str, name: str, trials: list[Trial], best: BestTrial | None, metric: str
) -> str | None:
    """Parent run: best config/metric/checkpoint, the results table, a metric-vs-(λ, k) plot
    and the best trial's sample grid. Child runs still marked RUNNING (trials ASHA stopped
    mid-run) are closed as KILLED. Returns the best trial's MLflow run id."""
    import tempfile

    from flows import tracking

    c = tracking.client(uri)
    exp = c.get_run(parent).info.experiment_id
    children = c.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
    )
    by_name = {ch.data.tags.get(tracking.RUN_NAME_TAG, ""): ch for ch in children}
    best_run = None
    for ch in children:
        if ch.info.status == "RUNNING":
            c.set_terminated(ch.info.run_id, status="KILLED")
    if best is not None:
        best_child = by_name.get(f"{name}-{best.trial_id}")
        best_run = best_child.info.run_id if best_child else None
        have = c.get_run(parent).data.params
        for k, v in best.config.items():
            if f"best.{k}" not in have:  # a resumed search records the same best once
                c.log_param(parent, f"best.{k}", str(v))
        c.log_metric(parent, f"best.{metric}", float(best.metric))
        c.set_tag(parent, "ganflow.best_checkpoint", str(best.checkpoint))
        if best_run:
            c.set_tag(parent, "ganflow.best_run_id", best_run)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.json"
        table.write_text(json.dumps([t.to_dict() for t in trials], indent=2, default=str))
        c.log_artifact(parent, str(table))
        plot = _plot_metric(trials, metric, Path(tmp) / "metric_vs_params.png")
        if plot:
            c.log_artifact(parent, str(plot))
        if best_run:
            _copy_best_grid(c, best_run, parent, Path(tmp))
        if best is not None and best.schedule:
            sched = Path(tmp) / "pbt_schedule.json"
            sched.write_text(json.dumps(best.schedule, indent=2))
            c.log_artifact(parent, str(sched))
    c.set_terminated(parent, status="FINISHED")
    return best_run


def _plot_metric(trials: list[Trial], metric: str, path: Path) -> Path | None:
    rows = [t for t in trials if t.metric is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [t.config.get("loss.lambda_cyc") for t in rows]
    k = [t.config.get("train.d_steps", 1) for t in rows]
    vals = [t.metric for t in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if all(v is not None for v in lam):
        sc = ax.scatter(
            lam, k, c=vals, s=[60 if not t.stopped_early else 25 for t in rows], cmap="viridis"
        )
        ax.set_xscale("log")
        ax.set_xlabel("λ (lambda_cyc)")
        for x, y, v in zip(lam, k, vals):
            ax.annotate(f"{v:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        fig.colorbar(sc, label=metric)
    else:
        ax.scatter(k, vals)
        ax.set_xlabel("k (d_steps)")
    ax.set_ylabel("k (d_steps)" if all(v is not None for v in lam) else metric)
    ax.set_title(f"{metric} per trial (small dots: stopped early)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _grid_order(path: str) -> tuple[int, int, str]:
    """(step, timestamp, path) from MLflow's image file name
    (``images/<key>+step+<n>+timestamp+<ms>+<uuid>.png``), as numbers: as text, step 900
    sorts after step 1000."""
    m = re.search(r"\+step\+(\d+)\+timestamp\+(\d+)", path)
    return (int(m[1]), int(m[2]), path) if m else (-1, -1, path)


def _pick_grid(paths: list[str]) -> str | None:
    """The grid that shows the trial's chosen generator: its best step's ``best_samples``
    (the latest logged), else the last step's sample grid, for a trial from before best
    steps were kept. The full-size PNG, not MLflow's compressed preview of it."""
    pngs = [p for p in paths if p.endswith(".png")] or paths
    best = [p for p in pngs if Path(p).name.startswith("best_samples+")]
    if best:
        return max(best, key=lambda p: _grid_order(p)[1:])
    return max(pngs, key=_grid_order, default=None)


def _copy_best_grid(c, best_run: str, parent: str, tmp: Path) -> None:
    """The best trial's grid (:func:`_pick_grid`) onto the parent run."""
    import contextlib

    with contextlib.suppress(Exception):  # a trial without images simply has none to copy
        grid = _pick_grid([f.path for f in c.list_artifacts(best_run, "images")])
        if grid:
            local = c.download_artifacts(best_run, grid, str(tmp))
            c.log_artifact(parent, local, "best_samples")

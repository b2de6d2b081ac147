"""Hyperparameter search with Ray Tune over λ (``lambda_cyc``) and k (``d_steps``), and any
other config field, at cluster scale.

Each trial is a Ray Train run of the training stage's trainer (Ray Train V2: a Tune function
builds one TorchTrainer per trial and forwards its reports with ``TuneReportCallback``), so
a trial can itself span several GPU workers. Trials report the family's primary quality
metric (gan_core's held-out evaluation) every ``eval_every`` iterations; ASHA stops poor
trials early. MLflow gets one parent run for the search and one child run per trial; the
parent records the best trial's config, metric and checkpoint, a metric-vs-(λ, k) picture
and the best trial's sample grid. The best configuration comes back as config overrides
that ``ganflow train --set``/``--config`` and the retraining flow take as they are.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow

from flows.settings import ganflow_home, read_yaml_mapping
from gan_core.config import ConfigError, GanConfig, apply_overrides, resolve_key
from gan_core.evaluate import primary_metric

EXPERIMENT = "ganflow-search"
SEARCHER_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Locations the driver passes to its trials (credentials stay in each node's environment).
_TRIAL_ENV = (
    "GANFLOW_HOME",
    "GANFLOW_STORAGE_ROOT",
    "GANFLOW_RAY_STORAGE",
    "GANFLOW_MLFLOW_ARTIFACT_ROOT",
    "GANFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
)


class SearchError(ValueError):
    """The search cannot run as asked; one line for the command line."""


def default_space(family: str) -> dict[str, dict]:
    """λ on a grid like the paper's neighbourhood (CycleGAN only), k over {1, 2, 3, 5}."""
    if family == "cyclegan":
        return {
            "loss.lambda_cyc": {"grid": [1.0, 3.0, 10.0, 30.0]},
            "train.d_steps": {"choice": [1, 2, 3, 5]},
        }
    return {"train.d_steps": {"grid": [1, 2, 3, 5]}}


def load_space(path: str | None, family: str) -> dict[str, dict]:
    if not path:
        return default_space(family)
    raw = read_yaml_mapping(path, "search space file", SearchError)
    if not raw:
        raise SearchError(f"search space file {path} must map config fields to {{kind: values}}")
    return raw


def validate_space(space: dict[str, dict], base: GanConfig) -> dict[str, dict]:
    """Normalise names to dotted form and check every value/bound against the config's own
    validation, before anything runs. Returns {dotted_name: {kind: values}}."""
    out: dict[str, dict] = {}
    for key, spec in space.items():
        try:
            section, name = resolve_key(key)
        except ConfigError as exc:
            raise SearchError(f"search space: {exc}") from None
        dotted = f"{section}.{name}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCHER_KINDS:
            raise SearchError(
                f"search space: {dotted}: expected one of {{{', '.join(SEARCHER_KINDS)}: ...}}, got {spec!r}"
            )
        kind, values = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                raise SearchError(f"search space: {dotted}: {kind} needs a non-empty list")
            probes = values
        else:
            if not (
                isinstance(values, list)
                and len(values) == 2
                and all(isinstance(v, (int, float)) for v in values)
                and values[0] < values[1]
            ):
                raise SearchError(
                    f"search space: {dotted}: {kind} needs [low, high] with low < high"
                )
            if kind == "loguniform" and values[0] <= 0:
                raise SearchError(f"search space: {dotted}: loguniform needs low > 0")
            probes = values
        for v in probes:
            try:
                apply_overrides(base, {dotted: v})
            except ConfigError as exc:
                raise SearchError(f"search space: {exc}") from None
        out[dotted] = {kind: values}
    return out


def to_tune_space(space: dict[str, dict]) -> dict:
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {
        name: make[kind](values) for name, spec in space.items() for kind, values in spec.items()
    }


def count_trials(space: dict[str, dict], samples: int) -> int:
    grid = math.prod(len(v) for s in space.values() for k, v in s.items() if k == "grid")
    return grid * samples


@dataclass
class SearchRequest:
    family: str
    dataset: str
    base: GanConfig
    space: dict[str, dict]
    samples: int = 1
    scheduler: str = "asha"
    max_concurrent: int | None = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 0.9
    gpus_per_worker: float = 0.0
    eval_every: int | None = None
    grace_period: int | None = None
    name: str | None = None
    resume: bool = False
    storage: str | None = None
    tracking: bool = True
    extra_trial_overrides: dict = field(default_factory=dict)


class _ReapOrphanedPlacementGroups:
    """Tune callback (driver side): free the CPUs/GPUs of Ray Train runs whose trial Tune
    stopped (ASHA) or finished.

    Tune stops a trial by killing its actor while the TorchTrainer inside may still hold its
    workers' placement group. Ray's own PlacementGroupCleaner is meant to free it, but on a
    loaded 2-core machine it did not within 10 minutes (seen: 1.8 of 2 CPUs reserved by
    finished trials, every later trial pending; the cleaner's state-API query fails when a
    machine runs two Ray instances). A placement group of this job with real resources, no
    live actor in it and older than ``min_age_s`` (well past any worker start) is orphaned:
    remove it."""

    def __init__(self, min_age_s: float = 120.0, every_s: float = 15.0):
        self.min_age_s, self.every_s, self._last = min_age_s, every_s, 0.0

    def reap(self) -> int:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group
        from ray.util.state import list_actors, list_placement_groups

        job = ray.get_runtime_context().get_job_id()
        try:
            alive = list_actors(detail=True, filters=[("state", "=", "ALIVE")], limit=10000)
            in_use = {a.placement_group_id for a in alive if a.placement_group_id}
            pgs = list_placement_groups(
                detail=True, filters=[("state", "=", "CREATED")], limit=10000
            )
        except Exception:  # the state API is best effort here; try again at the next event
            return 0
        now_ns = time.time_ns()
        removed = 0
        for pg in pgs:
            units = [b["unit_resources"] for b in pg.bundles]
            heavy = any(u.get("CPU", 0) >= 0.5 or u.get("GPU", 0) > 0 for u in units)
            created = int(pg.stats.get("creation_request_received_ns", now_ns))
            old = (now_ns - created) / 1e9 > self.min_age_s
            if pg.creator_job_id == job and heavy and old and pg.placement_group_id not in in_use:
                pg_id = ray.PlacementGroupID(bytes.fromhex(pg.placement_group_id))
                remove_placement_group(PlacementGroup(pg_id))
                removed += 1
        return removed

    def maybe_reap(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last > self.every_s:
            self._last = time.monotonic()
            self.reap()


def _reaper_callback():
    from ray import tune

    class Reaper(tune.Callback):
        def __init__(self):
            self.reaper = _ReapOrphanedPlacementGroups()

        def on_step_end(self, iteration, trials, **info):
            self.reaper.maybe_reap()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.reaper.maybe_reap(force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.reaper.maybe_reap(force=True)

    return Reaper()


def _trial(config: dict) -> None:
    """One Tune trial: a Ray Train run of the training stage's trainer."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from flows.train_ray import ClusterSpec, StorageSpec, TrainRequest, run_training

    ctx = config["__ganflow"]
    # The driver's view of where things live (no secrets), so a trial on any node reads the
    # same snapshot store and writes the same MLflow/Ray storage as the driver.
    os.environ.update(ctx["env"])
    params = {k: v for k, v in config.items() if k != "__ganflow"}
    cfg = apply_overrides(GanConfig.from_flat_dict(ctx["base"]), params)
    trial_name = f"{ctx['search']}-{tune.get_context().get_trial_id()}"
    req = TrainRequest(
        cfg=cfg,
        dataset=ctx["snapshot_id"],
        cluster=ClusterSpec(
            workers=ctx["workers"], gpus_per_worker=ctx["gpus"], cpus_per_worker=ctx["cpus"]
        ),
        storage=StorageSpec(url=ctx["storage"]),
        run_name=trial_name,
        experiment=EXPERIMENT,
        tracking=ctx["tracking"],
        parent_run_id=ctx["parent_run_id"],
        eval_every=ctx["eval_every"],
        trainer_callbacks=[TuneReportCallback()],
        max_failures=0,
    )
    run_training(req)


def _storage_root(req: SearchRequest) -> str:
    return (
        req.storage or os.environ.get("GANFLOW_RAY_STORAGE") or str(ganflow_home() / "ray_results")
    )


def run_search(req: SearchRequest, progress: bool = True) -> dict:
    """Run (or resume) the search; returns {"name", "trials": [...], "best": {...}}."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from flows import tracking
    from flows.settings import snapshot_root
    from flows.train_ray import (
        ClusterSpec,
        StorageSpec,
        check_resources,
        ensure_ray,
        gpu_capacity,
        resolve_dataset,
    )

    base = req.base
    steps = base.train.steps
    eval_every = req.eval_every or max(1, steps // 4)
    if req.scheduler not in ("asha", "fifo"):
        raise SearchError(f"--scheduler must be asha or fifo, got {req.scheduler!r}")
    if req.samples < 1:
        raise SearchError(f"--samples must be >= 1, got {req.samples}")
    if req.resume and not req.name:
        raise SearchError("--resume needs the --name of the search to resume")
    uri = parent = None
    if req.tracking:
        uri = tracking.tracking_uri()
        tracking.check_reachable(uri)
    manifest = resolve_dataset(req.dataset, snapshot_root(), base.data.image_size)
    from flows.data_config import check_config

    check_config(base, manifest)
    # Trials are selected on the validation split (test stays for the reported figures).
    primary, mode = primary_metric(base, bool(manifest.get("has_truth")))
    metric = f"val_{primary}"
    name = (
        req.name or f"search-{req.family}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    )
    storage_path, filesystem = StorageSpec(url=_storage_root(req)).resolve()
    ensure_ray(log_to_driver=False)
    # A trial the cluster can never place would wait forever: fail before any run is made.
    check_resources(
        ClusterSpec(
            workers=req.workers_per_trial,
            gpus_per_worker=req.gpus_per_worker,
            cpus_per_worker=req.cpus_per_worker,
        )
    )

    if req.tracking:
        exp_id = tracking.ensure_experiment(uri, EXPERIMENT)
        parent = tracking.find_or_create_run(
            uri,
            exp_id,
            name,
            {
                "ganflow.family": req.family,
                "ganflow.snapshot_id": manifest["id"],
                "ganflow.kind": "search",
            },
        )
        client = tracking.client(uri)
        have = client.get_run(parent).data.params
        params = {
            "family": req.family,
            "dataset": manifest["id"],
            "samples": req.samples,
            "scheduler": req.scheduler,
            "space": json.dumps(req.space)[:6000],
            "steps": steps,
        }
        for k, v in params.items():
            if k not in have:
                client.log_param(parent, k, str(v))

    # Trials report losses at every log point and the quality metric every eval_every
    # iterations; ASHA only judges results that carry the metric, so reports without it are
    # valid (Tune's strict check would reject them).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    ctx = {
        "base": base.to_flat_dict(),
        "snapshot_id": manifest["id"],
        "search": name,
        "workers": req.workers_per_trial,
        "gpus": req.gpus_per_worker,
        "cpus": req.cpus_per_worker,
        "storage": _storage_root(req),
        "tracking": req.tracking,
        "parent_run_id": parent,
        "eval_every": eval_every,
        "env": {k: os.environ[k] for k in _TRIAL_ENV if os.environ.get(k)},
    }
    trainable = tune.with_resources(
        _trial, {"cpu": 0.01}
    )  # the trial's own workers reserve the real CPUs
    max_conc = req.max_concurrent
    if max_conc is None:
        # GPU trials: as many as the GPUs allow, counting those an autoscaling cluster can add
        # (its CPUs arrive with the GPU nodes, so today's CPU count says nothing). Else CPUs.
        if req.gpus_per_worker > 0:
            free = gpu_capacity() / (req.workers_per_trial * req.gpus_per_worker)
        else:
            cpus = ray.cluster_resources().get("CPU", 1.0)
            free = cpus / (req.workers_per_trial * req.cpus_per_worker)
        max_conc = max(1, int(free))
    scheduler = (
        # max_t one past the last step: a trial that reaches the end returns by itself
        # (Tune killing it at max_t would strand its Train run's resources).
        ASHAScheduler(
            time_attr="step",
            max_t=steps + 1,
            grace_period=req.grace_period or eval_every,
            reduction_factor=2,
        )
        if req.scheduler == "asha"
        else FIFOScheduler()
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        verbose=1 if progress else 0,
        callbacks=[_reaper_callback()],
    )
    path = f"{storage_path}/{name}"
    if req.resume:
        if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
            raise SearchError(
                f"nothing to resume: no search named {name!r} under {_storage_root(req)}"
            )
        tuner = tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
            param_space={**to_tune_space(req.space), "__ganflow": ctx},
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={**to_tune_space(req.space), "__ganflow": ctx},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                scheduler=scheduler,
                num_samples=req.samples,
                max_concurrent_trials=max_conc,
            ),
            run_config=run_config,
        )
    grid = tuner.fit()
    return _summarise(req, name, grid, metric, mode, steps, parent, uri, path)


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
) -> dict:
    trials = []
    for r in grid:
        params = {k: v for k, v in (r.config or {}).items() if k != "__ganflow"}
        m = r.metrics or {}
        reached = int(m.get("step", 0))
        trials.append(
            {
                "trial_id": m.get("trial_id"),
                "config": params,
                "metric": m.get(metric),
                "step": reached,
                "stopped_early": r.error is None and reached < steps,
                "error": None if r.error is None else str(r.error).splitlines()[0][:300],
                "checkpoint": m.get("checkpoint_path")
                or (r.checkpoint.path if r.checkpoint else None),
            }
        )
    completed = [
        t
        for t in trials
        if t["error"] is None and not t["stopped_early"] and t["metric"] is not None
    ]
    best = None
    if completed:
        pick = min if mode == "min" else max
        b = pick(completed, key=lambda t: t["metric"])
        best = {
            "config": b["config"],
            "overrides": {k: v for k, v in b["config"].items()},
            "metric": b["metric"],
            "metric_name": metric,
            "mode": mode,
            "checkpoint": b["checkpoint"],
            "trial_id": b["trial_id"],
            "run_id": None,
        }
    if uri and parent:
        best_run = _record_parent(uri, parent, name, trials, best, metric)
        if best is not None:
            best["run_id"] = best_run
    result = {
        "name": name,
        "path": path,
        "metric": metric,
        "mode": mode,
        "trials": trials,
        "best": best,
    }
    out = ganflow_home() / "searches" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    if best is not None:
        import yaml

        (out / "best.yaml").write_text(yaml.safe_dump(best["overrides"]))
    return result


def _record_parent(
    uri: str, parent: str, name: str, trials: list[dict], best: dict | None, metric: str
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
        best_child = by_name.get(f"{name}-{best['trial_id']}")
        best_run = best_child.info.run_id if best_child else None
        have = c.get_run(parent).data.params
        for k, v in best["config"].items():
            if f"best.{k}" not in have:  # a resumed search records the same best once
                c.log_param(parent, f"best.{k}", str(v))
        c.log_metric(parent, f"best.{metric}", float(best["metric"]))
        c.set_tag(parent, "ganflow.best_checkpoint", str(best["checkpoint"]))
        if best_run:
            c.set_tag(parent, "ganflow.best_run_id", best_run)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.json"
        table.write_text(json.dumps(trials, indent=2, default=str))
        c.log_artifact(parent, str(table))
        plot = _plot_metric(trials, metric, Path(tmp) / "metric_vs_params.png")
        if plot:
            c.log_artifact(parent, str(plot))
        if best_run:
            _copy_best_grid(c, best_run, parent, Path(tmp))
    c.set_terminated(parent, status="FINISHED")
    return best_run


def _plot_metric(trials: list[dict], metric: str, path: Path) -> Path | None:
    rows = [t for t in trials if t["metric"] is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [t["config"].get("loss.lambda_cyc") for t in rows]
    k = [t["config"].get("train.d_steps", 1) for t in rows]
    vals = [t["metric"] for t in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if all(v is not None for v in lam):
        sc = ax.scatter(
            lam, k, c=vals, s=[60 if not t["stopped_early"] else 25 for t in rows], cmap="viridis"
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


def _copy_best_grid(c, best_run: str, parent: str, tmp: Path) -> None:
    """The best trial's last sample grid onto the parent run."""
    import contextlib

    with contextlib.suppress(Exception):  # a trial without images simply has none to copy
        imgs = [f.path for f in c.list_artifacts(best_run, "images")]
        if imgs:
            local = c.download_artifacts(best_run, sorted(imgs)[-1], str(tmp))
            c.log_artifact(parent, local, "best_samples")


@flow(name="ganflow-search", persist_result=False, log_prints=False)
def tune_flow(
    family: str = "cyclegan", dataset: str = "builtin:digits-unpaired", samples: int = 8
) -> dict:
    """The search as a Prefect flow (the on-demand deployment): default space, ASHA."""
    from prefect.artifacts import create_markdown_artifact

    from flows.reports import artifact_key, search_markdown
    from flows.train_ray import build_config

    base, _ = build_config(family, None, [], dataset)
    space = validate_space(default_space(family), base)
    result = run_search(
        SearchRequest(family=family, dataset=dataset, base=base, space=space, samples=samples),
        progress=False,
    )
    create_markdown_artifact(
        search_markdown(result),
        key=artifact_key("ganflow-search", family),
        description="every trial's configuration, metric and status, and the best",
    )
    return result

"""Population Based Training (PBT, Jaderberg et al. 2017; PB2, Parker-Holder et al. 2020) over
λ (``loss.lambda_cyc``), k (``train.d_steps``), the learning rates and any other loss/optim
field the search space names.

A PBT trial is one training run whose hyperparameters change while it trains. Every
perturbation interval Tune ranks the population on the val metric; a trial in the bottom
quantile *exploits* one in the top quantile: it stops, restarts from the donor's checkpoint
(the complete gan_core training state: G, D, both optimisers with their moments, every random
stream, the image pools, the EMA weights, D's augmentation) and *explores*: the donor's
hyperparameters mutated (x 1.2 / x 0.8, k one step up or down, or resampled), clipped to the
space's bounds, applied to the optimisers' param groups and the loop from the next step on.

On one worker the trial trains in its own Tune actor (one process: ``cpus_per_worker`` CPUs,
and ``gpus_per_worker`` GPUs when asked) with the Train worker's code, reporting to Tune: the
exploit is a resume from the donor's checkpoint (flows.train.checkpoints.restore_checkpoint
with the trial's hyperparameters). On several workers it is a Ray Train run whose checkpoints
the trial hands to Tune (:func:`_train_on_workers`). Each trial's MLflow run records every
exploit (donor, step, old -> new) and, at the end, its schedule (hyperparameters per step,
donors' segments included) as ``pbt_schedule.json`` and a plot; its best step's generator is logged like any training run's,
so the best trial's generator is the search's model: nothing is retrained.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

from flows.train.worker import TuneReports, train_in_this_process
from flows.tune.request import split_trial_config
from flows.tune.space import SearchError, _is_int
from gan_core.config import GanConfig

# What may change while a run trains: the losses' weights, the optimisers' numbers and k.
# Everything else shapes the networks, the data or the schedule's length (a mutated batch size
# or architecture cannot load the donor's state).
MUTABLE_SECTIONS = ("loss", "optim")
MUTABLE_FIELDS = ("train.d_steps",)

# PBT's clock: the step, in the reports made during training only. The final report (the best
# step's figures, after the generator is logged) has none, so PBT never exploits a trial that
# has finished (it would restart a run whose model is already logged).
TIME_ATTR = "pbt_step"

META_FILE = "pbt.json"


def check_pbt_space(space: dict[str, dict], base: GanConfig) -> None:
    """Every field PBT mutates must be numeric and changeable mid-run; one line naming it."""
    for name, spec in space.items():
        section = name.split(".", 1)[0]
        if section not in MUTABLE_SECTIONS and name not in MUTABLE_FIELDS:
            raise SearchError(
                f"search space: {name} cannot change while a run trains (PBT mutates "
                f"{', '.join(s + '.*' for s in MUTABLE_SECTIONS)} and {', '.join(MUTABLE_FIELDS)})"
            )
        kind, values = next(iter(spec.items()))
        current = getattr(getattr(base, section), name.split(".", 1)[1])
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise SearchError(f"search space: {name} is not numeric; PBT mutates numbers")
        if kind in ("grid", "choice") and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise SearchError(f"search space: {name}: PBT needs numeric values, got {values!r}")


def bounds(space: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """[low, high] per field: a mutation never leaves them (randint's high is exclusive)."""
    out = {}
    for name, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            out[name] = (min(values), max(values))
        elif kind == "randint":
            out[name] = (values[0], values[1] - 1)
        else:
            out[name] = (values[0], values[1])
    return out


def mutations(space: dict[str, dict]) -> dict:
    """Tune's ``hyperparam_mutations``: a list (grid, choice, randint as the integers in range)
    moves one place left or right, so k goes up or down by one step within its bounds; a range
    (uniform, loguniform) is multiplied by 1.2 or 0.8 (then clipped: :func:`clip`) or resampled."""
    from ray import tune

    out: dict = {}
    for name, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            out[name] = sorted(values)
        elif kind == "randint":
            out[name] = list(range(values[0], values[1]))
        elif kind == "uniform":
            out[name] = tune.uniform(*values)
        else:
            out[name] = tune.loguniform(*values)
    return out


def pb2_bounds(space: dict[str, dict]) -> dict[str, list[float]]:
    """PB2's ``hyperparam_bounds`` (its GP bandit picks values in [low, high])."""
    return {k: [float(lo), float(hi)] for k, (lo, hi) in bounds(space).items()}


def clip(space: dict[str, dict]):
    """A ``custom_explore_fn``: Tune's x 1.2 / x 0.8 has no bounds; keep every value in the
    space's, integers integral (PB2's bandit returns floats)."""
    lims = bounds(space)

    def explore(config: dict) -> dict:
        for name, (lo, hi) in lims.items():
            if name in config:
                v = min(max(config[name], lo), hi)
                config[name] = int(round(v)) if _is_int(lo) and _is_int(hi) else float(v)
        return config

    return explore


# --- the hyperparameters a trial runs with -----------------------------------------------------


def hyperparameters(cfg: GanConfig, names) -> dict[str, float]:
    flat = cfg.to_flat_dict()
    return {k: flat[k] for k in names}


def describe_change(old: dict, new: dict) -> str:
    return ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])


# --- the trial ------------------------------------------------------------------------------------


def trial_record(trial_id: str, step: int, now: dict, schedule: list) -> dict:
    """A checkpoint's PBT record (``pbt.json``): whose trial, at which step, with which
    hyperparameters, and the schedule that led there (what an exploit reads back)."""
    return {"trial_id": trial_id, "step": step, "hyperparameters": now, "schedule": schedule}


def schedule_after(schedule: list, step: int, params: dict) -> list:
    """The schedule's segments up to ``step``, then ``params`` from step+1 ([[first step,
    params], ...], first steps increasing)."""
    kept = [seg for seg in schedule if seg[0] <= step]
    if kept and kept[-1][1] == params:
        return kept
    return [*kept, [step + 1, dict(params)]]


def pbt_trial(config: dict) -> None:
    """One PBT trial (a Tune function): train, report the val metric with a checkpoint every
    eval interval, and on a restart with someone else's checkpoint, record the exploit.

    On one worker the trial's actor is the worker: the Train worker's code runs here
    (flows.train.worker.train_in_this_process) with the step as PBT's clock, so an exploit
    loads the donor's checkpoint as a resume does (every stream, the best so far) and then
    applies this trial's hyperparameters; :class:`_PbtReports` adds the trial's PBT record."""
    from ray import tune

    from flows import tracking

    ctx, params = split_trial_config(config)
    os.environ.update(ctx.env)
    names = sorted(params)
    cfg = ctx.trial_config(params)
    trial_id = tune.get_context().get_trial_id()
    run_name = ctx.run_name(trial_id)
    uri = run_id = None
    if ctx.tracking:
        uri = tracking.tracking_uri()
        exp = tracking.ensure_experiment(uri, ctx.experiment)
        tags = {
            "ganflow.family": cfg.family,
            "ganflow.snapshot_id": ctx.snapshot_id,
            "ganflow.kind": "pbt-trial",
            "mlflow.parentRunId": ctx.parent_run_id,
        }
        run_id = tracking.find_or_create_run(uri, exp, run_name, tags)
        tracking.log_config(uri, run_id, cfg, {"dataset.id": ctx.snapshot_id})
    now = hyperparameters(cfg, names)
    if ctx.workers > 1:
        _train_on_workers(ctx, cfg, now, trial_id, run_name, uri, run_id)
        return
    job = _worker_job(
        ctx,
        cfg,
        uri,
        run_id,
        sample_every=5 * cfg.train.log_every,
        threads=max(1, ctx.threads),
        pbt_clock=TIME_ATTR,
    )
    reports = _PbtReports(trial_id, now, run_name, uri, run_id)
    train_in_this_process(job, reports, use_gpu=ctx.gpus_per_worker > 0)
    if run_id:
        _log_schedule(uri, run_id, reports.schedule, cfg.train.steps)
        tracking.finish_run(uri, run_id)


class _PbtReports(TuneReports):
    """A 1-process PBT trial's reports to Tune: each carries the trial's id, each checkpoint
    the trial's PBT record (``pbt.json``: whose trial, step, hyperparameters, schedule), and
    the final one (no PBT clock) the schedule; a restart from a checkpoint records the
    exploit (donor, step, old -> new) and continues the schedule from it."""

    def __init__(self, trial_id: str, now: dict, run_name: str, uri, run_id):
        self.trial_id, self.now, self.run_name = trial_id, now, run_name
        self.uri, self.run_id = uri, run_id
        self.schedule: list = [[1, now]]

    def latest(self):
        checkpoint = super().latest()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                meta = json.loads((Path(d) / META_FILE).read_text())
            self.schedule = _record_exploit(
                meta, meta["step"], self.now, self.trial_id, self.run_name, self.uri, self.run_id
            )
        return checkpoint

    def tagged(self, metrics: dict) -> dict:
        out = {**metrics, "trial_id": self.trial_id}
        if TIME_ATTR not in metrics:  # the end: the schedule that led to this model
            out["pbt_schedule"] = self.schedule
        return out

    def add_files(self, directory: Path, step: int) -> None:
        meta = trial_record(self.trial_id, step, self.now, self.schedule)
        (directory / META_FILE).write_text(json.dumps(meta, default=float))


def _worker_job(ctx, cfg: GanConfig, uri, run_id, **extra):
    """The trial's training job: its config, the snapshot and where it logs."""
    from flows.train.spec import WorkerJob

    return WorkerJob(
        config=cfg,
        snapshot_id=ctx.snapshot_id,
        snapshot_root=ctx.snapshot_root,
        cache_dir=ctx.cache_dir,
        tracking_uri=uri,
        run_id=run_id,
        **extra,
    )


def _record_exploit(meta: dict, step: int, now: dict, trial_id, run_name, uri, run_id) -> list:
    """A restart from a checkpoint (``meta``: its pbt.json) at ``step``: one line, and in the
    trial's MLflow run a tag and a metric when it is an exploit (another trial's state, or
    new values); returns the schedule from here on."""
    from flows import tracking

    donor = meta["trial_id"]
    if donor != trial_id or meta["hyperparameters"] != now:
        change = describe_change(meta["hyperparameters"], now)
        line = f"exploit: from trial {donor} at step {step}: {change or 'no change'}"
        print(f"[ganflow] {run_name}: {line}", file=sys.__stderr__, flush=True)
        if run_id:
            tracking.client(uri).set_tag(run_id, f"ganflow.pbt.exploit.{step:08d}", line)
            tracking.log_metrics(uri, run_id, {"pbt.exploit_from_step": step}, step)
    return schedule_after(meta["schedule"], step, now)


# --- a trial on several workers -------------------------------------------------------------


def _train_on_workers(ctx, cfg: GanConfig, now: dict, trial_id, run_name, uri, run_id) -> None:
    """The trial as a Ray Train run on ``ctx.workers`` workers (data parallel, the same worker
    code as `ganflow train`: flows.train.worker). The workers checkpoint at every evaluation
    with the step as PBT's clock (``WorkerJob.pbt_clock``); a Train callback hands each
    checkpoint back to this actor, which reports it to Tune with the trial's PBT record
    (pbt.json) beside the workers' files. After an exploit the new Train run starts from the
    donor's checkpoint (every rank's streams, the best so far) and the workers apply this
    trial's hyperparameters once it is loaded. Tune stopping this actor stops the Train run
    it owns (its controller and workers are this actor's children)."""
    import tempfile
    import threading
    import uuid

    from ray import tune
    from ray.util.queue import Empty, Queue

    from flows import tracking
    from flows.snapshots.load import resolve_snapshot
    from flows.train.driver import fit_job
    from flows.train.spec import StorageSpec, TrainRequest

    schedule: list = [[1, now]]
    donor = tune.get_checkpoint()
    if donor is not None:
        with donor.as_directory() as d:
            meta = json.loads((Path(d) / META_FILE).read_text())
        schedule = _record_exploit(meta, meta["step"], now, trial_id, run_name, uri, run_id)
    log_every = cfg.train.log_every
    job = _worker_job(
        ctx,
        cfg,
        uri,
        run_id,
        sample_every=5 * log_every,
        threads=ctx.threads,
        pbt_clock=TIME_ATTR,
        start_from=_url(donor) if donor is not None else None,
    )
    reports = Queue(actor_options={"num_cpus": 0})
    req = TrainRequest(
        cfg=cfg,
        manifest=resolve_snapshot(ctx.snapshot_id),
        cluster=ctx.cluster(),
        storage=StorageSpec(url=ctx.storage),
        tracking=ctx.tracking,
        max_failures=0,  # Tune restarts the trial from its last checkpoint instead
        # Every checkpoint stays until this trial has copied it (the copy can lag behind the
        # workers while Tune takes a report); the Train run's folder goes at the trial's end.
        keep_checkpoints=None,
        trainer_callbacks=[_HandBack(reports)],
    )
    fit: dict = {}
    # Every start its own Train run: Ray Train resumes a run name it finds in storage from
    # that run's latest checkpoint, which after an exploit is not the donor's.
    name = f"{run_name}-{uuid.uuid4().hex[:6]}"

    def run() -> None:
        try:
            fit["result"] = fit_job(job, req, name)
        except BaseException as exc:  # noqa: BLE001 (raised again in the trial's own thread)
            fit["error"] = exc

    runner = threading.Thread(target=run, name="pbt-train-run", daemon=True)
    runner.start()
    last = None
    while runner.is_alive() or not reports.empty():
        try:
            metrics, checkpoint = reports.get(timeout=1.0)
        except Empty:
            continue
        if TIME_ATTR not in metrics:  # the end: reported below, with the schedule
            last = (metrics, checkpoint)
            continue
        step = int(metrics[TIME_ATTR])
        meta = trial_record(trial_id, step, now, schedule)
        with tempfile.TemporaryDirectory() as tmp:
            _tune_checkpoint(checkpoint, Path(tmp), meta)
            tune.report(
                {**metrics, "step": step, "trial_id": trial_id},
                checkpoint=tune.Checkpoint.from_directory(tmp),
            )
    runner.join()
    if "error" in fit:
        raise fit["error"]
    result = fit.get("result")
    if result is None or not result.ok or last is None:
        why = result.error if result is not None else "the Train run ended without a result"
        if run_id:
            with contextlib.suppress(Exception):
                tracking.finish_run(uri, run_id, "FAILED")
        raise RuntimeError(f"PBT trial {trial_id}: {why}")
    metrics, checkpoint = last
    if run_id:
        _log_schedule(uri, run_id, schedule, cfg.train.steps)
        tracking.finish_run(uri, run_id)
    step = int(metrics.get("step", cfg.train.steps))
    meta = trial_record(trial_id, step, now, schedule)
    with tempfile.TemporaryDirectory() as tmp:
        _tune_checkpoint(checkpoint, Path(tmp), meta)
        _remove_run(result.storage)
        tune.report(
            {**metrics, "step": step, "trial_id": trial_id, "pbt_schedule": schedule},
            checkpoint=tune.Checkpoint.from_directory(tmp),
        )


def _url(checkpoint) -> str:
    """Where a Tune checkpoint lives, as the URL flows.train.spec.StorageSpec resolves."""
    from pyarrow import fs as pafs

    if isinstance(checkpoint.filesystem, pafs.S3FileSystem):
        return f"s3://{checkpoint.path}"
    return checkpoint.path


def _tune_checkpoint(checkpoint, out: Path, meta: dict) -> None:
    """The workers' checkpoint (in the Train run's storage) copied into ``out`` with the
    trial's PBT record beside it: what Tune keeps, and hands a receiving trial on exploit."""
    checkpoint.to_directory(str(out))
    (out / META_FILE).write_text(json.dumps(meta, default=float))


def _remove_run(storage: str) -> None:
    """The finished Train run's folder (its checkpoints were copied into Tune's): best
    effort, a leftover folder costs space, not correctness."""
    import shutil

    with contextlib.suppress(Exception):
        if storage.startswith("s3://"):
            from flows.storage import get_filesystem

            fs, path = get_filesystem(storage)
            fs.rm(path, recursive=True)
        else:
            shutil.rmtree(storage)


def _hand_back_class():
    from ray.train.v2.api.callback import UserCallback

    class HandBack(UserCallback):
        """Runs in the Train run's controller: each report's metrics (rank 0's) and
        checkpoint go to the PBT trial's queue, in order."""

        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            self.queue.put((dict(metrics[0]), checkpoint))

    return HandBack


def _HandBack(queue):
    return _hand_back_class()(queue)


def _log_schedule(uri: str, run_id: str, schedule: list, end: int) -> None:
    """``pbt_schedule.json`` ([[first step, {field: value}], ...]) and a step plot of it."""
    import tempfile

    from flows import tracking

    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pbt_schedule.json"
        path.write_text(json.dumps(schedule, indent=2))
        c.log_artifact(run_id, str(path))
        plot = plot_schedule(schedule, end, Path(tmp) / "pbt_schedule.png")
        if plot:
            c.log_artifact(run_id, str(plot))


def plot_schedule(schedule: list, end: int, path: Path) -> Path | None:
    if not schedule:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(schedule[0][1])
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 1.8 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        xs = [seg[0] for seg in schedule] + [end]
        ys = [seg[1][name] for seg in schedule]
        ax.step(xs, ys + ys[-1:], where="post")
        ax.set_ylabel(name, fontsize=8)
        if all(isinstance(v, float) and v > 0 for v in ys) and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("PBT schedule of the registered trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_schedule(schedule: list, end: int) -> str:
    """The schedule as lines: 'steps a-b: lr_g=..., train.d_steps=...'."""
    lines = []
    for i, (first, params) in enumerate(schedule):
        last = schedule[i + 1][0] - 1 if i + 1 < len(schedule) else end
        shown = ", ".join(f"{k}={_num(v)}" for k, v in sorted(params.items()))
        lines.append(f"  steps {first}-{last}: {shown}")
    return "\n".join(lines)


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)

"""`ganflow train`: every GAN family as a Ray Train job (TorchTrainer, the Train V2 API).

One CPU process or many GPU nodes, by configuration alone. The boundary between Ray and
gan_core is :func:`train_loop_per_worker`: it loads the dataset snapshot, builds gan_core's
state with :func:`ddp_wrap` applied to each network separately, restores the latest Ray
checkpoint, and runs gan_core's one training loop with :class:`RayCallback` attached. A
1-worker Tune trial runs the same worker code in its own actor
(:func:`train_in_this_process`): where it resumes from and reports to is the one difference
(:class:`TrainReports`, :class:`TuneReports`).

Distribution, stated once:

- Data parallel: every worker runs the full loop on its own shard (gan_core's
  MinibatchSampler, sharded by rank). ``train.batch_size`` is per worker, so the global
  minibatch is ``batch_size * workers``: to compare with a 1-worker run at the same global
  batch, divide batch_size by the number of workers.
- G and D are wrapped for DistributedDataParallel separately (one DDP module around both
  fails). gan_core's G step calls D through ``plain(D)`` with D frozen, so no all-reduce runs
  for D there, and D's step computes fakes under no_grad, so G's DDP forward there prepares
  no reduction: every DDP backward reaches all of that module's parameters, and
  ``find_unused_parameters=False`` holds. Buffers are synced at every forward (DDP's
  default): BatchNorm running statistics follow rank 0's, so evaluation sees rank 0's.
- Devices: CUDA when the worker has a GPU (NCCL; bf16 autocast of the forward passes unless
  the config says otherwise; losses stay fp32 in gan_core), else CPU with gloo.

Checkpoints (every ``checkpoint_every`` iterations and at the end) are reported through
``ray.train.report`` by every rank into one directory: rank 0 writes ``state.pt`` (models,
optimisers, schedulers, EMA, step, config) and ``best.pt`` (the best generator so far on
val), and each rank writes ``rank-<r>.pt`` with its own random streams (sampler, noise,
CycleGAN image pools, augmentation), so a resumed run draws exactly the batches and noise the
uninterrupted one would have and registers the same best step. Files hold tensors and primitives only and load
with ``weights_only=True``. Storage is local (GANFLOW_HOME/ray_results) or ``s3://`` with the
endpoint passed explicitly to pyarrow. FailureConfig restarts a dead worker group from the
latest checkpoint; rerunning a run name resumes it (Ray finds the run in storage, and the
MLflow run tagged with that name is reused).

Reports to Ray are few on purpose: Ray Train's controller takes one report per worker every
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) from a one-deep queue, so reporting at
every log point paced a tiny model at 0.5 log points/s (measured). Losses go to MLflow at
every log point; Ray sees checkpoints, evaluations (``eval.every``, which Tune's schedulers
read) and the end.

Best, not last: every ``eval.every`` iterations and at the end, rank 0 measures the networks
evaluation uses (``gan_core.train.eval_models``: the EMA generator when the config keeps one)
on the val split, logs ``eval.val_<metric>`` at that step (the curve) and keeps the best step
by the family's primary metric (:class:`flows.train.best.BestSoFar`). At the end the best
step's generator is measured on test and registered; the run's final figures are that
step's (``best_step`` says which).

MLflow: the driver checks the tracking server, creates the run and logs the config and the
dataset snapshot before any cluster work; rank 0 alone logs metrics, sample grids, the
evaluation and the chosen generator.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from flows.train.best import evaluation_due, judged_generators
from flows.train.checkpoints import (
    complete_checkpoint,
    read_best,
    report_checkpoint,
    restore_checkpoint,
)
from flows.train.spec import WorkerJob, WorkerUserError
from gan_core.config import GanConfig


def open_train(job: WorkerJob, cfg: GanConfig):
    """The train split as rows read by index from this node's verified copy of the snapshot
    (fetched once per node, shared by its workers): memory per worker does not grow with the
    dataset; each minibatch is read, moved to the device and scaled there."""
    from flows.snapshots.load import open_dataset

    return open_dataset(job.snapshot_id, "train", job.snapshot_root, image_size=cfg.data.image_size)


# --- distribution ---------------------------------------------------------------------------


def sync_batchnorm(module: nn.Module, enabled: bool) -> nn.Module:
    """BatchNorm layers as SyncBatchNorm (statistics over the global minibatch) when enabled:
    model.sync_batchnorm, more than one worker, CUDA (PyTorch's SyncBatchNorm is CUDA-only)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module) if enabled else module


def ddp_wrap(module: nn.Module, sync_bn: bool = False) -> nn.Module:
    """The one place a network is made data-parallel: moved to this worker's device and, with
    more than one worker, wrapped in DistributedDataParallel (see the module notes)."""
    from ray.train.torch import prepare_model

    module = sync_batchnorm(module, sync_bn)
    return prepare_model(
        module,
        parallel_strategy="ddp",
        # Buffers (BatchNorm statistics) are synced from rank 0 at every forward: the default.
        parallel_strategy_kwargs={"find_unused_parameters": False},
    )


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def _all_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks of a list of floats (one all-reduce; a host sync, at log points only)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def replica_divergence(models: dict[str, nn.Module], device: torch.device) -> float:
    """Largest |difference| of any parameter between ranks (0.0 when replicas are equal).
    Two all-reduces of every parameter: a diagnostic, not for production intervals."""
    import torch.distributed as dist

    from gan_core.train import plain

    vec = torch.cat(
        [p.detach().flatten().double() for m in models.values() for p in plain(m).parameters()]
    ).to(device)
    hi, lo = vec.clone(), vec.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


# --- where a worker reports -----------------------------------------------------------------


class TrainReports:
    """A Ray Train worker's side: it resumes from the run's latest checkpoint and reports to
    the Train run's controller (every rank, the same number of times)."""

    distributed = True

    def latest(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)

    def report_checkpoint(self, state, metrics: dict, rank: int, world_size: int, best) -> None:
        report_checkpoint(state, metrics, rank, world_size, best)


class TuneReports:
    """A 1-worker run trained in a Tune trial's own actor (flows.tune.search): no Train run,
    so no controller, worker group or placement group per trial. It resumes from the trial's
    latest Tune checkpoint and reports to Tune; the checkpoint's files are the ones a Train
    run writes (:func:`flows.train.checkpoints.write_checkpoint`), so the registry, warm
    starts and resumes read either alike."""

    distributed = False

    def latest(self):
        from ray import tune

        return tune.get_checkpoint()

    def tagged(self, metrics: dict) -> dict:
        """What a report tells Tune besides the run's figures (a PBT trial: its id)."""
        return metrics

    def add_files(self, directory: Path, step: int) -> None:
        """Files a checkpoint holds beside the run's (a PBT trial: its record)."""

    def report(self, metrics: dict) -> None:
        from ray import tune

        tune.report(self.tagged(metrics))

    def report_checkpoint(self, state, metrics: dict, rank: int, world_size: int, best) -> None:
        from ray import tune

        from flows.train.checkpoints import staging_folder, write_checkpoint

        # Tune copies the folder into the trial's storage before report returns.
        with staging_folder() as tmp:
            write_checkpoint(state, tmp, rank, world_size, best)
            self.add_files(tmp, state.step)
            tune.report(self.tagged(metrics), checkpoint=tune.Checkpoint.from_directory(str(tmp)))


# --- the worker side ------------------------------------------------------------------------


class RayCallback:
    """gan_core callback at every log point: average the metrics over ranks, log them to
    MLflow (rank 0), evaluate on val every ``eval.every`` iterations (rank 0, which also keeps
    the best step), and report to Ray with a checkpoint every ``checkpoint_every`` iterations.
    Every rank calls it at the same iterations, so collectives and reports line up."""

    def __init__(self, job: WorkerJob, rank: int, world_size: int, end: int, evaluator, reports):
        self.job, self.rank, self.world_size, self.end = job, rank, world_size, end
        self.evaluator, self.reports = evaluator, reports
        self.last_t: float | None = None
        self.latest_eval: dict[str, float] = {}
        self.last_step = 0

    @property
    def best(self):
        """Rank 0's best-so-far (written into its checkpoints); None on the other ranks."""
        return self.evaluator.best if self.evaluator is not None else None

    def __call__(self, state, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if self.last_t is not None:
            metrics["steps_per_s"] = (state.step - self.last_step) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_step = now, state.step
        if self.world_size > 1:
            keys = sorted(metrics)
            metrics = dict(zip(keys, _all_mean([metrics[k] for k in keys], state.device)))
            if self.job.check_replicas:
                metrics["replica_max_abs_diff"] = replica_divergence(state.models, state.device)
        metrics["step"] = state.step
        if self.rank == 0:
            shown = ", ".join(f"{k}={v:.3g}" for k, v in metrics.items() if k.startswith("loss"))
            rate = metrics.get("steps_per_s")
            # sys.__stderr__: Ray Train patches print() on workers into its logger (filtered
            # to warnings on a quiet console, and teed twice otherwise).
            print(
                f"[ganflow] {state.cfg.family}: iteration {state.step}/{self.end} {shown}"
                + (f" ({rate:.1f} it/s)" if rate else ""),
                file=sys.__stderr__,
                flush=True,
            )
        cfg = state.cfg
        evaluated = evaluation_due(state.step, cfg.eval.every, cfg.train.log_every, self.end)
        if self.rank == 0 and evaluated:
            self.latest_eval = self.evaluator.validate(state)
        metrics.update(self.latest_eval)
        if self.rank == 0 and self.job.run_id:
            self._track(state, {k: v for k, v in metrics.items() if k not in self.latest_eval})
        fault = self.job.fault
        if (
            fault
            and fault.rank == self.rank
            and fault.step == state.step
            and not os.path.exists(fault.marker)
        ):
            Path(fault.marker).write_text(str(os.getpid()))
            # Give the controller time to register checkpoints already reported (it polls
            # workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); then die as a crash does.
            time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)
        # Ray's controller takes one report per worker every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
        # (2 s by default) and the queue is one deep: a report per log point would pace
        # training at 0.5 log points/s (measured). So only checkpoints and evaluations are
        # reported to Ray; losses go to MLflow at every log point. The last iteration's
        # checkpoint is reported after evaluation, with its figures.
        if state.step == self.end:
            return
        clock = self.job.pbt_clock
        # A PBT trial checkpoints at every evaluation (PBT decides on val, and exploits
        # from the checkpoint of the step it decided at), the step as its clock.
        if evaluated if clock else state.step % self.job.checkpoint_every == 0:
            if clock:
                metrics[clock] = state.step
            self.reports.report_checkpoint(state, metrics, self.rank, self.world_size, self.best)
        elif evaluated:
            self.reports.report(metrics)

    def _track(self, state, metrics: dict[str, float]) -> None:
        from flows import tracking
        from gan_core.evaluate import sample_grid
        from gan_core.train import eval_models

        # Through the run's logger: a tracking server that goes away does not stop training
        # (its records are spooled on local disk and sent when it answers again).
        logger = _logger(self.job)
        logger.log_metrics(dict(metrics), state.step)
        if state.step % self.job.sample_every == 0 or state.step == self.end:
            # The generator evaluation judges (EMA when kept), not the optimiser's weights.
            images, nrow, caption = sample_grid(
                state.cfg, eval_models(state), self.evaluator.heldout["test"]
            )
            tracking.log_grid(self.job.tracking_uri, self.job.run_id, images, nrow, state.step)
            # What the grid's rows are (and whether classes were cut), next to it in the UI.
            logger.set_tags({"ganflow.samples": caption}, state.step)


def quiet_train_reports() -> None:
    """On a quiet console, Ray Train's per-report INFO line (``Reporting training result N:
    TrainingReport(...)``, every figure of every evaluation) stays off the terminal. Its
    logger is named by its file's path, outside the ``ray`` tree that LoggingConfig sets."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    """The single boundary between Ray and gan_core (runs on every worker)."""
    import ray.train
    import ray.train.torch

    if os.environ.get("GANFLOW_QUIET_WORKERS") == "1":
        quiet_train_reports()
    job = WorkerJob.from_wire(config)
    # One intra-op thread per worker by default: several workers share a node's cores, and
    # OpenMP oversubscription slowed training 10-30x on a 2-core machine (measured).
    torch.set_num_threads(job.threads)

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    try:
        _train_worker(job, job.config, rank, world_size, device, TrainReports())
    except (
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AssertionError,
        NotImplementedError,
    ) as exc:
        raise WorkerUserError(f"{type(exc).__name__}: {exc}") from exc
    except RuntimeError as exc:
        # Shape and dtype errors are RuntimeErrors; CUDA, NCCL and out-of-memory errors are
        # too, and those may pass on another node or attempt: leave them to the retries.
        text = str(exc)
        transient = any(w in text for w in ("CUDA", "NCCL", "out of memory", "Gloo", "gloo"))
        if transient or isinstance(exc, WorkerUserError):
            raise
        raise WorkerUserError(f"{type(exc).__name__}: {text}") from exc


def train_in_this_process(job: WorkerJob, reports, use_gpu: bool) -> None:
    """The whole run as one worker in the calling process (a Tune trial's actor), reporting
    through ``reports`` (:class:`TuneReports`): the same loop, evaluation, checkpoints and
    MLflow logging as a Train run's rank 0."""
    torch.set_num_threads(job.threads)
    # The trial's GPU when it asked for one (Ray sets CUDA_VISIBLE_DEVICES for the actor);
    # a CPU trial stays on the CPU even where Ray leaves the node's GPUs visible.
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    _train_worker(job, job.config, 0, 1, device, reports)


def _train_worker(
    job: WorkerJob, cfg: GanConfig, rank: int, world_size: int, device, reports
) -> None:
    from gan_core.train import emulated_bf16_warning, init_state, train

    train_rows = open_train(job, cfg)
    data = train_rows.to(device)  # labels only: rows stay on the host, minibatches move
    heldout = None
    if rank == 0:  # {'val', 'test'} in memory, at most eval.heldout rows each
        from flows.train.data_config import load_heldout

        heldout = load_heldout(job.snapshot_id, job.snapshot_root, cfg)
    sync_bn = cfg.model.sync_batchnorm and world_size > 1 and device.type == "cuda"
    # Outside a Train run there is no process group (and one worker needs none).
    wrap = (lambda m: ddp_wrap(m, sync_bn=sync_bn)) if reports.distributed else None
    state = init_state(cfg, data, device, rank, world_size, wrap=wrap)
    if world_size > 1:
        # ADA's r_t over every rank's reals, so all replicas move p alike (one small
        # all-reduce every augment.ada_interval D updates, at the same update on every rank).
        state.augment.reduce = _all_sum
    # Only a complete checkpoint (every file as its hash was recorded) is resumed from.
    checkpoint = reports.latest()
    if checkpoint is None and job.start_from:
        from ray.train import Checkpoint

        from flows.train.spec import StorageSpec

        path, filesystem = StorageSpec(url=job.start_from).resolve()
        checkpoint = Checkpoint(path, filesystem=filesystem)
    checkpoint = complete_checkpoint(
        checkpoint,
        say=lambda line: print(f"[ganflow rank {rank}] {line}", file=sys.__stderr__, flush=True),
    )
    best = None
    if checkpoint is None and job.warm_start:
        from flows.train.checkpoints import read_warm_start
        from gan_core.train import warm_start

        warm_start(state, read_warm_start(job.warm_start, map_location=device))
        if rank == 0:
            print(f"[ganflow] warm start from {job.warm_start}", file=sys.__stderr__, flush=True)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            # A PBT trial's start from a checkpoint (the donor's, on exploit) then takes this
            # trial's hyperparameters.
            exact = restore_checkpoint(
                state, Path(d), rank, world_size, cfg if job.pbt_clock else None
            )
            best = read_best(Path(d)) if rank == 0 else None
        print(
            f"[ganflow rank {rank}] resumed at iteration {state.step}"
            + ("" if exact else " (world size changed: fresh data/noise streams)"),
            file=sys.__stderr__,
            flush=True,
        )
    slow = emulated_bf16_warning(cfg.train.precision, device.type)
    if slow and rank == 0:
        print(f"[ganflow] warning: {slow}", file=sys.__stderr__, flush=True)
    end = cfg.train.steps
    nodes = _count_nodes(world_size)
    start_step, t0 = state.step, time.perf_counter()
    evaluator = Evaluator(job, cfg, train_rows, heldout, best) if rank == 0 else None
    train(state, data, callbacks=[RayCallback(job, rank, world_size, end, evaluator, reports)])
    seconds = time.perf_counter() - t0
    final: dict[str, float] = {
        "step": state.step,
        "ray_nodes": nodes,
        "ray_workers": world_size,
        # This attempt's training throughput (MLflow logging and checkpoints included).
        "train_steps_per_s": (state.step - start_step) / max(seconds, 1e-9),
    }
    if rank == 0:
        final.update(evaluator.finish(state))
    # Result.metrics on the driver are those of the latest checkpoint: the best step's
    # figures. Its best.pt holds the registered generator (the last step was a candidate).
    reports.report_checkpoint(state, final, rank, world_size, evaluator.best if rank == 0 else None)


def _count_nodes(world_size: int) -> int:
    """How many Ray nodes the workers run on (one all-gather at start)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return 1
    import torch.distributed as dist

    nodes: list[str] = [""] * world_size
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


class Evaluator:
    """Rank 0's evaluation: the snapshot's judge (trained on the train split on first use,
    cached by snapshot id), the FID network when eval.inception is on, and the held-out
    splits. Evaluations during training measure val only, as ``val_<metric>``, and offer the
    step to the best-so-far; the end measures the last step on val too (a candidate), then
    the chosen step's generator on test: test figures under their own names are what is
    reported and registered, val figures are what the best step, search and promotion
    select on."""

    def __init__(self, job: WorkerJob, cfg: GanConfig, train_rows, heldout: dict, best=None):
        from flows.train.best import BestSoFar
        from gan_core.evaluate import primary_metric

        self.job, self.cfg, self.train_rows, self.heldout = job, cfg, train_rows, heldout
        self._judge = self._inception = None
        self._tagged = False
        # The direction comes from gan_core with the metric: never assumed per family.
        has_truth = getattr(heldout["test"], "x_truth", None) is not None
        self.primary, self.mode = primary_metric(cfg, has_truth)
        self.best = BestSoFar(self.primary, self.mode)
        if best is not None and not self.best.load_state_dict(best):
            print(
                f"[ganflow] the checkpoint's best step was chosen by {best.get('metric')} "
                f"({best.get('mode')}), not {self.primary} ({self.mode}): chosen again from here",
                file=sys.__stderr__,
                flush=True,
            )

    def judge(self):
        if self._judge is None:
            from flows.train.data_config import judge_data, load_judge

            job = self.job
            self._judge = load_judge(
                job.snapshot_id,
                job.cache_dir,
                judge_data(
                    job.snapshot_id, job.snapshot_root, self.heldout["test"], self.train_rows
                ),
            )
        return self._judge

    def _measure(self, models, split: str) -> dict[str, float]:
        from flows.train.data_config import load_inception
        from gan_core.evaluate import evaluate

        if self.cfg.eval.inception and self._inception is None:
            self._inception = load_inception(self.cfg)
        return evaluate(
            self.cfg, models, self.heldout[split], self.judge(), inception=self._inception
        )

    def _log(self, metrics: dict[str, float], step: int) -> None:
        job = self.job
        if not job.run_id:
            return
        logger = _logger(job)
        logger.log_metrics(metrics, step)
        if not self._tagged:
            tags = {"ganflow.primary_metric": self.primary, "ganflow.judge_task": self.judge().task}
            logger.set_tags(tags, step)
            self._tagged = True

    def validate(self, state) -> dict[str, float]:
        """The val figures at this step (``val_<metric>``), logged as ``eval.val_<metric>``
        (the curve); the step becomes the best so far when its figures pass gan_core's gate
        and its primary figure is better."""
        generators = judged_generators(state)
        figures = self._measure(generators, "val")
        self.best.offer(state.step, figures, generators)
        metrics = {f"val_{k}": v for k, v in figures.items()}
        self._log({f"eval.{k}": v for k, v in metrics.items()}, state.step)
        return metrics

    def finish(self, state) -> dict[str, float]:
        """The end: the last step is evaluated on val as a candidate, then the best step's
        generator is measured on test and registered. Returns the best step's figures: val
        ones as ``val_<metric>``, test ones by name, and ``best_step``. When no step passed
        the gate (a diverged run: no finite figure), the last step's generator is kept."""
        last_val = self.validate(state)
        generators = judged_generators(state)
        if self.best.found:
            step = self.best.step
            generators = self.best.load_into(generators)
            val = {f"val_{k}": v for k, v in self.best.figures.items()}
        else:
            step, val = state.step, last_val
        test = self._measure(generators, "test")
        metrics = {
            **val,
            **test,
            "best_step": step,
            "primary_metric_value": test.get(self.primary, float("nan")),
            "judge_heldout_accuracy": self.judge().heldout_accuracy,
        }
        job = self.job
        if job.run_id:
            from flows import tracking

            # Test figures at the step whose generator they measure; best_step at the end.
            self._log(
                {f"eval.{k}": v for k, v in metrics.items() if k not in val and k != "best_step"},
                step,
            )
            self._log({"best_step": step}, state.step)
            primary_val = val.get(f"val_{self.primary}", float("nan"))
            tags = {
                "ganflow.best_step": str(step),
                "ganflow.best_metric": f"val_{self.primary}",
                "ganflow.best_value": f"{primary_val:.6g}",
            }
            logger = _logger(job)
            logger.set_tags(tags, state.step)
            title = f"{self.cfg.family}: losses"
            logger.deferred(
                "loss_plot",
                {"title": title},
                lambda: log_loss_plot(job.tracking_uri, job.run_id, title),
                state.step,
            )
            # The registered generator's own samples, beside the series of the EMA/live ones.
            from gan_core.evaluate import sample_grid

            images, nrow, _ = sample_grid(self.cfg, generators, self.heldout["test"])
            tracking.log_grid(job.tracking_uri, job.run_id, images, nrow, step, "best_samples")
            logger.log_generator(self.cfg, generators, state.step, {"best_step": step}, tags)
        return metrics


def _logger(job: WorkerJob):
    """Rank 0's logger of this run (one per process: it holds the outage state), able to
    draw the loss plot when it sends a spool."""
    from flows import tracking

    logger = tracking.run_logger(job.tracking_uri, job.run_id)
    logger.handlers.setdefault("loss_plot", replay_loss_plot)
    return logger


def log_loss_plot(uri: str, run_id: str, title: str) -> None:
    """losses.png from the MLflow history (whole run, across resumes)."""
    from flows import tracking
    from flows.train.local import plot_losses

    client = tracking.client(uri)
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("loss")]
    by_step: dict[int, dict[str, float]] = {}
    for k in keys:
        for m in client.get_metric_history(run_id, k):
            by_step.setdefault(m.step, {})[k] = m.value
    history = [(s, v) for s, v in sorted(by_step.items()) if len(v) == len(keys)]
    if not history:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_losses(history, Path(tmp) / "losses.png", title)
        client.log_artifact(run_id, str(path))


def replay_loss_plot(uri: str, run_id: str, record: dict) -> None:
    """A spooled ``loss_plot`` record, drawn once the server holds the whole history."""
    log_loss_plot(uri, run_id, record["title"])

"""`ganflow train`: every GAN family as a Ray Train job (TorchTrainer, the Train V2 API).

One CPU process or many GPU nodes, by configuration alone. The boundary between Ray and
gan_core is :func:`train_loop_per_worker`: it loads the dataset snapshot, builds gan_core's
state with :func:`ddp_wrap` applied to each network separately, restores the latest Ray
checkpoint, and runs gan_core's one training loop with :class:`RayCallback` attached.

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
optimisers, schedulers, step, config) and each rank writes ``rank-<r>.pt`` with its own random
streams (sampler, noise, CycleGAN image pools), so a resumed run draws exactly the batches
and noise the uninterrupted one would have. Files hold tensors and primitives only and load
with ``weights_only=True``. Storage is local (GANFLOW_HOME/ray_results) or ``s3://`` with the
endpoint passed explicitly to pyarrow. FailureConfig restarts a dead worker group from the
latest checkpoint; rerunning a run name resumes it (Ray finds the run in storage, and the
MLflow run tagged with that name is reused).

Reports to Ray are few on purpose: Ray Train's controller takes one report per worker every
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) from a one-deep queue, so reporting at
every log point paced a tiny model at 0.5 log points/s (measured). Losses go to MLflow at
every log point; Ray sees checkpoints, evaluations (``eval_every``, for Tune) and the end.

MLflow: the driver checks the tracking server, creates the run and logs the config and the
dataset snapshot before any cluster work; rank 0 alone logs metrics, sample grids, the
evaluation and the final generator.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from flows.settings import cache_dir, ganflow_home, read_yaml_mapping, snapshot_root
from gan_core.config import (
    DEFAULT_DATASET,
    FAMILIES,
    ConfigError,
    GanConfig,
    apply_overrides,
)

STATE_FILE = "state.pt"
EXPERIMENT = "ganflow-train"

# Settings a worker needs to see as the driver does (no secrets: credentials come from the
# cluster's own environment or instance roles, never through Ray's runtime env).
_FORWARDED_ENV = (
    "GANFLOW_HOME",
    "GANFLOW_STORAGE_ROOT",
    "GANFLOW_MLFLOW_ARTIFACT_ROOT",
    "GANFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "GANFLOW_FID_WEIGHTS",
    "GANFLOW_FID_WEIGHTS_SHA256",
    "GANFLOW_FID_DOWNLOAD",
)


class TrainError(ValueError):
    """A training job cannot start or did not finish; one line for the command line."""


@dataclass(frozen=True)
class FaultInjection:
    """Chaos drill (used by the fault-tolerance test): rank ``rank`` kills its own process with
    SIGKILL when it reaches iteration ``step`` (a log point), once: ``marker`` records it."""

    rank: int
    step: int
    marker: str


@dataclass(frozen=True)
class WorkerJob:
    """What the driver hands every worker (the TorchTrainer's train_loop_config)."""

    config: dict
    snapshot_id: str
    snapshot_root: str
    cache_dir: str
    tracking_uri: str | None = None
    run_id: str | None = None
    checkpoint_every: int = 100
    sample_every: int = 500
    threads: int = 1
    check_replicas: bool = False
    fault: dict | None = None
    eval_every: int | None = None


# --- data -----------------------------------------------------------------------------------


def resolve_dataset(ref: str, root: str, image_size: int | None = None) -> dict:
    """The snapshot manifest for ref (id, name, or builtin: ingested now, at image_size or
    16 px). On the driver, once: workers then load by id, so they never race to ingest."""
    from flows import snapshots

    if ref.startswith("builtin:"):
        from flows.ingest import IngestOptions, ingest_builtin

        result = ingest_builtin(ref, IngestOptions(image_size=image_size or 16), root=root)
        return snapshots.resolve_snapshot(result["id"], root)
    return snapshots.resolve_snapshot(ref, root)


def load_split(job: WorkerJob, cfg: GanConfig, split: str):
    from flows.snapshots import load_dataset

    return load_dataset(job.snapshot_id, split, job.snapshot_root, image_size=cfg.data.image_size)


def _size(data) -> int:
    return min(len(data.x), len(data.y)) if hasattr(data, "x") else len(data)


def load_heldout(job: WorkerJob, cfg: GanConfig) -> dict:
    """{'val': ..., 'test': ...}: selection (Tune, promotion) reads val, the reported figures
    test. A snapshot too small to have a val split (under 2 images a part) selects on test."""
    test = load_split(job, cfg, "test")
    val = load_split(job, cfg, "val")
    if _size(val) < 2:
        val = test
    return {"val": val, "test": test}


class WorkerUserError(RuntimeError):
    """A deterministic error in the training code or its config, raised on a worker: retrying
    it would fail the same way, so the failure policy raises it at once (see _fit)."""


# --- distribution ---------------------------------------------------------------------------


def ddp_wrap(module: nn.Module) -> nn.Module:
    """The one place a network is made data-parallel: moved to this worker's device and, with
    more than one worker, wrapped in DistributedDataParallel (see the module notes)."""
    from ray.train.torch import prepare_model

    return prepare_model(
        module,
        parallel_strategy="ddp",
        # Buffers (BatchNorm statistics) are synced from rank 0 at every forward: the default.
        parallel_strategy_kwargs={"find_unused_parameters": False},
    )


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


# --- checkpoints ----------------------------------------------------------------------------


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def write_checkpoint(state, directory: Path, rank: int, world_size: int) -> None:
    """Rank 0: shared state; every rank: its own random streams (see the module notes)."""
    from gan_core.train import state_dict

    sd = state_dict(state)
    per_rank = {k: sd.pop(k) for k in ("samplers", "noise", "pools")}
    torch.save({**per_rank, "world_size": world_size}, directory / _rank_file(rank))
    if rank == 0:
        torch.save({**sd, "world_size": world_size}, directory / STATE_FILE)


def restore_checkpoint(state, directory: Path, rank: int, world_size: int) -> bool:
    """Load a checkpoint into state. Returns whether this rank's random streams were restored
    (False when the run was resumed at another world size: fresh streams for the new shard)."""
    from gan_core.train import load_state_dict, read_checkpoint, state_dict

    sd = read_checkpoint(directory / STATE_FILE, map_location=state.device)
    rank_path = directory / _rank_file(rank)
    exact = rank_path.exists() and int(sd["world_size"]) == world_size
    if exact:
        per_rank = read_checkpoint(rank_path, map_location="cpu")
    else:
        fresh = state_dict(state)
        per_rank = {k: fresh[k] for k in ("samplers", "noise", "pools")}
    per_rank["noise"] = per_rank["noise"].cpu()  # Generator.set_state wants a CPU ByteTensor
    load_state_dict(state, {**sd, **per_rank})
    return exact


def report_checkpoint(state, metrics: dict, rank: int, world_size: int) -> None:
    """Every rank writes its files into a temporary folder; Ray merges them into one
    checkpoint directory in storage (all ranks must call report the same number of times)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="ganflow-ckpt-") as tmp:
        write_checkpoint(state, Path(tmp), rank, world_size)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint-{state.step:08d}",
        )


# --- the worker side ------------------------------------------------------------------------


class RayCallback:
    """gan_core callback at every log point: average the metrics over ranks, log them to
    MLflow (rank 0), evaluate every ``eval_every`` iterations (rank 0), and report to Ray
    with a checkpoint every ``checkpoint_every`` iterations. Every rank calls it at the same
    iterations, so collectives and reports line up."""

    def __init__(self, job: WorkerJob, rank: int, world_size: int, end: int, evaluator):
        self.job, self.rank, self.world_size, self.end = job, rank, world_size, end
        self.evaluator = evaluator
        self.last_t: float | None = None
        self.latest_eval: dict[str, float] = {}
        self.last_step = 0

    def __call__(self, state, metrics: dict[str, float]) -> None:
        import ray.train

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
        every = self.job.eval_every
        evaluated = bool(every) and state.step % every == 0 and state.step != self.end
        if self.rank == 0 and evaluated:
            self.latest_eval = self.evaluator.run(state, final=False)
        metrics.update(self.latest_eval)
        if self.rank == 0 and self.job.run_id:
            self._track(state, {k: v for k, v in metrics.items() if k not in self.latest_eval})
        fault = self.job.fault
        if (
            fault
            and fault["rank"] == self.rank
            and fault["step"] == state.step
            and not os.path.exists(fault["marker"])
        ):
            Path(fault["marker"]).write_text(str(os.getpid()))
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
        if state.step % self.job.checkpoint_every == 0:
            report_checkpoint(state, metrics, self.rank, self.world_size)
        elif evaluated:
            ray.train.report(metrics)

    def _track(self, state, metrics: dict[str, float]) -> None:
        from flows import tracking
        from gan_core.evaluate import sample_grid

        tracking.log_metrics(
            self.job.tracking_uri, self.job.run_id, {k: v for k, v in metrics.items()}, state.step
        )
        if state.step % self.job.sample_every == 0 or state.step == self.end:
            images, nrow, caption = sample_grid(
                state.cfg, state.models, self.evaluator.heldout["test"]
            )
            tracking.log_grid(self.job.tracking_uri, self.job.run_id, images, nrow, state.step)
            # What the grid's rows are (and whether classes were cut), next to it in the UI.
            tracking.client(self.job.tracking_uri).set_tag(
                self.job.run_id, "ganflow.samples", caption
            )


def train_loop_per_worker(config: dict) -> None:
    """The single boundary between Ray and gan_core (runs on every worker)."""
    import ray.train
    import ray.train.torch

    job = WorkerJob(**config)
    # One intra-op thread per worker by default: several workers share a node's cores, and
    # OpenMP oversubscription slowed training 10-30x on a 2-core machine (measured).
    torch.set_num_threads(job.threads)

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cfg = GanConfig.from_flat_dict(job.config)
    try:
        _train_worker(job, cfg, rank, world_size, device)
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


def _train_worker(job: WorkerJob, cfg: GanConfig, rank: int, world_size: int, device) -> None:
    import ray.train

    from gan_core.train import init_state, train

    train_cpu = load_split(job, cfg, "train")
    data = train_cpu.to(device)
    heldout = load_heldout(job, cfg) if rank == 0 else None
    state = init_state(cfg, data, device, rank, world_size, wrap=ddp_wrap)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            exact = restore_checkpoint(state, Path(d), rank, world_size)
        print(
            f"[ganflow rank {rank}] resumed at iteration {state.step}"
            + ("" if exact else " (world size changed: fresh data/noise streams)"),
            file=sys.__stderr__,
            flush=True,
        )
    end = cfg.train.steps
    nodes = _count_nodes(world_size)
    start_step, t0 = state.step, time.perf_counter()
    evaluator = Evaluator(job, cfg, train_cpu, heldout) if rank == 0 else None
    train(state, data, callbacks=[RayCallback(job, rank, world_size, end, evaluator)])
    seconds = time.perf_counter() - t0
    final: dict[str, float] = {
        "step": state.step,
        "ray_nodes": nodes,
        "ray_workers": world_size,
        # This attempt's training throughput (MLflow logging and checkpoints included).
        "train_steps_per_s": (state.step - start_step) / max(seconds, 1e-9),
    }
    if rank == 0:
        final.update(evaluator.run(state, final=True))
    # Result.metrics on the driver are those of the latest checkpoint: the evaluation.
    report_checkpoint(state, final, rank, world_size)


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
    splits. Periodic evaluations (for Tune) measure val only, as ``val_<metric>``; the final
    one measures val and test: test figures under their own names are what is reported and
    registered, val figures are what search and promotion select on."""

    def __init__(self, job: WorkerJob, cfg: GanConfig, train_cpu, heldout: dict):
        self.job, self.cfg, self.train_cpu, self.heldout = job, cfg, train_cpu, heldout
        self._judge = self._inception = None

    def judge(self):
        if self._judge is None:
            from flows.data_config import load_judge

            self._judge = load_judge(
                self.job.snapshot_id,
                self.job.cache_dir,
                lambda: (self.train_cpu.to("cpu"), self.heldout["test"]),
            )
        return self._judge

    def _measure(self, models, split: str) -> dict[str, float]:
        from flows.data_config import load_inception
        from gan_core.evaluate import evaluate

        if self.cfg.eval.inception and self._inception is None:
            self._inception = load_inception(self.cfg)
        return evaluate(
            self.cfg, models, self.heldout[split], self.judge(), inception=self._inception
        )

    def run(self, state, final: bool) -> dict[str, float]:
        from gan_core.evaluate import primary_metric
        from gan_core.train import plain

        cfg = self.cfg
        # Evaluated on CPU copies: the judge lives on the CPU, and G stays untouched.
        models = {k: copy.deepcopy(plain(v)).cpu() for k, v in state.models.items()}
        primary, _ = primary_metric(cfg, getattr(self.heldout["test"], "x_truth", None) is not None)
        metrics = {f"val_{k}": v for k, v in self._measure(models, "val").items()}
        if final:
            metrics.update(self._measure(models, "test"))
            metrics["primary_metric_value"] = metrics[primary]
            metrics["judge_heldout_accuracy"] = self.judge().heldout_accuracy
        job = self.job
        if job.run_id:
            from flows import tracking

            tracking.log_metrics(
                job.tracking_uri,
                job.run_id,
                {f"eval.{k}": v for k, v in metrics.items()},
                state.step,
            )
            client = tracking.client(job.tracking_uri)
            client.set_tag(job.run_id, "ganflow.primary_metric", primary)
            client.set_tag(job.run_id, "ganflow.judge_task", self.judge().task)
            if final:
                _log_loss_plot(job, cfg)
                tracking.log_generator(job.tracking_uri, job.run_id, cfg, models)
        return metrics


def _log_loss_plot(job: WorkerJob, cfg: GanConfig) -> None:
    """losses.png from the MLflow history (whole run, across resumes)."""
    from flows import tracking
    from flows.local_job import plot_losses

    client = tracking.client(job.tracking_uri)
    keys = [k for k in client.get_run(job.run_id).data.metrics if k.startswith("loss")]
    by_step: dict[int, dict[str, float]] = {}
    for k in keys:
        for m in client.get_metric_history(job.run_id, k):
            by_step.setdefault(m.step, {})[k] = m.value
    history = [(s, v) for s, v in sorted(by_step.items()) if len(v) == len(keys)]
    if not history:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_losses(history, Path(tmp) / "losses.png", f"{cfg.family}: losses")
        client.log_artifact(job.run_id, str(path))


# --- the driver side ------------------------------------------------------------------------


@dataclass
class ClusterSpec:
    """How many workers and what each gets. resources_per_worker CPU may be fractional
    (0.9 lets two workers share 2 cores beside the driver)."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threads: int = 1


@dataclass
class StorageSpec:
    """Where Ray Train keeps checkpoints: a local folder, or s3://bucket/prefix with the
    S3-compatible endpoint passed explicitly (pyarrow may ignore endpoint variables)."""

    url: str | None = None
    endpoint_url: str | None = None

    def resolve(self) -> tuple[str, object | None]:
        url = (
            self.url or os.environ.get("GANFLOW_RAY_STORAGE") or str(ganflow_home() / "ray_results")
        )
        if not url.startswith("s3://"):
            return str(Path(url.removeprefix("file://")).absolute()), None
        from pyarrow import fs as pafs

        endpoint = (
            self.endpoint_url
            or os.environ.get("GANFLOW_S3_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        kwargs: dict[str, object] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
        return url.removeprefix("s3://").rstrip("/"), pafs.S3FileSystem(**kwargs)


@dataclass
class TrainRequest:
    cfg: GanConfig
    dataset: str
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    run_name: str | None = None
    experiment: str = EXPERIMENT
    checkpoint_every: int | None = None
    """Iterations between checkpoints (default: 5 log points; always one at the end). Each is
    a ray.train.report, and Ray takes one report per worker per
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): checkpoints more often than that pace training."""
    sample_every: int | None = None
    """Iterations between sample grids in MLflow (default: 5 log points)."""
    max_failures: int = 3
    keep_checkpoints: int = 2
    tracking: bool = True
    check_replicas: bool = False
    fault: FaultInjection | None = None
    cache_dir: str | None = None
    auto_bf16: bool = True
    """On GPUs, switch fp32 to bf16 autocast (off when the user set train.precision)."""
    eval_every: int | None = None
    """Held-out evaluation every N iterations (a multiple of log_every), reported to Ray under
    the metrics' own names (Tune's schedulers read them) and to MLflow as eval.*; later
    reports carry the latest figures. None: at the end only."""
    parent_run_id: str | None = None
    """MLflow parent run (a search), recorded as mlflow.parentRunId."""
    trainer_callbacks: list = field(default_factory=list)
    """Ray Train UserCallbacks (e.g. Tune's TuneReportCallback)."""


def ensure_ray(log_to_driver: bool = True) -> None:
    """Connect to RAY_ADDRESS when set, else start a local cluster. Never ray.init()'s own
    fallback, which joins whatever cluster `ray start` last left on this machine."""
    import ray

    from flows import console

    console.reapply()  # importing ray configured its loggers
    if not ray.is_initialized():
        kwargs = {}
        if console.quiet():
            # Workers' and the Train controller's INFO chatter stays in Ray's session logs;
            # ganflow's own progress lines (plain prints on rank 0) still reach the console.
            kwargs["logging_config"] = ray.LoggingConfig(log_level="WARNING")
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            log_to_driver=log_to_driver,
            **kwargs,
        )
        console.reapply()


def max_gpus_setting() -> float | None:
    """GANFLOW_RAY_MAX_GPUS: the most GPUs an autoscaling cluster can grow to (KubeRay's
    maxReplicas x GPUs per pod, the launcher's max_workers x GPUs per instance). Unset for a
    fixed cluster, whose current GPUs are all it will ever have."""
    raw = os.environ.get("GANFLOW_RAY_MAX_GPUS", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise TrainError(f"GANFLOW_RAY_MAX_GPUS must be a number, got {raw!r}") from None
    if value < 0:
        raise TrainError(f"GANFLOW_RAY_MAX_GPUS must be >= 0, got {raw!r}")
    return value


def gpu_capacity() -> float:
    """GPUs the cluster has now, or can grow to when it autoscales (GANFLOW_RAY_MAX_GPUS)."""
    import ray

    return max(ray.cluster_resources().get("GPU", 0.0), max_gpus_setting() or 0.0)


def check_resources(cluster: ClusterSpec) -> None:
    """Fail before any work when the cluster cannot give the job its GPUs. An autoscaling
    cluster (GANFLOW_RAY_MAX_GPUS set) may have none now and start GPU nodes on demand, so it
    is checked against what it can grow to; Ray Train then waits for the nodes."""
    import ray

    need = cluster.workers * cluster.gpus_per_worker
    if need <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0.0)
    if have >= need:
        return
    ceiling = max_gpus_setting()
    short = (
        f"the job needs {need:g} GPUs ({cluster.workers} workers x "
        f"{cluster.gpus_per_worker:g}), the Ray cluster has {have:g}"
    )
    if ceiling is None:
        raise TrainError(f"{short} (set GANFLOW_RAY_MAX_GPUS if it autoscales)")
    if ceiling < need:
        raise TrainError(f"{short} and can grow to {ceiling:g} (GANFLOW_RAY_MAX_GPUS)")
    print(
        f"[ganflow] the cluster has {have:g} of the {need:g} GPUs the job needs; "
        f"waiting for the autoscaler (GANFLOW_RAY_MAX_GPUS={ceiling:g})",
        file=sys.stderr,
        flush=True,
    )


def prove_config(cfg: GanConfig, manifest: dict, root: str) -> None:
    """Before any cluster work: the config fits the snapshot, the FID weights are in place
    when asked for, and one iteration, a grid and an evaluation run on a few real images
    (seconds). Each failure is one line (ConfigError or the weights' error)."""
    from flows import data_config
    from flows.snapshots import load_dataset

    data_config.check_config(cfg, manifest)
    data_config.check_inception(cfg)
    train = load_dataset(manifest["id"], "train", root)
    heldout = load_dataset(manifest["id"], "test", root)
    data_config.dry_run(cfg, train, heldout)


def default_run_name(cfg: GanConfig) -> str:
    return f"{cfg.family}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_training(req: TrainRequest) -> dict:
    """Validate, check the tracking server, resolve the snapshot, then fit on Ray.
    Returns run_id, run_name, metrics (held-out evaluation), checkpoint, snapshot_id."""
    from flows import tracking

    cfg = req.cfg
    cluster = req.cluster
    if cluster.workers < 1:
        raise TrainError(f"--workers must be >= 1, got {cluster.workers}")
    uri = run_id = None
    if req.tracking:
        uri = tracking.tracking_uri()
        tracking.check_reachable(uri)  # before any cluster work: fail in seconds, not hours
    root = snapshot_root()
    manifest = resolve_dataset(req.dataset, root, cfg.data.image_size)
    cfg = apply_overrides(cfg, {"data.dataset": manifest["id"]})
    prove_config(cfg, manifest, root)
    run_name = req.run_name or default_run_name(cfg)

    ensure_ray()
    check_resources(cluster)
    use_gpu = cluster.gpus_per_worker > 0
    if use_gpu and req.auto_bf16 and cfg.train.precision == "fp32":
        # bf16 autocast of forward passes on GPUs (losses stay fp32 in gan_core).
        cfg = apply_overrides(cfg, {"train.precision": "bf16"})

    if req.tracking:
        exp_id = tracking.ensure_experiment(uri, req.experiment)
        tags = {
            "ganflow.family": cfg.family,
            "ganflow.snapshot_id": manifest["id"],
            "ganflow.workers": str(cluster.workers),
        }
        if req.parent_run_id:
            tags["mlflow.parentRunId"] = req.parent_run_id
        run_id = tracking.find_or_create_run(uri, exp_id, run_name, tags)
        extra = {
            "ray.workers": cluster.workers,
            "ray.gpus_per_worker": cluster.gpus_per_worker,
            "global_batch_size": cfg.train.batch_size * cluster.workers,
            "dataset.id": manifest["id"],
            "dataset.name": manifest.get("name", ""),
        }
        tracking.log_config(uri, run_id, cfg, extra)
        tracking.log_dataset_input(uri, run_id, manifest, root)

    log_every = cfg.train.log_every
    job = WorkerJob(
        config=cfg.to_flat_dict(),
        snapshot_id=manifest["id"],
        snapshot_root=root,
        cache_dir=req.cache_dir or str(cache_dir()),
        tracking_uri=uri,
        run_id=run_id,
        checkpoint_every=req.checkpoint_every or 5 * log_every,
        sample_every=req.sample_every or 5 * log_every,
        threads=cluster.threads,
        check_replicas=req.check_replicas,
        fault=asdict(req.fault) if req.fault else None,
        eval_every=req.eval_every,
    )
    result = _fit(job, cluster, req, run_name, use_gpu)
    if req.tracking:
        tracking.finish_run(uri, run_id, "FINISHED" if result["ok"] else "FAILED")
    if not result["ok"]:
        raise TrainError(f"training run {run_name} failed: {result['error']}")
    metrics = {k: v for k, v in result["metrics"].items() if k not in ("step",)}
    return {
        "run_id": run_id,
        "run_name": run_name,
        "family": cfg.family,
        "snapshot_id": manifest["id"],
        "steps": int(result["metrics"].get("step", 0)),
        "metrics": metrics,
        "checkpoint": result["checkpoint"],
        "storage": result["storage"],
    }


def _fit(job: WorkerJob, cluster: ClusterSpec, req: TrainRequest, run_name: str, use_gpu: bool):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    storage_path, filesystem = req.storage.resolve()
    resources = {"CPU": cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    env.setdefault("GANFLOW_HOME", str(ganflow_home()))
    trainer = _Trainer(
        train_loop_per_worker,
        train_loop_config=asdict(job),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cluster.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=req.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=req.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
            # Ray Train's INFO lines (resources, process groups, every report) go to Ray's
            # session logs on a quiet console; ganflow's own lines still show.
            logging_config=_train_logging(),
            callbacks=list(req.trainer_callbacks) or None,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: one line for the user
        return {
            "ok": False,
            "error": failure_cause(exc),
            "metrics": {},
            "checkpoint": None,
            "storage": "",
        }
    ckpt = result.checkpoint.path if result.checkpoint else None
    return {
        "ok": True,
        "error": None,
        "metrics": dict(result.metrics or {}),
        "checkpoint": ckpt,
        "storage": f"{'s3://' if filesystem is not None else ''}{storage_path}/{run_name}",
    }


def _train_logging():
    import ray

    from flows import console

    return ray.LoggingConfig(log_level="WARNING" if console.quiet() else "INFO")


def failure_cause(exc: BaseException) -> str:
    """One line naming what went wrong: the first worker's own error (Ray's message starts
    with 'Training failed due to worker errors:' and puts the causes in tracebacks)."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        text = str(failures[rank]).strip()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # The exception's own line is the last one of its traceback text.
        cause = next((ln for ln in reversed(lines) if "WorkerUserError" in ln), None)
        cause = cause or (lines[-1] if lines else type(failures[rank]).__name__)
        cause = cause.split("WorkerUserError: ", 1)[-1]
        return f"rank {rank}: {cause}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _make_trainer_class():
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.failure_handling import (
        DefaultFailurePolicy,
        FailureDecision,
    )

    class UserErrorsRaise(DefaultFailurePolicy):
        """Retry worker and node loss (FailureConfig.max_failures) but never a deterministic
        error in the training code: it would fail the same way on every attempt."""

        def make_decision(self, training_failed_error):
            failures = getattr(training_failed_error, "worker_failures", None) or {}
            if any("WorkerUserError" in str(e) for e in failures.values()):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    class Trainer(TorchTrainer):
        # The one seam Ray Train V2 offers for the failure policy is the controller's
        # constructor arguments; the policy object is sent to the controller actor.
        def _initialize_and_run_controller(self, **kwargs):
            kwargs["failure_policy"] = UserErrorsRaise(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer


def _Trainer(*args, **kwargs):
    return _make_trainer_class()(*args, **kwargs)


# --- command line ---------------------------------------------------------------------------


def user_overrides(config_file: str | None, overrides: list[str]) -> dict[str, object]:
    """--config FILE (flat or nested JSON/YAML key: value) < --set key=value, as
    {'section.field': value} with leaf names resolved (unknown keys fail here)."""
    from gan_core.config import resolve_key

    flat: dict[str, object] = {}
    if config_file:
        flat = _flatten(read_yaml_mapping(config_file, "--config file", TrainError))
        flat.pop("family", None)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item}: overrides must look like key=value")
        flat[key.strip()] = value.strip()
    out = {}
    for key, value in flat.items():
        section, name = resolve_key(key)
        out[f"{section}.{name}"] = value
    return out


def build_config(
    family: str, config_file: str | None, overrides: list[str], dataset: str | None = None
) -> tuple[GanConfig, bool]:
    """The config for family on a dataset (default: the family's built-in): the preset for
    the snapshot's image size, the snapshot's facts, --config FILE, then --set. Returns it
    and whether the user set train.precision (else GPUs default to bf16). Resolves the
    dataset on this machine (a built-in is ingested), before any Ray work."""
    from flows.data_config import config_for_snapshot

    user = user_overrides(config_file, overrides)
    ref = dataset or DEFAULT_DATASET[family]
    size = user.get("data.image_size")
    manifest = resolve_dataset(ref, snapshot_root(), int(size) if size is not None else None)
    return config_for_snapshot(family, manifest, user), "train.precision" in user


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def cmd_train(args: argparse.Namespace) -> dict:
    if args.flow:
        from flows.train_flow import train_flow

        result = train_flow(
            family=args.family,
            dataset=args.dataset,
            overrides=args.overrides,
            config_file=args.config,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            threads=args.threads,
            storage=args.storage,
            s3_endpoint_url=args.s3_endpoint_url,
            run_name=args.run_name,
            checkpoint_every=args.checkpoint_every,
            max_failures=args.max_failures,
        )
    else:
        cfg, precision_set = build_config(args.family, args.config, args.overrides, args.dataset)
        req = TrainRequest(
            cfg=cfg,
            dataset=cfg.data.dataset,
            cluster=ClusterSpec(
                workers=args.workers,
                gpus_per_worker=args.gpus_per_worker,
                cpus_per_worker=args.cpus_per_worker,
                threads=args.threads,
            ),
            storage=StorageSpec(args.storage, args.s3_endpoint_url),
            run_name=args.run_name,
            checkpoint_every=args.checkpoint_every,
            max_failures=args.max_failures,
            auto_bf16=not precision_set,
        )
        result = run_training(req)
    if not args.json:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
        print(f"run {result['run_name']} (MLflow run {result['run_id']}): {shown}")
        print(f"checkpoint: {result['checkpoint']}")
    return result


def add_commands(sub, add_common) -> None:
    p = sub.add_parser(
        "train",
        help="train a GAN family as a Ray Train job (local or RAY_ADDRESS), tracked in MLflow",
    )
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument(
        "--dataset",
        metavar="SNAPSHOT",
        help="snapshot id or name, or builtin:digits / builtin:digits-unpaired "
        "(default: the family's built-in)",
    )
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: 1)")
    p.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default: 0, CPU)"
    )
    p.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default: 1)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads per worker (default: 1)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. d_steps=3 or lambda_cyc=10 (repeatable); "
        "train.batch_size is per worker",
    )
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of config fields")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="checkpoint storage: a folder or s3://bucket/prefix "
        "(default: GANFLOW_RAY_STORAGE, else GANFLOW_HOME/ray_results)",
    )
    p.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        help="S3-compatible endpoint for s3:// storage (default: GANFLOW_S3_ENDPOINT_URL, "
        "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)",
    )
    p.add_argument(
        "--run-name", help="Ray run name; rerunning an existing name resumes it (default: new)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="iterations between checkpoints (default: 5 x log_every; always at the end)",
    )
    p.add_argument(
        "--max-failures", type=int, default=3, help="worker-group restarts allowed (default: 3)"
    )
    p.add_argument("--flow", action="store_true", help="run inside the Prefect flow")
    add_common(p)
    p.set_defaults(func=cmd_train)


if __name__ == "__main__":  # pragma: no cover
    from flows.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))

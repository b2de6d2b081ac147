"""The driver side of a training job: connect to Ray, check resources, prove the config on a
few real images, create the MLflow run, fit the TorchTrainer, and turn failures into one
line. Training takes a snapshot's manifest: callers resolve references first (the commands
and flows, flows.orchestration.inputs), so training never ingests."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from flows.preflight import ensure_ray
from flows.settings import cache_dir, forwarded_env, ganflow_home, inside, snapshot_root
from flows.snapshots.manifest import Manifest
from flows.train.spec import (
    ClusterSpec,
    TrainError,
    TrainRequest,
    TrainResult,
    WorkerJob,
    WorkerUserError,
)
from flows.train.worker import train_loop_per_worker
from gan_core.config import GanConfig
from gan_core.overrides import apply_overrides


def _max_setting(var: str) -> float | None:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise TrainError(f"{var} must be a number, got {raw!r}") from None
    if not value >= 0:  # also refuses nan
        raise TrainError(f"{var} must be >= 0, got {raw!r}")
    return value


def max_gpus_setting() -> float | None:
    """GANFLOW_RAY_MAX_GPUS: the most GPUs an autoscaling cluster can grow to (KubeRay's
    maxReplicas x GPUs per pod, the launcher's max_workers x GPUs per instance). Unset for a
    fixed cluster, whose current GPUs are all it will ever have."""
    return _max_setting("GANFLOW_RAY_MAX_GPUS")


def max_cpus_setting() -> float | None:
    """GANFLOW_RAY_MAX_CPUS: the most CPUs an autoscaling cluster can grow to (same reading
    as GANFLOW_RAY_MAX_GPUS). Unset: the cluster's CPUs now are all it will have, except
    that a GPU job on a cluster with GANFLOW_RAY_MAX_GPUS set gets its CPUs with the GPU
    nodes it waits for, so its CPUs are not checked then."""
    return _max_setting("GANFLOW_RAY_MAX_CPUS")


def gpu_capacity() -> float:
    """GPUs the cluster has now, or can grow to when it autoscales (GANFLOW_RAY_MAX_GPUS)."""
    import ray

    return max(ray.cluster_resources().get("GPU", 0.0), max_gpus_setting() or 0.0)


def _shortfall(kind: str, need: float, have: float, ceiling: float | None, cluster) -> bool:
    """Raise when the cluster can never give `need`; True when it can only after growing
    (the caller says it waits), False when it has enough now."""
    if have >= need:
        return False
    per = cluster.gpus_per_worker if kind == "GPU" else cluster.cpus_per_worker
    var = f"GANFLOW_RAY_MAX_{kind}S"
    short = (
        f"the job needs {need:g} {kind}s ({cluster.workers} workers x {per:g}), "
        f"the Ray cluster has {have:g}"
    )
    if ceiling is None:
        raise TrainError(f"{short} (set {var} if it autoscales)")
    if ceiling < need:
        raise TrainError(f"{short} and can grow to {ceiling:g} ({var})")
    print(
        f"[ganflow] the cluster has {have:g} of the {need:g} {kind}s the job needs; "
        f"waiting for the autoscaler ({var}={ceiling:g})",
        file=sys.stderr,
        flush=True,
    )
    return True


def check_resources(cluster: ClusterSpec) -> None:
    """Fail before any work when the cluster cannot give the job its CPUs or GPUs: Ray would
    otherwise wait for them forever. An autoscaling cluster (GANFLOW_RAY_MAX_CPUS /
    GANFLOW_RAY_MAX_GPUS set) is checked against what it can grow to, and Ray Train then
    waits for the nodes. A fixed cluster must also have one node with a worker's CPUs (a
    worker's resources come from one node)."""
    import ray

    total = ray.cluster_resources()
    need_gpus = cluster.workers * cluster.gpus_per_worker
    gpu_ceiling = max_gpus_setting()
    if need_gpus > 0:
        _shortfall("GPU", need_gpus, total.get("GPU", 0.0), gpu_ceiling, cluster)
    cpu_ceiling = max_cpus_setting()
    if cpu_ceiling is None and need_gpus > 0 and gpu_ceiling is not None:
        return  # the GPU nodes the autoscaler adds bring their own CPUs
    need_cpus = cluster.workers * cluster.cpus_per_worker
    if _shortfall("CPU", need_cpus, total.get("CPU", 0.0), cpu_ceiling, cluster):
        return
    if cpu_ceiling is None:
        largest = max(
            (n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0
        )
        if cluster.cpus_per_worker > largest:
            raise TrainError(
                f"a worker needs {cluster.cpus_per_worker:g} CPUs (--cpus-per-worker) and the "
                f"largest Ray node has {largest:g}"
            )


def prove_config(cfg: GanConfig, manifest: Manifest, root: str) -> None:
    """Before any cluster work: the config fits the snapshot, the FID weights are in place
    when asked for, and one iteration, a grid and an evaluation run on a few real images
    (seconds). Each failure is one line (ConfigError or the weights' error)."""
    from flows.snapshots.load import load_dataset
    from flows.train import data_config

    data_config.check_config(cfg, manifest)
    data_config.check_inception(cfg)
    # A few rows of each split's first shard: seconds, whatever the snapshot's size.
    train = load_dataset(manifest.id, "train", root, limit=4, first_shard=True)
    heldout = load_dataset(manifest.id, "test", root, limit=10, first_shard=True)
    data_config.dry_run(cfg, train, heldout)


def default_run_name(cfg: GanConfig) -> str:
    return f"{cfg.family}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_training(req: TrainRequest) -> TrainResult:
    """Validate, check the tracking server, prove the config on the snapshot, then fit on
    Ray."""
    from flows import orphans, tracking

    req.check()  # numbers and names, before any I/O
    cfg = req.cfg
    cluster = req.cluster
    uri = run_id = None
    if req.tracking:
        uri = tracking.tracking_uri()
        tracking.check_reachable(uri)  # before any cluster work: fail in seconds, not hours
    root = snapshot_root()
    manifest = req.manifest
    cfg = apply_overrides(cfg, {"data.dataset": manifest.id})
    prove_config(cfg, manifest, root)
    run_name = req.run_name or default_run_name(cfg)

    ensure_ray()
    check_resources(cluster)
    use_gpu = cluster.gpus_per_worker > 0
    # train.precision 'auto' (nothing set anywhere) is bf16 on CUDA and fp32 on CPU, decided
    # by gan_core on each worker's device; a value the user set is never rewritten here.

    if not req.storage.is_remote():  # the run's folder stays under the storage root
        storage_path, _ = req.storage.resolve()
        inside(storage_path, os.path.join(storage_path, run_name))
    if req.tracking:
        _route_mlflow_logs()
        run_id = _open_run(req, cfg, uri, run_name, reap=True)
    try:
        # The heartbeat tells a later command whether this process still owns the run.
        with orphans.Heartbeat(uri, run_id) if run_id else contextlib.nullcontext():
            job = _track(req, cfg, manifest, root, uri, run_id)
            result = _fit(job, cluster, req, run_name, use_gpu)
    except BaseException as exc:
        # Never leave the MLflow run RUNNING: Ctrl-C is KILLED, any other failure FAILED.
        if run_id is not None:
            _end_run(uri, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if req.tracking:
        tracking.finish_run(uri, run_id, "FINISHED" if result.ok else "FAILED")
    if not result.ok:
        raise TrainError(f"training run {run_name} failed: {result.error}")
    return TrainResult(
        run_id=run_id,
        run_name=run_name,
        family=cfg.family,
        snapshot_id=manifest.id,
        steps=int(result.metrics.get("step", 0)),
        metrics={k: v for k, v in result.metrics.items() if k != "step"},
        checkpoint=result.checkpoint,
        storage=result.storage,
    )


def train_in_trial(req: TrainRequest) -> None:
    """A 1-worker run trained in the calling Tune trial's own actor (flows.tune.search), not
    as a Ray Train run inside it: the trial's process is the worker, so a trial costs one
    process, not a controller, its helper actors, a worker group and their placement group
    (a Train run that does nothing took 8 s and 14 CPU-seconds on a 2-core machine,
    measured). The MLflow run, its config and dataset, the loop, evaluations, checkpoints
    and the registered generator are a Train run's (flows.train.worker); reports and
    checkpoints go to Tune (:class:`flows.train.worker.TuneReports`), which keeps the latest
    two (the search's checkpoint config) and resumes the trial from the latest. The search checked the tracking server, the
    config and the resources, and reaped orphaned runs, before any trial started."""
    from flows import orphans, tracking
    from flows.train.worker import TuneReports, train_in_this_process

    req.check()
    if req.cluster.workers != 1:
        raise TrainError(f"a run in a trial's process has one worker, not {req.cluster.workers}")
    cfg = apply_overrides(req.cfg, {"data.dataset": req.manifest.id})
    run_name = req.run_name or default_run_name(cfg)
    uri = run_id = None
    if req.tracking:
        uri = tracking.tracking_uri()
        run_id = _open_run(req, cfg, uri, run_name, reap=False)
    try:
        with orphans.Heartbeat(uri, run_id) if run_id else contextlib.nullcontext():
            job = _track(req, cfg, req.manifest, snapshot_root(), uri, run_id)
            train_in_this_process(job, TuneReports(), use_gpu=req.cluster.gpus_per_worker > 0)
    except BaseException as exc:
        # Tune stops a trial (ASHA) by ending its thread at the next report (SystemExit).
        if run_id is not None:
            stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
            _end_run(uri, run_id, "KILLED" if stopped else "FAILED")
        raise
    if run_id is not None:
        tracking.finish_run(uri, run_id)


def _open_run(req: TrainRequest, cfg: GanConfig, uri: str, run_name: str, reap: bool) -> str:
    """The run's MLflow run (found by name when resumed, else created) with its tags."""
    from flows import orphans, tracking

    exp_id = tracking.ensure_experiment(uri, req.experiment)
    tags = {
        "ganflow.family": cfg.family,
        "ganflow.snapshot_id": req.manifest.id,
        "ganflow.workers": str(req.cluster.workers),
    }
    if req.parent_run_id:
        tags["mlflow.parentRunId"] = req.parent_run_id
    if reap:
        orphans.reap(uri, [exp_id])  # runs a SIGKILL left RUNNING (before one is resumed)
    return tracking.find_or_create_run(uri, exp_id, run_name, tags)


def _route_mlflow_logs() -> None:
    """MLflow sets its own console handler when imported (its INFO lines about creating the
    database would reach the terminal): import it, then route its loggers as the others."""
    import mlflow  # noqa: F401

    from flows import console

    console.reapply()


def _end_run(uri: str, run_id: str, status: str) -> None:
    from flows import tracking

    # The server may be what failed; the original error is the one to show.
    with contextlib.suppress(Exception):
        tracking.finish_run(uri, run_id, status)


@dataclass(frozen=True)
class _Fit:
    """How the TorchTrainer's fit ended: ``error`` (one line) when it failed, else the last
    report's metrics and checkpoint and the run's storage folder."""

    error: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    storage: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def _track(req, cfg, manifest, root, uri, run_id) -> WorkerJob:
    """The run's config and dataset into its MLflow run; the job its workers train."""
    from flows import tracking

    cluster = req.cluster
    if req.tracking:
        extra = {
            "ray.workers": cluster.workers,
            "ray.gpus_per_worker": cluster.gpus_per_worker,
            "global_batch_size": cfg.train.batch_size * cluster.workers,
            "dataset.id": manifest.id,
            "dataset.name": manifest.name,
        }
        tracking.log_config(uri, run_id, cfg, extra)
        tracking.log_dataset_input(uri, run_id, manifest.id, manifest.name, root)

    log_every = cfg.train.log_every
    return WorkerJob(
        config=cfg,
        snapshot_id=manifest.id,
        snapshot_root=root,
        cache_dir=req.cache_dir or str(cache_dir()),
        tracking_uri=uri,
        run_id=run_id,
        checkpoint_every=req.checkpoint_every or 5 * log_every,
        sample_every=req.sample_every or 5 * log_every,
        threads=cluster.threads,
        check_replicas=req.check_replicas,
        fault=req.fault,
        warm_start=req.warm_start,
    )


def fit_job(job: WorkerJob, req: TrainRequest, run_name: str) -> _Fit:
    """Fit ``job`` on ``req.cluster``'s workers as the Ray Train run ``run_name``, for a
    caller that owns the MLflow run and built the job itself (a PBT trial on several
    workers)."""
    return _fit(job, req.cluster, req, run_name, req.cluster.gpus_per_worker > 0)


def _fit(
    job: WorkerJob, cluster: ClusterSpec, req: TrainRequest, run_name: str, use_gpu: bool
) -> _Fit:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    storage_path, filesystem = req.storage.resolve()
    resources = {"CPU": cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    env = forwarded_env()
    env.setdefault("GANFLOW_HOME", str(ganflow_home()))
    from flows import console

    if console.quiet():
        env["GANFLOW_QUIET_WORKERS"] = "1"  # see worker.quiet_train_reports
    trainer = _Trainer(
        train_loop_per_worker,
        train_loop_config=job.to_wire(),
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
    from flows.train.checkpoints import sweep_staging

    sweep_staging()  # what killed workers of earlier runs on this node left in /tmp
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: one line for the user
        return _Fit(error=failure_cause(exc))
    return _Fit(
        metrics=dict(result.metrics or {}),
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        storage=f"{'s3://' if filesystem is not None else ''}{storage_path}/{run_name}",
    )


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


def user_error_in(training_failed_error: BaseException) -> bool:
    """Whether the workers failed with WorkerUserErrors only. Ray Train hands the policy the
    workers' own exceptions (unwrapped from its traceback holder), whose text is only the
    message: the type decides, by name, as the controller may hold its own copy of the
    class (the text check covers errors that arrive as traceback strings). Every failure
    must be one: when a worker died, the others' errors are its echo and a retry is right."""
    failures = getattr(training_failed_error, "worker_failures", None) or {}
    name = WorkerUserError.__name__
    return bool(failures) and all(
        any(c.__name__ == name for c in type(e).__mro__) or f"{name}:" in str(e)
        for e in failures.values()
    )


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
            if user_error_in(training_failed_error):
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

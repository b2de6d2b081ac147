"""What a training job is: the request the driver takes, the cluster and storage it asks for,
and the job every worker is handed. Plain data, importable anywhere (no Ray at import)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from flows.settings import check_name, ray_storage
from flows.snapshots.manifest import Manifest
from gan_core.config import GanConfig
from gan_core.overrides import from_flat_dict

STATE_FILE = "state.pt"
EXPERIMENT = "ganflow-train"


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
    """What the driver hands every worker (the TorchTrainer's train_loop_config), typed on
    both sides: :meth:`to_wire` and :meth:`from_wire` are the one conversion."""

    config: GanConfig
    snapshot_id: str
    snapshot_root: str
    cache_dir: str
    tracking_uri: str | None = None
    run_id: str | None = None
    checkpoint_every: int = 100
    sample_every: int = 500
    threads: int = 1
    check_replicas: bool = False
    fault: FaultInjection | None = None
    warm_start: str | None = None
    """A checkpoint (path in the Ray storage) whose networks, optimiser moments and averages
    a fresh run starts from (gan_core.train.warm_start); a resumed run ignores it."""
    pbt_clock: str | None = None
    """Set for a PBT trial that trains on several workers (flows.tune.pbt): every checkpoint
    report also carries the step under this name (PBT's clock; the final report does not,
    so a finished trial is never exploited), and a run started from a checkpoint (the
    donor's, on exploit) takes this job's hyperparameters once the donor's state is loaded."""
    start_from: str | None = None
    """A complete checkpoint (a local path or s3:// URL) that a new run resumes from as if it
    were its own latest: the PBT donor's (Ray Train V2 has no resume_from_checkpoint). A run
    that has checkpoints of its own resumes from those instead."""

    def to_wire(self) -> dict[str, object]:
        """The job as primitives for the TorchTrainer's train_loop_config. Ray pickles the
        config to the workers, but Ray Train V2 also exports it, made JSON-safe, as the run's
        settings (dashboard, state API): there a GanConfig would be a repr, its flat dict is
        readable. The config's flat form round-trips exactly (gan_core.overrides), so a
        resumed run rebuilds the same networks and streams."""
        wire = {f.name: getattr(self, f.name) for f in fields(self)}
        wire["config"] = self.config.to_flat_dict()
        wire["fault"] = asdict(self.fault) if self.fault else None
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, object]) -> WorkerJob:
        """Inverse of :meth:`to_wire` (on the worker)."""
        fault = wire.get("fault")
        return cls(
            **{
                **wire,
                "config": from_flat_dict(wire["config"]),
                "fault": FaultInjection(**fault) if fault else None,
            }
        )


@dataclass(frozen=True)
class TrainResult:
    """A finished training run: its MLflow run (None untracked) and Ray run name, the
    snapshot it trained on, the iterations it reached, the best val step's figures (test
    ones by name, val ones as val_<metric>, and best_step), its last checkpoint and the
    folder (or s3:// prefix) Ray Train keeps it in."""

    run_id: str | None
    run_name: str
    family: str
    snapshot_id: str
    steps: int
    metrics: Mapping[str, float]
    checkpoint: str | None
    storage: str

    def to_dict(self) -> dict:
        """As JSON values, in the order `ganflow train --json` has always printed."""
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "family": self.family,
            "snapshot_id": self.snapshot_id,
            "steps": self.steps,
            "metrics": dict(self.metrics),
            "checkpoint": self.checkpoint,
            "storage": self.storage,
        }


class WorkerUserError(RuntimeError):
    """A deterministic error in the training code or its config, raised on a worker: retrying
    it would fail the same way, so the failure policy raises it at once (see _fit)."""


# --- the driver side ------------------------------------------------------------------------


@dataclass
class ClusterSpec:
    """How many workers and what each gets. resources_per_worker CPU may be fractional
    (0.9 lets two workers share 2 cores beside the driver)."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threads: int = 1

    def check(self, workers_flag: str = "--workers") -> ClusterSpec:
        """Each value in range, one line naming the flag, before any work: Ray would accept
        0 CPUs per worker (unbounded oversubscription) and torch fails late on 0 threads."""
        if not _is_int(self.workers) or self.workers < 1:
            raise TrainError(f"{workers_flag} must be an integer >= 1, got {self.workers!r}")
        if not _is_num(self.cpus_per_worker) or self.cpus_per_worker <= 0:
            raise TrainError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker!r}")
        if not _is_num(self.gpus_per_worker) or self.gpus_per_worker < 0:
            raise TrainError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker!r}")
        if not _is_int(self.threads) or self.threads < 1:
            raise TrainError(f"--threads must be an integer >= 1, got {self.threads!r}")
        g = self.gpus_per_worker
        if self.workers > 1 and g > 0 and g != int(g):
            # GPU workers talk over NCCL, which refuses two ranks on one device; a single
            # worker (e.g. Tune packing trials onto one GPU) has no peer and is fine.
            raise TrainError(
                f"--gpus-per-worker {g:g} with {self.workers} workers would put two NCCL ranks "
                "on one GPU, which NCCL refuses; use whole GPUs per worker (1, 2, ...)"
            )
        return self


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


@dataclass
class StorageSpec:
    """Where Ray Train keeps checkpoints: a local folder, or s3://bucket/prefix with the
    S3-compatible endpoint passed explicitly (pyarrow may ignore endpoint variables)."""

    url: str | None = None
    endpoint_url: str | None = None

    def is_remote(self) -> bool:
        return (self.url or ray_storage()).startswith("s3://")

    def resolve(self) -> tuple[str, object | None]:
        url = self.url or ray_storage()
        if not url.startswith("s3://"):
            return str(Path(url.removeprefix("file://")).absolute()), None
        from pyarrow import fs as pafs

        from flows.storage import s3_endpoint

        endpoint = self.endpoint_url or s3_endpoint()
        kwargs: dict[str, object] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
        return url.removeprefix("s3://").rstrip("/"), pafs.S3FileSystem(**kwargs)


@dataclass
class TrainRequest:
    cfg: GanConfig
    manifest: Manifest
    """The snapshot to train on, resolved by the caller (flows.orchestration.inputs)."""
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
    parent_run_id: str | None = None
    """MLflow parent run (a search), recorded as mlflow.parentRunId."""
    trainer_callbacks: list = field(default_factory=list)
    """Ray Train UserCallbacks (e.g. Tune's TuneReportCallback)."""
    warm_start: str | None = None
    """Start from this checkpoint's networks (a champion's run), not from random weights."""

    def check(self) -> TrainRequest:
        """Everything checkable without I/O, in one line each: the cluster's numbers, the
        run name (a folder under the Ray storage root, so never a path), the intervals."""
        self.cluster.check()
        if self.run_name is not None:
            check_name(self.run_name, "--run-name", TrainError)
        for flag, value in (
            ("--checkpoint-every", self.checkpoint_every),
            ("sample_every", self.sample_every),
        ):
            if value is not None and (not _is_int(value) or value < 1):
                raise TrainError(f"{flag} must be an integer >= 1, got {value!r}")
        if not _is_int(self.max_failures) or self.max_failures < -1:
            raise TrainError(
                f"--max-failures must be an integer >= 0 (or -1: no limit), got {self.max_failures!r}"
            )
        return self

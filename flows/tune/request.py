"""What a search is asked (:class:`SearchRequest`) and what each of its trials is handed
(:class:`TrialContext`).

Both live beside :func:`flows.tune.search.run_search` (which re-exports SearchRequest) rather
than in it: the PBT trial (flows.tune.pbt) and the summary (flows.tune.summary) read them too,
and search.py imports both of those, so a home in search.py would be an import cycle.

A Tune trial receives one config dict: the hyperparameters Tune sampled and, under
:data:`CONTEXT_KEY`, the context as primitives. :meth:`TrialContext.to_wire` and
:meth:`TrialContext.from_wire` are the one conversion; :func:`split_trial_config` is the one
place a trial's config is taken apart, so the context never reaches the hyperparameters a
trial applies or the summary reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from flows.snapshots.manifest import Manifest
from flows.tune.space import (
    SearchError,
    _is_int,
    check_args,
    check_pbt_args,
)
from gan_core.config import GanConfig
from gan_core.overrides import apply_overrides, from_flat_dict

CONTEXT_KEY = "__ganflow"
"""The trial config's key for the context. Kept as it has always been: Tune stores the
trials' configs in the search's experiment state, and a resume must read those."""

# Field names whose wire keys differ: the wire keeps the keys searches have always saved.
_WIRE_KEYS = {"search_name": "search", "gpus_per_worker": "gpus", "cpus_per_worker": "cpus"}
_FIELDS_BY_WIRE_KEY = {v: k for k, v in _WIRE_KEYS.items()}


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its hyperparameters: the base config they override,
    the snapshot, the search's name (the prefix of its trials' run names), each trial's
    workers and their resources, where checkpoints and MLflow runs go, and the driver's view
    of where things live (``env``: no secrets), so a trial on any node reads the same
    snapshot store and writes the same storage as the driver."""

    base: GanConfig
    snapshot_id: str
    search_name: str
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    storage: str
    tracking: bool
    parent_run_id: str | None
    env: Mapping[str, str]
    experiment: str
    snapshot_root: str
    cache_dir: str
    threads: int = 1
    """Intra-op threads of a PBT trial's process (torch.set_num_threads)."""

    def to_wire(self) -> dict[str, object]:
        """The context as primitives, under the keys searches have always saved.

        Tune does not pickle the param space into a search's saved state: a resume passes it
        again and Tune refuses one whose (flattened) keys differ from the saved ones. So the
        base config travels as its flat dict (keys stable across versions that add no field)
        and ``threads`` only when it is not 1, the value a context without it has always
        meant: a search saved before this type existed resumes."""
        wire: dict[str, object] = {}
        for f in fields(self):
            wire[_WIRE_KEYS.get(f.name, f.name)] = getattr(self, f.name)
        wire["base"] = self.base.to_flat_dict()
        wire["env"] = dict(self.env)
        if self.threads == 1:
            del wire["threads"]
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, object]) -> TrialContext:
        """Inverse of :meth:`to_wire`; also reads the dicts older versions saved."""
        kwargs = {_FIELDS_BY_WIRE_KEY.get(k, k): v for k, v in wire.items()}
        kwargs["base"] = from_flat_dict(wire["base"])
        kwargs["env"] = dict(wire["env"])
        return cls(**kwargs)

    def param_space(self, tune_space: Mapping[str, object]) -> dict[str, object]:
        """Tune's param_space: the sampled fields, and the context under CONTEXT_KEY."""
        return {**tune_space, CONTEXT_KEY: self.to_wire()}

    def trial_config(self, params: Mapping[str, object]) -> GanConfig:
        """The config a trial trains: the base with its hyperparameters applied."""
        return apply_overrides(self.base, dict(params))

    def cluster(self):
        """The workers each trial's training runs on (a flows.train.spec.ClusterSpec)."""
        from flows.train.spec import ClusterSpec

        return ClusterSpec(
            workers=self.workers,
            gpus_per_worker=self.gpus_per_worker,
            cpus_per_worker=self.cpus_per_worker,
            threads=self.threads,
        )

    def run_name(self, trial_id: str) -> str:
        return f"{self.search_name}-{trial_id}"


def trial_params(config: Mapping[str, object]) -> dict[str, object]:
    """A trial config's hyperparameters: every key but the context."""
    return {k: v for k, v in config.items() if k != CONTEXT_KEY}


def split_trial_config(config: Mapping[str, object]) -> tuple[TrialContext, dict[str, object]]:
    """A trial's config (what Tune hands the trial function) as its context and its
    hyperparameters."""
    return TrialContext.from_wire(config[CONTEXT_KEY]), trial_params(config)


@dataclass(frozen=True)
class SearchRequest:
    family: str
    manifest: Manifest
    """The snapshot searched on, resolved by the caller (flows.orchestration.inputs)."""
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
    perturbation_interval: int | None = None
    """PBT/PB2: steps between exploit/explore decisions (default: the eval interval; a
    multiple of it, since decisions read the val metric)."""
    quantile: float = 0.25
    """PBT/PB2: the bottom fraction that exploits the top one (Ray's default)."""
    resample_probability: float = 0.25
    """PBT: chance that a mutated field is drawn afresh from the space (Ray's default)."""
    synch: bool = False
    """PBT/PB2: decide when every trial has reached the interval (Tune's synchronous mode;
    early trials wait, paused), instead of as each trial reports. Asynchronous PBT compares
    a trial with the others' latest figures, which in a small population run side by side
    are often a step behind, and then rarely exploits; synchronous decisions cost a pause
    and restart per trial and interval."""
    name: str | None = None
    resume: bool = False
    storage: str | None = None
    tracking: bool = True
    extra_trial_overrides: dict = field(default_factory=dict)

    def check(self) -> SearchRequest:
        """Numbers and the name, in one line each, before the snapshot or Ray is touched."""
        check_args(
            samples=self.samples,
            scheduler=self.scheduler,
            max_concurrent=self.max_concurrent,
            workers_per_trial=self.workers_per_trial,
            gpus_per_worker=self.gpus_per_worker,
            name=self.name,
            resume=self.resume,
        )
        if not isinstance(self.cpus_per_worker, (int, float)) or not self.cpus_per_worker > 0:
            raise SearchError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        for what, v in (
            ("eval_every", self.eval_every),
            ("grace_period", self.grace_period),
            ("perturbation_interval", self.perturbation_interval),
        ):
            if v is not None and (not _is_int(v) or v < 1):
                raise SearchError(f"{what} must be an integer >= 1, got {v!r}")
        check_pbt_args(quantile=self.quantile, resample_probability=self.resample_probability)
        return self

"""The retraining flow users run every week: ingest -> optional search -> train -> evaluate
-> register -> promote, for each configured family, as one Prefect flow.

With nothing configured it runs on the embedded defaults (local Ray, MLflow on SQLite
under GANFLOW_HOME, local snapshot storage, the built-in digits); the same code reaches a
Ray cluster, an MLflow server, a Prefect server and S3 through RAY_ADDRESS,
MLFLOW_TRACKING_URI, PREFECT_API_URL and GANFLOW_STORAGE_ROOT / GANFLOW_RAY_STORAGE.

Nothing changed, nothing trained: ingestion is content-addressed (an unchanged source costs
one listing, no decoding), and a family whose champion (or latest losing candidate) was
trained on the same snapshot with the same config by the same gan_core code is kept
without a Ray job (flows.orchestration.lineage). When the data changed, the champion is
measured on the new snapshot's val split first, and the candidate starts from its
checkpoint when the networks fit (``retrain.mode``). ``--force`` trains anyway.

With ``search: pbt`` (or ``pb2``) the search is the training: the best PBT trial's logged
generator is the candidate, registered and promoted like a trained one, with its trial, search
and schedule in the version's tags; nothing is trained after the search.

Reruns pick up earlier stages' results: a training run's name is fixed per (family,
snapshot, config, start, day) so a rerun resumes it from its last checkpoint, and a run that
already registered a version reuses it instead of registering a duplicate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from prefect import flow, task

from flows.orchestration.lineage import (
    CHECKPOINT_TAG,
    CODE_DIGEST_TAG,
    CONFIG_DIGEST_TAG,
    WARM_FROM_RUN_TAG,
    WARM_FROM_TAG,
    Plan,
    RetrainConfig,
    RetrainError,
)
from flows.registry.promote import ChampionMeasure, Decision
from flows.settings import read_yaml_mapping
from flows.snapshots.manifest import Manifest
from flows.train.spec import TrainResult
from flows.tune.space import PBT_SCHEDULERS
from flows.tune.summary import SearchResult
from gan_core.config import DEFAULT_DATASET, FAMILIES, ConfigError
from gan_core.overrides import apply_overrides
from gan_core.presets import preset


class PipelineError(ValueError):
    """The pipeline's configuration or a stage failed; one line for the command line."""


# ``search:``'s values. ``true`` is what it always meant (ASHA over the family's space, then
# the best config trained again from scratch); ``asha`` says the same by name.
SEARCH_CHOICES = ("false", "true", "asha", *PBT_SCHEDULERS)

# A PBT candidate's lineage, on its registered version (and its trial's run): which search and
# trial produced the generator, and where the trial's schedule (its hyperparameters per step)
# is, since the version's ``ganflow.config`` holds only the values the trial ended with.
PBT_SEARCH_TAG = "ganflow.pbt.search"
PBT_SEARCH_RUN_TAG = "ganflow.pbt.search_run"
PBT_TRIAL_TAG = "ganflow.pbt.trial"
PBT_SCHEDULE_TAG = "ganflow.pbt.schedule"
SCHEDULE_ARTIFACT = "pbt_schedule.json"


@dataclass(frozen=True)
class PipelineConfig:
    families: tuple[str, ...] = FAMILIES
    """Which families to retrain."""
    datasets: dict = field(default_factory=dict)
    """family -> snapshot id/name, builtin:NAME, or a source URL to ingest (default: built-in)."""
    overrides: dict = field(default_factory=dict)
    """family -> {config field: value} applied to that family's default preset."""
    search: bool | str = False
    """false | true | asha | pbt | pb2. true/asha: a Ray Tune ASHA search, then the best
    config is trained from scratch. pbt/pb2: Population Based Training over the family's
    space; the best trial's generator is the candidate, nothing is trained after it."""
    search_samples: int = 1
    search_steps: int | None = None
    """Iterations per search trial (default: a quarter of the training steps for ASHA, all
    of them for PBT, whose trials are the candidates)."""
    workers: int = 1
    gpus_per_worker: float = 0.0
    margin: float = 0.0
    """The candidate must beat the champion's primary metric by more than this."""
    model_names: dict = field(default_factory=dict)
    """family -> registered model name (default: ganflow-<family>-<dataset name>)."""
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    """mode (auto | warm | scratch) and finetune_steps: where a candidate starts when the
    data or config changed (flows.orchestration.lineage)."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "retrain", RetrainConfig.from_mapping(self.retrain))
        except RetrainError as exc:
            raise PipelineError(str(exc)) from None
        _check_types(self)
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise PipelineError(
                f"families: unknown {bad or 'empty list'}; choose from {', '.join(FAMILIES)}"
            )
        if self.workers < 1:
            raise PipelineError(f"workers: must be >= 1, got {self.workers}")
        if self.margin < 0:
            raise PipelineError(f"margin: must be >= 0, got {self.margin}")
        if self.search_scheduler in PBT_SCHEDULERS and self.retrain.mode == "warm":
            # A PBT population starts from random weights (trials share states only with each
            # other): "warm, or an error" can never be honoured, so say so before any work.
            raise PipelineError(
                f"retrain.mode: must be auto or scratch with search: {self.search} (its "
                "population trains from scratch), got 'warm'"
            )
        for fam in self.families:
            try:
                cfg = self.train_config(fam)
            except ConfigError as exc:
                raise PipelineError(f"overrides.{fam}: {exc}") from None
            if cfg.eval.inception:  # the FID weights, before any work (one line otherwise)
                from flows.train.data_config import check_inception

                check_inception(cfg)

    @property
    def search_scheduler(self) -> str | None:
        """None (no search), "asha" (``true`` or ``asha``), "pbt" or "pb2"."""
        if self.search is False:
            return None
        return "asha" if self.search is True else self.search

    def dataset(self, family: str) -> str:
        return self.datasets.get(family, DEFAULT_DATASET[family])

    def train_config(self, family: str):
        return apply_overrides(preset(family), dict(self.overrides.get(family, {})))

    @classmethod
    def load(cls, path: str | None) -> PipelineConfig:
        if not path:
            return cls()
        raw = read_yaml_mapping(path, "config file", PipelineError)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PipelineError(
                f"config file {path}: unknown keys {unknown}; known: {sorted(known)}"
            )
        if isinstance(raw.get("families"), str):  # `families: cgan` or `families: gan,cgan`
            raw["families"] = [f.strip() for f in raw["families"].split(",") if f.strip()]
        if isinstance(raw.get("families"), list):
            raw["families"] = tuple(raw["families"])
        return cls(**raw)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(pc: PipelineConfig) -> None:
    """One line naming the field for a value of the wrong type (YAML says `margin: "0.5"` or
    `search: maybe` easily; neither may be guessed at)."""
    checks = {
        "families": (
            isinstance(pc.families, tuple) and all(isinstance(f, str) for f in pc.families),
            "a list of family names",
        ),
        "datasets": (isinstance(pc.datasets, dict), "a mapping family -> dataset"),
        "overrides": (isinstance(pc.overrides, dict), "a mapping family -> {field: value}"),
        "model_names": (isinstance(pc.model_names, dict), "a mapping family -> model name"),
        "search": (
            isinstance(pc.search, bool)
            or (isinstance(pc.search, str) and pc.search in SEARCH_CHOICES[2:]),
            f"one of {', '.join(SEARCH_CHOICES)}",
        ),
        "search_samples": (
            isinstance(pc.search_samples, int) and not isinstance(pc.search_samples, bool),
            "an integer",
        ),
        "search_steps": (
            pc.search_steps is None
            or (isinstance(pc.search_steps, int) and not isinstance(pc.search_steps, bool)),
            "an integer or null",
        ),
        "workers": (
            isinstance(pc.workers, int) and not isinstance(pc.workers, bool),
            "an integer",
        ),
        "gpus_per_worker": (_is_number(pc.gpus_per_worker), "a number"),
        "margin": (_is_number(pc.margin), "a number"),
    }
    for name, (ok, what) in checks.items():
        if not ok:
            raise PipelineError(f"{name}: must be {what}, got {getattr(pc, name)!r}")
    for name in ("overrides",):
        for fam, value in pc.overrides.items():
            if not isinstance(value, dict):
                raise PipelineError(
                    f"{name}.{fam}: must be a mapping of config fields, got {value!r}"
                )


# --- stages: plain functions (tested directly), wrapped as Prefect tasks in the flow --------


def stage_ingest(dataset: str, image_size: int | None = None) -> Manifest:
    """The snapshot manifest for a dataset reference (the one resolver: ids, names,
    builtin: datasets and sources, which are ingested)."""
    from flows.ingest.resolve import ensure_snapshot

    return ensure_snapshot(dataset, image_size=image_size)


def stage_search(
    family: str,
    manifest: Manifest,
    cfg,
    samples: int,
    steps: int | None,
    scheduler: str = "asha",
    gpus: float = 0.0,
    workers: int = 1,
) -> SearchResult:
    from flows.tune.search import SearchRequest, run_search
    from flows.tune.space import default_space, validate_space

    if scheduler in PBT_SCHEDULERS:
        from flows.orchestration.lineage import finetune_config

        # The winner is the candidate itself: its trials train for the training's length (or
        # search_steps) with the config's own evaluation cadence, so its registered generator
        # is chosen on val as a training run's would be, on the workers a training run of
        # the pipeline gets (`workers`, `gpus_per_worker`).
        steps = steps or cfg.train.steps
        base = cfg if steps == cfg.train.steps else finetune_config(cfg, steps)
        extra = {"scheduler": scheduler, "gpus_per_worker": gpus, "workers_per_trial": workers}
    else:
        steps = steps or max(20, cfg.train.steps // 4)
        base = apply_overrides(cfg, {"train.steps": steps, "train.log_every": max(1, steps // 8)})
        extra = {}
    space = validate_space(default_space(family), base)
    req = SearchRequest(
        family=family, manifest=manifest, base=base, space=space, samples=samples, **extra
    )
    result = run_search(req, progress=False)
    if result.best is None:
        raise PipelineError(f"search {result.name}: {no_best_why(result.trials)}")
    return result


def no_best_why(trials) -> str:
    """Why a search has no best trial, in one line: every trial failed, or the ones that
    finished all failed the gate (the cGAN's class accuracy: an untrained or collapsed G)."""
    gated = [t for t in trials if t.error is None and t.gate]
    if gated:
        return (
            f"no trial passed the gate ({len(gated)} of {len(trials)} finished below it; "
            f"e.g. {gated[0].gate}); train longer (search_steps, train.steps)"
        )
    failed = [t for t in trials if t.error]
    if failed:
        return f"no trial completed ({len(failed)} failed; e.g. {failed[0].error})"
    return "no trial completed"


@dataclass(frozen=True)
class PbtCandidate:
    """The best PBT trial as the training stage's result (``run``), and the search's MLflow
    run (``search_run``, the trial run's parent)."""

    run: TrainResult
    search_run: str


@dataclass(frozen=True)
class FamilyOutcome:
    """One family's row of a retraining: kept (``promotion`` None), trained or PBT-searched
    and then promoted or rejected (``promotion``: the decision), or failed (``error_stage``:
    the stage, ``why``: its error). ``champion_on_snapshot``: the champion measured on the
    new snapshot's val split, when the data changed."""

    family: str
    snapshot_id: str
    name: str
    why: str
    decision: str  # "kept" | "champion" | "rejected" | "failed"
    start: str | None = None  # "warm" | "scratch" | "pbt"
    start_why: str = ""
    version: str | None = None
    run_id: str | None = None
    run_name: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    promotion: Decision | None = None
    warm_from: str | None = None
    champion_on_snapshot: ChampionMeasure | None = None
    search: SearchResult | None = None
    seconds: float | None = None
    """Wall time of the family's chain (None: decided without running it, or failed)."""
    error_stage: str | None = None

    def to_dict(self) -> dict:
        """As JSON values (``ganflow run --json``, the ganflow-retraining MLflow run), keys in
        the order they have always had; ``seconds`` and ``error_stage`` only when set."""
        out = {
            "family": self.family,
            "snapshot_id": self.snapshot_id,
            "name": self.name,
            "why": self.why,
            "decision": self.decision,
            "start": self.start,
            "start_why": self.start_why,
            "version": self.version,
            "run_id": self.run_id,
            "run_name": self.run_name,
            "metrics": dict(self.metrics),
            "promotion": _dict_or_none(self.promotion),
            "warm_from": self.warm_from,
            "champion_on_snapshot": _dict_or_none(self.champion_on_snapshot),
            "search": None if self.search is None else _search_row(self.search),
        }
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.error_stage is not None:
            out["error_stage"] = self.error_stage
        return out


def _dict_or_none(value) -> dict | None:
    return None if value is None else value.to_dict()


def _search_row(search: SearchResult) -> dict:
    best = None if search.best is None else search.best.to_dict()
    return {"name": search.name, "best": best}


@dataclass(frozen=True)
class Retraining:
    """What a retraining returns: a row per family, the Markdown summary (also the flow's
    artifact) and its run in the ganflow-retraining experiment."""

    results: tuple[FamilyOutcome, ...]
    summary: str
    retraining_run: str | None = None

    def to_dict(self) -> dict:
        return {
            "results": [r.to_dict() for r in self.results],
            "summary": self.summary,
            "retraining_run": self.retraining_run,
        }


def stage_pbt_candidate(search: SearchResult) -> PbtCandidate:
    """The best PBT trial as the training stage returns a run, for registration and
    promotion as they are: its run already logged its best step's generator
    (flows.tune.pbt), so nothing is trained here.

    metrics: the registered generator's test figures (measured once, at the trial's end, on
    that generator), the val figure that chose it and its step. The other val figures at that
    step are left out: after an exploit the best step may be the donor's, logged in the
    donor's run, and the trial's own history at that step is another model's."""
    from flows.tracking import RUN_NAME_TAG, client, tracking_uri

    best = search.best
    if not best.run_id:
        raise PipelineError(
            f"search {search.name}: the best trial {best.trial_id} has no MLflow run"
        )
    if not best.checkpoint:
        raise PipelineError(
            f"search {search.name}: the best trial {best.trial_id} left no checkpoint"
        )
    run = client(tracking_uri()).get_run(best.run_id)
    tags = run.data.tags
    metrics = {
        k.removeprefix("eval."): v
        for k, v in run.data.metrics.items()
        if k.startswith("eval.") and not k.startswith("eval.val_")
    }
    metrics[best.metric_name] = best.metric
    if tags.get("ganflow.best_step"):
        metrics["best_step"] = int(tags["ganflow.best_step"])
    # The iterations the trial reached (its schedule's and donors' steps included).
    trial = search.trial(best.trial_id)
    run = TrainResult(
        run_id=best.run_id,
        run_name=tags.get(RUN_NAME_TAG) or f"{search.name}-{best.trial_id}",
        family=tags.get("ganflow.family", ""),
        snapshot_id=tags["ganflow.snapshot_id"],
        steps=trial.step if trial else 0,
        metrics=metrics,
        checkpoint=best.checkpoint,
        storage=search.path,
    )
    return PbtCandidate(run, tags.get("mlflow.parentRunId", ""))


def pbt_lineage(search: SearchResult, candidate: PbtCandidate) -> dict[str, str]:
    """Where a PBT candidate came from: the search, its MLflow run, the trial and the trial's
    schedule artifact (a runs:/ URI MLflow resolves)."""
    return {
        PBT_SEARCH_TAG: search.name,
        PBT_SEARCH_RUN_TAG: candidate.search_run,
        PBT_TRIAL_TAG: str(search.best.trial_id),
        PBT_SCHEDULE_TAG: f"runs:/{candidate.run.run_id}/{SCHEDULE_ARTIFACT}",
    }


def pbt_candidate_line(search: SearchResult) -> str:
    return f"candidate: PBT trial {search.best.trial_id} of search {search.name}, no retraining"


def _run_name(family: str, snapshot_id: str, cfg, plan: Plan | None = None) -> str:
    """Fixed per (family, snapshot, config, start, day), so a rerun resumes the run; a
    forced one gets the time too (the same name would resume the finished run instead)."""
    digest = hashlib.sha256(json.dumps(cfg.to_flat_dict(), sort_keys=True).encode()).hexdigest()[:8]
    name = f"retrain-{family}-{snapshot_id[:12]}-{digest}-{time.strftime('%Y%m%d')}"
    if plan is not None and plan.start == "warm":
        name += f"-warm-v{plan.warm_from.version}"
    if plan is not None and plan.why == "--force":
        name += f"-forced-{time.strftime('%H%M%S')}"
    return name


def stage_plan(name: str, snapshot_id: str, cfg_digest: str, force: bool) -> dict:
    """Keep or train, from the registered champion's and challenger's lineage (MLflow only:
    no Ray, no data)."""
    from flows.orchestration.lineage import plan_family, read_lineage
    from flows.tracking import client, tracking_uri

    c = client(tracking_uri())
    champion = read_lineage(c, name, "champion")
    challenger = read_lineage(c, name, "challenger")
    return {
        "plan": plan_family(champion, challenger, snapshot_id, cfg_digest, force),
        "champion": champion,
    }


def stage_start(plan: Plan, champion, cfg, mode: str) -> Plan:
    """Warm or scratch for a candidate about to be trained with cfg (the final config,
    after a search): warm needs the champion's checkpoint and networks of cfg's shapes."""
    from flows.orchestration.lineage import choose_start, warm_fit

    def fits(champ) -> str | None:
        if not champ.checkpoint:
            return f"champion v{champ.version} has no recorded checkpoint"
        from flows.train.checkpoints import read_warm_start

        try:
            sd = read_warm_start(champ.checkpoint)
        except Exception as exc:  # gone from storage, unreadable: train from scratch, say why
            what = f"{type(exc).__name__}: {str(exc)[:200]}"
            return f"champion v{champ.version}'s checkpoint cannot be read ({what})"
        return warm_fit(cfg, sd)

    try:
        return choose_start(plan, champion, mode, fits)
    except RetrainError as exc:
        raise PipelineError(str(exc)) from None


def _selection_data(snapshot_id: str, cfg):
    """The snapshot's val split (selection never reads test), its judge and the FID network
    when the config asks for it: the conditions of every comparison between models."""
    from flows.settings import cache_dir, snapshot_root
    from flows.train.data_config import judge_data, load_heldout, load_inception, load_judge

    root = snapshot_root()
    splits = load_heldout(snapshot_id, root, cfg)
    judge = load_judge(snapshot_id, cache_dir(), judge_data(snapshot_id, root, splits["test"]))
    return splits["val"], judge, load_inception(cfg)


def stage_measure_champion(name: str, snapshot_id: str, cfg) -> ChampionMeasure | None:
    """The champion on the new snapshot's val split, as promotion will judge it (None: no
    champion). A champion that cannot be measured on it (e.g. a cGAN trained on fewer
    classes) does not stop the retraining: the reason is returned instead of figures."""
    from flows.registry.promote import measure_champion

    val, judge, inception = _selection_data(snapshot_id, cfg)
    try:
        return measure_champion(name, val, judge, inception=inception)
    except Exception as exc:  # reported in the summary; the candidate still trains
        return ChampionMeasure(error=f"{type(exc).__name__}: {str(exc)[:300]}")


def stage_train(
    family: str, manifest: Manifest, cfg, workers: int, gpus: float, plan: Plan | None = None
) -> TrainResult:
    from flows.train.driver import run_training
    from flows.train.spec import ClusterSpec, TrainRequest

    warm = plan is not None and plan.start == "warm"
    req = TrainRequest(
        cfg=cfg,
        manifest=manifest,
        cluster=ClusterSpec(workers=workers, gpus_per_worker=gpus),
        run_name=_run_name(family, manifest.id, cfg, plan),
        warm_start=plan.warm_from.checkpoint if warm else None,
    )
    return run_training(req)


def stage_register(
    result: TrainResult, name: str, manifest: Manifest | None = None, lineage: dict | None = None
) -> str:
    """Register the run's generator; a rerun of the same training run (same run name, e.g.
    after a failed promotion) reuses the version it registered instead of duplicating it."""
    from flows import registry
    from flows.tracking import client, tracking_uri
    from gan_core import __version__

    c = client(tracking_uri())
    for mv in c.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("ganflow.run_name") == result.run_name:
            return str(mv.version)
    from flows.train.checkpoints import load_trained

    cfg, models = load_trained(result.checkpoint)
    tags = {"ganflow.run_name": result.run_name, **(lineage or {})}
    if result.checkpoint:
        tags[CHECKPOINT_TAG] = str(result.checkpoint)
    classes = list(manifest.classes or ()) if manifest is not None else []
    if cfg.family == "cgan" and classes:
        tags["ganflow.classes"] = json.dumps(classes)[:5000]
    return registry.register(
        result.run_id,
        cfg,
        models,
        name,
        result.metrics,
        result.snapshot_id,
        f"ganflow {__version__}",
        tags=tags,
    )


def stage_promote(name: str, version: str, snapshot_id: str, cfg, margin: float) -> Decision:
    """Candidate against champion on the snapshot's validation split (selection never reads
    test), judged by the snapshot's judge, with FID/KID when the config asks for them."""
    from flows import registry

    val, judge, inception = _selection_data(snapshot_id, cfg)
    return registry.promote(name, version, val, judge, margin=margin, inception=inception)


# --- the flow ---------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[ganflow run] {msg}", file=sys.stderr, flush=True)


def _image_size(pc: PipelineConfig, family: str) -> int | None:
    overrides = pc.overrides.get(family, {})
    size = next((v for k, v in overrides.items() if k in ("image_size", "data.image_size")), None)
    return int(size) if size else None


def _family_setup(pc: PipelineConfig, family: str, manifest: Manifest):
    """(config for the snapshot, registered model name, digest of the requested config and
    the pipeline settings that change training: what a champion's lineage is compared with,
    before a search or a warm start changes the config)."""
    from flows.orchestration.lineage import config_digest
    from flows.registry.package import model_name
    from flows.train.data_config import config_for_snapshot

    try:
        cfg = config_for_snapshot(family, manifest, dict(pc.overrides.get(family, {})))
    except ConfigError as exc:
        raise PipelineError(f"overrides.{family}: {exc}") from None
    name = pc.model_names.get(family) or model_name(family, manifest.name or pc.dataset(family))
    # The search mode is part of what is compared with a champion's lineage: a PBT champion
    # was produced by another process than an ASHA-then-train one, so switching between them
    # is a config change (trained again), and a PBT champion is kept only by a request for
    # the same PBT search on the same snapshot and code (another run would just draw another
    # population). ``asha`` is ``true`` by name and digests as ``true``: champions registered
    # before ``search`` took names keep matching. The digest is the request's (before any
    # search), never the winning trial's mutated values, for PBT as for ASHA.
    search = True if pc.search == "asha" else pc.search
    digest = config_digest(
        cfg,
        workers=pc.workers,
        gpus_per_worker=pc.gpus_per_worker,
        search=[search, pc.search_samples, pc.search_steps],
    )
    return cfg, name, digest


def _row(family: str, snapshot: str, name: str, plan: Plan) -> FamilyOutcome:
    """A family's summary row; as it stands for a kept family."""
    version = plan.kept.version if plan.kept else None
    return FamilyOutcome(family, snapshot, name, plan.why, "kept", version=version)


def known_snapshot(ref: str, image_size: int | None = None) -> Manifest | None:
    """The manifest ref stands for without ingesting anything new: a snapshot id or name, a
    built-in (ingested now if missing: seconds), or a source whose listing (paths, sizes,
    ETags; nothing decoded) was ingested before. None: the source changed."""
    from flows.ingest.resolve import ensure_snapshot
    from flows.settings import snapshot_root
    from flows.snapshots.load import resolve_snapshot
    from flows.snapshots.store import SnapshotNotFound, Store

    if ref.startswith("builtin:"):
        return ensure_snapshot(ref, image_size=image_size)
    root = snapshot_root()
    try:
        return resolve_snapshot(ref, root)
    except SnapshotNotFound:
        if "/" not in ref and "://" not in ref:
            raise
    from flows.ingest.stages import IngestOptions, scan_source

    options = IngestOptions(image_size=image_size) if image_size else IngestOptions()
    hit = Store(root).source_ref(scan_source(ref, options).fingerprint)
    return None if hit is None else resolve_snapshot(hit.id, root)


def all_kept(pc: PipelineConfig, force: bool = False) -> list[FamilyOutcome] | None:
    """Every family's row when none has anything to train (unchanged sources, champions
    already trained on them with this config and code), found without Prefect, Ray or any
    decoding: a listing per source and a few registry reads. None as soon as one family
    has work (the flow then runs as usual)."""
    if force:
        return None
    rows = []
    for family in pc.families:
        manifest = known_snapshot(pc.dataset(family), _image_size(pc, family))
        if manifest is None:
            return None
        _, name, digest = _family_setup(pc, family, manifest)
        plan = stage_plan(name, manifest.id, digest, False)["plan"]
        if plan.action != "keep":
            return None
        _say(f"{family}: {name} kept ({plan.why})")
        rows.append(_row(family, manifest.id, name, plan))
    return rows


def retrain_family(
    pc: PipelineConfig, family: str, task, force: bool = False, cluster_slot=None
) -> FamilyOutcome:
    """One family through every stage. ``task(name, fn, *args)`` runs a stage (as a Prefect
    task inside the flow, directly in tests); ``cluster_slot()``, a context manager, is held
    around the stages that run on the Ray cluster (search, train) when families run side by
    side."""
    from flows.orchestration.lineage import code_digest, finetune_config

    cluster_slot = cluster_slot or contextlib.nullcontext

    t0 = time.perf_counter()
    manifest = task("ingest", stage_ingest, pc.dataset(family), _image_size(pc, family))
    cfg, name, digest = _family_setup(pc, family, manifest)
    snapshot = manifest.id
    _say(f"{family}: snapshot {snapshot[:12]} ({manifest.name}, {manifest.num_images} images)")
    planned = task("plan", stage_plan, name, snapshot, digest, force)
    plan, champion = planned["plan"], planned["champion"]
    row = _row(family, snapshot, name, plan)
    if plan.action == "keep":
        _say(f"{family}: {name} kept ({plan.why})")
        return replace(row, seconds=round(time.perf_counter() - t0, 1))
    measured = None
    if champion is not None and champion.snapshot_id != snapshot:
        # The model in use on the data users have now, before any training: a drift shows
        # here (and in the ganflow-retraining experiment) whatever the candidate does.
        measured = task("measure-champion", stage_measure_champion, name, snapshot, cfg)
        if measured is not None and measured.error is not None:
            _say(f"{family}: the champion could not be measured on it ({measured.error})")
        elif measured is not None:
            was = measured.at_promotion
            _say(
                f"{family}: champion v{measured.version} on snapshot {snapshot[:12]}: "
                f"{measured.metric} {measured.value:.4g}"
                + ("" if was is None else f" (at its promotion: {was:.4g})")
            )
    if pc.search_scheduler in PBT_SCHEDULERS:
        row = replace(row, champion_on_snapshot=measured)
        return _pbt_family(pc, family, task, cluster_slot, manifest, cfg, name, digest, row, t0)
    search = None
    if pc.search:
        with cluster_slot():
            search = task(
                "search", stage_search, family, manifest, cfg, pc.search_samples, pc.search_steps
            )
        best = search.best
        cfg = apply_overrides(cfg, best.overrides)
        _say(
            f"{family}: search {search.name} best {best.overrides} {best.metric_name}={best.metric:.4g}"
        )
    plan = task("start", stage_start, plan, champion, cfg, pc.retrain.mode)
    lineage = {CONFIG_DIGEST_TAG: digest, CODE_DIGEST_TAG: code_digest()}
    if plan.start == "warm":
        cfg = finetune_config(cfg, pc.retrain.steps_for(cfg))
        lineage[WARM_FROM_TAG] = plan.warm_from.version
        lineage[WARM_FROM_RUN_TAG] = plan.warm_from.run_id
    _say(
        f"{family}: training {cfg.train.steps} iterations on {pc.workers} worker(s), "
        f"{plan.start} ({plan.start_why}; {plan.why})"
    )
    with cluster_slot():
        trained = task(
            "train", stage_train, family, manifest, cfg, pc.workers, pc.gpus_per_worker, plan
        )
    task("lineage", stage_tag_run, trained.run_id, {**lineage, "ganflow.start": plan.start})
    version = task("register", stage_register, trained, name, manifest, lineage)
    decision = task("promote", stage_promote, name, version, snapshot, cfg, pc.margin)
    _say(f"{family}: {name} v{version} -> {decision.decision} ({decision.reason})")
    return replace(
        row,
        decision=decision.decision,
        why=plan.why,
        start=plan.start,
        start_why=plan.start_why,
        champion_on_snapshot=measured,
        run_id=trained.run_id,
        run_name=trained.run_name,
        metrics=trained.metrics,
        version=version,
        promotion=decision,
        warm_from=plan.warm_from.version if plan.warm_from else None,
        search=search,
        seconds=round(time.perf_counter() - t0, 1),
    )


def _pbt_family(
    pc, family, task, cluster_slot, manifest, cfg, name, digest, row, t0
) -> FamilyOutcome:
    """search: pbt|pb2. The search's best trial is the candidate: its run's generator is
    registered and promoted exactly as a trained candidate's (same stages, same val split,
    judge and gate), with no training stage after the search. It never starts warm: the
    population trains from random weights (PipelineConfig refuses retrain.mode warm)."""
    from flows.orchestration.lineage import code_digest

    snapshot = manifest.id
    with cluster_slot():
        search = task(
            "search",
            stage_search,
            family,
            manifest,
            cfg,
            pc.search_samples,
            pc.search_steps,
            pc.search_scheduler,
            pc.gpus_per_worker,
            pc.workers,
        )
    best = search.best
    line = pbt_candidate_line(search)
    _say(f"{family}: search {search.name} best {best.metric_name}={best.metric:.4g}; {line}")
    candidate = task("candidate", stage_pbt_candidate, search)
    lineage = {
        CONFIG_DIGEST_TAG: digest,
        CODE_DIGEST_TAG: code_digest(),
        **pbt_lineage(search, candidate),
    }
    task("lineage", stage_tag_run, candidate.run.run_id, {**lineage, "ganflow.start": "pbt"})
    version = task("register", stage_register, candidate.run, name, manifest, lineage)
    decision = task("promote", stage_promote, name, version, snapshot, cfg, pc.margin)
    _say(f"{family}: {name} v{version} -> {decision.decision} ({decision.reason})")
    return replace(
        row,
        decision=decision.decision,
        start="pbt",
        start_why=line,
        run_id=candidate.run.run_id,
        run_name=candidate.run.run_name,
        metrics=candidate.run.metrics,
        version=version,
        promotion=decision,
        warm_from=None,
        search=search,
        seconds=round(time.perf_counter() - t0, 1),
    )


def stage_tag_run(run_id: str, tags: dict) -> None:
    """The training run's lineage in MLflow: its start (warm/scratch), the champion version
    and run it started from, the requested config's and gan_core's digests."""
    from flows.tracking import client, tracking_uri

    c = client(tracking_uri())
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def summary_markdown(
    results: list[FamilyOutcome], tracking: str, retraining_run: str | None = None
) -> str:
    lines = [
        "# ganflow retraining",
        "",
        "| family | model | outcome | start | version | metric | candidate | champion before | champion on this snapshot |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r.promotion
        m = r.champion_on_snapshot
        on_new = "-"
        if m and m.error is not None:
            on_new = f"not measured ({m.error[:80]})"
        elif m:
            on_new = f"{m.value:.4g} (v{m.version}; at promotion {_fmt(m.at_promotion)})"
        if r.decision == "failed":
            lines.append(
                f"| {r.family} | {r.name} | **failed** ({r.error_stage}) | - | - | - | - | - | {on_new} |"
            )
            continue
        if p is None:
            lines.append(f"| {r.family} | {r.name} | **kept** | - | {r.version} | - | - | - | - |")
            continue
        champ = "-" if p.champion is None else f"{p.champion:.4g} (v{p.champion_version})"
        start = r.start + (f" from v{r.warm_from}" if r.warm_from else "")
        if r.start == "pbt":  # the candidate was not trained by this retraining: say whose
            start = r.start_why
        lines.append(
            f"| {r.family} | {r.name} | **{p.decision}** | {start} | {r.version} | {p.metric} | {p.candidate:.4g} | {champ} | {on_new} |"
        )
    runs = [r.run_id for r in results if r.run_id and r.start != "pbt"]
    # A PBT candidate's run is a search trial's (in ganflow-search), not a training run.
    trials = [r.run_id for r in results if r.run_id and r.start == "pbt"]
    ran = [
        *([f"training runs: {', '.join(runs)}"] if runs else []),
        *([f"PBT trial runs: {', '.join(trials)}"] if trials else []),
    ]
    lines += [
        "",
        f"MLflow: `{tracking}`"
        + (f" ({'; '.join(ran)})" if ran else " (nothing trained)")
        + (
            f"; this retraining: run {retraining_run} in ganflow-retraining."
            if retraining_run
            else "."
        ),
        "",
        "Reasons:",
    ]
    for r in results:
        if r.decision == "failed":
            lines.append(f"- {r.family}: failed at {r.why}")
        elif r.promotion is None:
            lines.append(f"- {r.family}: kept: {r.why}")
        elif r.start == "pbt":
            lines.append(f"- {r.family}: PBT search ({r.why}); {r.start_why}; {r.promotion.reason}")
        else:
            lines.append(
                f"- {r.family}: trained ({r.why}), {r.start} ({r.start_why}); {r.promotion.reason}"
            )
    return "\n".join(lines)


def _as_task(stage: str, fn, *args):
    return task(fn, name=stage, persist_result=False)(*args)


class FamiliesFailed(PipelineError):
    """Some families failed; the others finished. Carries the flow's result (rows for all)."""

    def __init__(self, result: Retraining):
        self.result = result
        failed = [r for r in result.results if r.decision == "failed"]
        done = len(result.results) - len(failed)
        super().__init__(
            "failed: "
            + "; ".join(f"{r.family} ({r.why})" for r in failed)
            + f" - {done} other famil{'y' if done == 1 else 'ies'} finished (rows in the summary)"
        )


def _failed_row(family: str, stage: str, exc: BaseException, known: dict) -> FamilyOutcome:
    from flows.storage import mask_secrets

    why = mask_secrets(f"{stage}: {type(exc).__name__}: {str(exc).strip()[:300]}")
    row = _row(family, known.get("snapshot") or "-", known.get("name") or "-", Plan("train", why))
    return replace(row, decision="failed", version=None, error_stage=stage)


def family_or_failure(
    pc: PipelineConfig, family: str, force: bool, run_stage, slot
) -> FamilyOutcome:
    """retrain_family, or a failed row naming the stage and the error: one family's failure
    never stops the others."""
    known: dict = {"stage": "ingest"}

    def tracked(stage, fn, *args):
        known["stage"] = stage
        out = run_stage(stage, fn, *args)
        if stage == "plan":
            known["name"] = args[0]
            known["snapshot"] = args[1]
        return out

    try:
        return retrain_family(pc, family, tracked, force, slot)
    except Exception as exc:
        _say(f"{family}: failed at {known['stage']} ({type(exc).__name__}: {str(exc)[:200]})")
        return _failed_row(family, known["stage"], exc, known)


class ClusterSlots:
    """How many families may use the Ray cluster at once: as many training jobs as its CPUs
    (and GPUs) hold side by side, by the sizes the driver's resource check uses
    (workers x CPUs and GPUs per worker; GANFLOW_RAY_MAX_CPUS/GPUS for a cluster that
    grows). Ray starts, and the count is taken, when the first family needs the cluster:
    a run where every family is kept never starts Ray."""

    def __init__(self, workers: int, gpus_per_worker: float, families: int):
        self.workers, self.gpus, self.families = workers, gpus_per_worker, families
        self._lock = threading.Lock()
        self._sem: threading.Semaphore | None = None
        self.size: int | None = None

    def count(self) -> int:
        import ray

        from flows.preflight import ensure_ray
        from flows.train.driver import max_cpus_setting, max_gpus_setting
        from flows.train.spec import ClusterSpec

        ensure_ray()
        total = ray.cluster_resources()
        spec = ClusterSpec(workers=self.workers, gpus_per_worker=self.gpus)
        cpus = max(total.get("CPU", 0.0), max_cpus_setting() or 0.0)
        fit = int(cpus // (spec.workers * spec.cpus_per_worker))
        if self.gpus > 0:
            gpus = max(total.get("GPU", 0.0), max_gpus_setting() or 0.0)
            fit = min(fit, int(gpus // (spec.workers * self.gpus)))
        # Fewer than one: the driver's check says why, in the family's row.
        return max(1, min(fit, self.families))

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._sem is None:
                self.size = self.count()
                self._sem = threading.Semaphore(self.size)
                _say(f"families side by side: {self.size} at a time on the Ray cluster")
        with self._sem:
            yield


def run_families(pc: PipelineConfig, force: bool, side_by_side: bool = True) -> list[FamilyOutcome]:
    """Every family's chain (ingest -> ... -> promote), side by side as concurrent Prefect
    tasks when there are several (their cluster stages bounded by :class:`ClusterSlots`),
    else one after another. Rows in the order of pc.families; a failed family is a row
    (a single family's error is raised as it is: there is no other family to finish)."""
    if len(pc.families) == 1:
        return [retrain_family(pc, pc.families[0], _as_task, force)]
    if not side_by_side:
        return [family_or_failure(pc, f, force, _as_task, None) for f in pc.families]
    slots = ClusterSlots(pc.workers, pc.gpus_per_worker, len(pc.families))
    # Two families on one source ingest it once: the second waits, then finds the snapshot.
    ingest_locks = {pc.dataset(f): threading.Lock() for f in pc.families}

    def run_stage(stage, fn, *args):
        if stage != "ingest":
            return _as_task(stage, fn, *args)
        with ingest_locks[args[0]]:
            return _as_task(stage, fn, *args)

    chain = task(family_or_failure, persist_result=False)
    futures = [
        chain.with_options(name=f"family-{f}").submit(pc, f, force, run_stage, slots)
        for f in pc.families
    ]
    return [fut.result() for fut in futures]


def for_source(pc: PipelineConfig, source: str) -> PipelineConfig | None:
    """The pipeline restricted to the families whose dataset is ``source`` (as the watcher
    names it); None when none is."""
    from flows.orchestration.sources import is_source, source_id

    sid = source_id(source)
    fams = tuple(
        f for f in pc.families if is_source(pc.dataset(f)) and source_id(pc.dataset(f)) == sid
    )
    return replace(pc, families=fams) if fams else None


@flow(name="ganflow-retraining", persist_result=False, log_prints=False)
def retraining_flow(
    config_path: str | None = None,
    force: bool = False,
    source: str | None = None,
    side_by_side: bool = True,
) -> Retraining:
    """ingest -> keep, or (measure the champion on new data) -> optional search -> train
    (warm or scratch) -> evaluate -> register -> promote, per family, families side by side.
    ``force``: train every family even when nothing changed. ``source`` (set by the
    ganflow.dataset.changed trigger): only the families whose dataset is that source.
    Fails, after the summary, when a family failed; the message names which."""
    from prefect.artifacts import create_markdown_artifact

    from flows.tracking import log_retraining, redact, tracking_uri

    pc = PipelineConfig.load(config_path)
    if source is not None:
        from flows.storage import mask_secrets

        only = for_source(pc, source)
        if only is None:
            msg = f"no family's dataset is {mask_secrets(source)}: nothing to retrain"
            _say(msg)
            return Retraining((), msg)
        _say(f"{mask_secrets(source)} changed: retraining {', '.join(only.families)}")
        pc = only
    results = run_families(pc, force, side_by_side)
    run_id = log_retraining(tracking_uri(), [r.to_dict() for r in results])
    md = summary_markdown(results, redact(tracking_uri()), run_id)
    create_markdown_artifact(
        md,
        key="ganflow-retraining-summary",
        description="what was kept or trained, and the promotion decisions",
    )
    out = Retraining(tuple(results), md, run_id)
    if any(r.decision == "failed" for r in results):
        raise FamiliesFailed(out)
    return out

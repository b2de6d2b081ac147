"""The retraining flow users run every week: ingest -> optional search -> train -> evaluate
-> register -> promote, for each configured family, as one Prefect flow.

With nothing configured it runs on the embedded defaults (local Ray, MLflow on SQLite
under GANFLOW_HOME, local snapshot storage, the built-in digits); the same code reaches a
Ray cluster, an MLflow server, a Prefect server and S3 through RAY_ADDRESS,
MLFLOW_TRACKING_URI, PREFECT_API_URL and GANFLOW_STORAGE_ROOT / GANFLOW_RAY_STORAGE.

Reruns pick up earlier stages' results: ingestion is content-addressed (same data, same
snapshot, no decoding), a training run's name is fixed per (family, snapshot, config, day)
so a rerun resumes it from its last checkpoint, and a run that already registered a
version reuses it instead of registering a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, task

from flows.settings import read_yaml_mapping
from gan_core.config import DEFAULT_DATASET, FAMILIES, ConfigError, apply_overrides, preset


class PipelineError(ValueError):
    """The pipeline's configuration or a stage failed; one line for the command line."""


@dataclass(frozen=True)
class PipelineConfig:
    families: tuple[str, ...] = FAMILIES
    """Which families to retrain."""
    datasets: dict = field(default_factory=dict)
    """family -> snapshot id/name, builtin:NAME, or a source URL to ingest (default: built-in)."""
    overrides: dict = field(default_factory=dict)
    """family -> {config field: value} applied to that family's default preset."""
    search: bool = False
    """Run a Ray Tune search before training and train with its best config."""
    search_samples: int = 1
    search_steps: int | None = None
    """Iterations per search trial (default: a quarter of the training steps)."""
    workers: int = 1
    gpus_per_worker: float = 0.0
    margin: float = 0.0
    """The candidate must beat the champion's primary metric by more than this."""
    model_names: dict = field(default_factory=dict)
    """family -> registered model name (default: ganflow-<family>-<dataset name>)."""

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise PipelineError(
                f"families: unknown {bad or 'empty list'}; choose from {', '.join(FAMILIES)}"
            )
        if self.workers < 1:
            raise PipelineError(f"workers: must be >= 1, got {self.workers}")
        if self.margin < 0:
            raise PipelineError(f"margin: must be >= 0, got {self.margin}")
        for fam in self.families:
            try:
                cfg = self.train_config(fam)
            except ConfigError as exc:
                raise PipelineError(f"overrides.{fam}: {exc}") from None
            if cfg.eval.inception:  # the FID weights, before any work (one line otherwise)
                from flows.data_config import check_inception

                check_inception(cfg)

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
        if "families" in raw:
            raw["families"] = tuple(raw["families"])
        return cls(**raw)


# --- stages: plain functions (tested directly), wrapped as Prefect tasks in the flow --------


def stage_ingest(dataset: str, image_size: int | None = None) -> dict:
    """The snapshot manifest for a dataset reference; sources (paths/URLs) are ingested at
    image_size (None: the built-ins' 16 px, a source's own resolution)."""
    from flows.settings import snapshot_root
    from flows.snapshots import SnapshotNotFound, resolve_snapshot

    root = snapshot_root()
    if dataset.startswith("builtin:"):
        from flows.ingest import IngestOptions, ingest_builtin

        return resolve_snapshot(
            ingest_builtin(dataset, IngestOptions(image_size=image_size or 16), root=root)["id"],
            root,
        )
    try:
        return resolve_snapshot(dataset, root)
    except SnapshotNotFound:
        if "/" not in dataset and "://" not in dataset:
            raise
    from flows.ingest import IngestOptions, ingest

    options = IngestOptions(image_size=image_size) if image_size else IngestOptions()
    return resolve_snapshot(ingest(dataset, options=options, root=root)["id"], root)


def stage_search(family: str, snapshot_id: str, cfg, samples: int, steps: int | None) -> dict:
    from flows.tune import SearchRequest, default_space, run_search, validate_space

    steps = steps or max(20, cfg.train.steps // 4)
    base = apply_overrides(cfg, {"train.steps": steps, "train.log_every": max(1, steps // 8)})
    req = SearchRequest(
        family=family,
        dataset=snapshot_id,
        base=base,
        space=validate_space(default_space(family), base),
        samples=samples,
    )
    result = run_search(req, progress=False)
    if result["best"] is None:
        raise PipelineError(f"search {result['name']}: no trial completed")
    return result


def _run_name(family: str, snapshot_id: str, cfg) -> str:
    digest = hashlib.sha256(json.dumps(cfg.to_flat_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"retrain-{family}-{snapshot_id[:12]}-{digest}-{time.strftime('%Y%m%d')}"


def stage_train(family: str, snapshot_id: str, cfg, workers: int, gpus: float) -> dict:
    from flows.train_ray import ClusterSpec, TrainRequest, run_training

    req = TrainRequest(
        cfg=cfg,
        dataset=snapshot_id,
        cluster=ClusterSpec(workers=workers, gpus_per_worker=gpus),
        run_name=_run_name(family, snapshot_id, cfg),
    )
    return run_training(req)


def load_trained(result: dict):
    """The trained models from a training result's final checkpoint (weights only)."""
    from ray.train import Checkpoint

    from flows.train_ray import STATE_FILE, StorageSpec
    from gan_core.config import GanConfig
    from gan_core.models import build_models
    from gan_core.train import read_checkpoint

    _, filesystem = StorageSpec().resolve()
    ckpt = Checkpoint(result["checkpoint"], filesystem=filesystem)
    with ckpt.as_directory() as d:
        sd = read_checkpoint(Path(d) / STATE_FILE)
    cfg = GanConfig.from_flat_dict(sd["config"])
    models = build_models(cfg)
    for k, net in models.items():
        net.load_state_dict(sd["models"][k])
        net.eval()
    return cfg, models


def stage_register(result: dict, name: str, manifest: dict | None = None) -> str:
    """Register the run's generator; a rerun of the same training run (same run name, e.g.
    after a failed promotion) reuses the version it registered instead of duplicating it."""
    from flows import registry
    from flows.tracking import client, tracking_uri
    from gan_core import __version__

    c = client(tracking_uri())
    for mv in c.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("ganflow.run_name") == result["run_name"]:
            return str(mv.version)
    cfg, models = load_trained(result)
    tags = {"ganflow.run_name": result["run_name"]}
    classes = (manifest or {}).get("classes") or []
    if cfg.family == "cgan" and classes:
        tags["ganflow.classes"] = json.dumps(classes)[:5000]
    return registry.register(
        result["run_id"],
        cfg,
        models,
        name,
        result["metrics"],
        result["snapshot_id"],
        f"ganflow {__version__}",
        tags=tags,
    )


def stage_promote(name: str, version: str, snapshot_id: str, cfg, margin: float) -> dict:
    """Candidate against champion on the snapshot's validation split (selection never reads
    test), judged by the snapshot's judge, with FID/KID when the config asks for them."""
    from flows import registry
    from flows.data_config import load_inception, load_judge
    from flows.settings import cache_dir, snapshot_root
    from flows.snapshots import load_dataset

    root = snapshot_root()
    test = load_dataset(snapshot_id, "test", root)
    heldout = load_dataset(snapshot_id, "val", root)
    sizes = [len(heldout.x), len(heldout.y)] if hasattr(heldout, "x") else [len(heldout)]
    if min(sizes) < 2:
        heldout = test  # too small a snapshot for a validation split
    judge = load_judge(
        snapshot_id, cache_dir(), lambda: (load_dataset(snapshot_id, "train", root), test)
    )
    decision = registry.promote(
        name, version, heldout, judge, margin=margin, inception=load_inception(cfg)
    )
    return decision.to_dict()


# --- the flow ---------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[ganflow run] {msg}", file=sys.stderr, flush=True)


def retrain_family(pc: PipelineConfig, family: str, task) -> dict:
    """One family through every stage. ``task(name, fn, *args)`` runs a stage (as a Prefect
    task inside the flow, directly in tests)."""
    from flows.data_config import config_for_snapshot
    from flows.registry import model_name

    overrides = dict(pc.overrides.get(family, {}))
    t0 = time.perf_counter()
    size = next((v for k, v in overrides.items() if k in ("image_size", "data.image_size")), None)
    manifest = task("ingest", stage_ingest, pc.dataset(family), int(size) if size else None)
    try:
        cfg = config_for_snapshot(family, manifest, overrides)
    except ConfigError as exc:
        raise PipelineError(f"overrides.{family}: {exc}") from None
    _say(
        f"{family}: snapshot {manifest['id'][:12]} ({manifest.get('name')}, {manifest.get('num_images')} images)"
    )
    search = None
    if pc.search:
        search = task(
            "search", stage_search, family, manifest["id"], cfg, pc.search_samples, pc.search_steps
        )
        cfg = apply_overrides(cfg, search["best"]["overrides"])
        _say(
            f"{family}: search {search['name']} best {search['best']['overrides']} {search['best']['metric_name']}={search['best']['metric']:.4g}"
        )
    _say(f"{family}: training {cfg.train.steps} iterations on {pc.workers} worker(s)")
    trained = task(
        "train", stage_train, family, manifest["id"], cfg, pc.workers, pc.gpus_per_worker
    )
    name = pc.model_names.get(family) or model_name(
        family, manifest.get("name") or pc.dataset(family)
    )
    version = task("register", stage_register, trained, name, manifest)
    decision = task("promote", stage_promote, name, version, manifest["id"], cfg, pc.margin)
    _say(f"{family}: {name} v{version} -> {decision['decision']} ({decision['reason']})")
    return {
        "family": family,
        "snapshot_id": manifest["id"],
        "run_id": trained["run_id"],
        "run_name": trained["run_name"],
        "metrics": trained["metrics"],
        "name": name,
        "version": version,
        "promotion": decision,
        "search": None if search is None else {"name": search["name"], "best": search["best"]},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def summary_markdown(results: list[dict], tracking: str) -> str:
    lines = [
        "# ganflow retraining",
        "",
        "| family | model | version | metric | candidate | champion before | decision |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["promotion"]
        champ = "-" if p["champion"] is None else f"{p['champion']:.4g} (v{p['champion_version']})"
        lines.append(
            f"| {r['family']} | {r['name']} | {r['version']} | {p['metric']} | {p['candidate']:.4g} | {champ} | **{p['decision']}** |"
        )
    lines += [
        "",
        f"MLflow: `{tracking}` (runs: {', '.join(r['run_id'] for r in results)}).",
        "",
        "Reasons:",
    ]
    lines += [f"- {r['family']}: {r['promotion']['reason']}" for r in results]
    return "\n".join(lines)


def _as_task(stage: str, fn, *args):
    return task(fn, name=stage, persist_result=False)(*args)


@flow(name="ganflow-retraining", persist_result=False, log_prints=False)
def retraining_flow(config_path: str | None = None) -> dict:
    """ingest -> optional search -> train -> evaluate -> register -> promote, per family."""
    from prefect.artifacts import create_markdown_artifact

    from flows.tracking import redact, tracking_uri

    pc = PipelineConfig.load(config_path)
    results = [retrain_family(pc, fam, _as_task) for fam in pc.families]
    md = summary_markdown(results, redact(tracking_uri()))
    create_markdown_artifact(
        md,
        key="ganflow-retraining-summary",
        description="what was trained and the promotion decisions",
    )
    return {"results": results, "summary": md}

"""MLflow helpers for training runs: where the tracking server is, a fail-fast reachability
check, experiments with an explicit artifact location, and what a run logs (flat config as
params, metrics per interval, sample grids as images, the dataset snapshot as its input, the
final generator with a signature and an input example).

The driver checks reachability and creates (or, on a rerun of the same run name, finds) the
MLflow run before any cluster work; rank 0 of the Ray job logs into that run by id. MLflow is
imported inside the functions: importing it costs about a second and starts nothing.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flows.settings import mlflow_artifact_root, mlflow_tracking_uri, redact
from gan_core.config import GanConfig
from gan_core.viz import grid_array

RUN_NAME_TAG = "ganflow.run_name"
"""Tag holding the Ray run name, so a rerun of the same name resumes the same MLflow run."""


class TrackingError(ValueError):
    """The tracking server cannot be used (unreachable, bad URI); one line, no secrets."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file under GANFLOW_HOME."""
    return mlflow_tracking_uri()


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when the tracking server cannot be reached.

    MLflow's own client retries a dead server with backoff for minutes; this is called on the
    driver before any training so an hour of training is never lost to a typo in the URI."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 (http(s) only)
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # it answered: reachable (auth or routing is MLflow's business)
                return
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} answered HTTP {exc.code}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} is unreachable ({reason}); "
                "start it or set MLFLOW_TRACKING_URI"
            ) from None
    if scheme == "sqlite":
        path = Path(urllib.parse.urlsplit(uri).path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow database folder: {exc}") from None
        return
    if scheme in ("", "file"):
        return
    # databricks, other plugins: let MLflow report its own errors.


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """One client per URI and process: building one opens a database engine (about 0.1 s)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, created with an explicit artifact location (never ./mlruns)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = f"{mlflow_artifact_root().rstrip('/')}/{name}"
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # a concurrent creator won the race
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_or_create_run(uri: str, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """The unfinished MLflow run tagged with this Ray run name (a resumed job), else a new one."""
    c = client(uri)
    found = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found and found[0].info.status != "FINISHED":
        return found[0].info.run_id
    run = c.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    return run.info.run_id


def log_config(uri: str, run_id: str, cfg: GanConfig, extra: dict[str, object]) -> None:
    """The flat config as params (idempotent: a resumed run logs the same values again)."""
    from mlflow.entities import Param

    c = client(uri)
    have = c.get_run(run_id).data.params
    params = {**{k: str(v) for k, v in cfg.to_flat_dict().items()}, **extra}
    new = [Param(k, str(v)) for k, v in params.items() if k not in have]
    for i in range(0, len(new), 100):  # MLflow's per-batch limit
        c.log_batch(run_id, params=new[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    c = client(uri)
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_grid(
    uri: str, run_id: str, images: torch.Tensor, nrow: int, step: int, key: str = "samples"
) -> None:
    """Sample grid as an MLflow image series (``key``), so the UI shows it step by step."""
    pixels = grid_array(images, nrow=nrow)
    # Small images upscaled (nearest) to about 64 px a tile so they are readable in the UI
    # (16-px digits 4x); 64 px and larger are logged as they are.
    k = max(1, 64 // images.shape[-1])
    pixels = np.kron(pixels, np.ones((k, k) + (1,) * (pixels.ndim - 2), dtype=np.uint8))
    client(uri).log_image(run_id, pixels, key=key, step=step)


def log_dataset_input(
    uri: str, run_id: str, manifest: dict, storage_url: str, attempts: int = 3
) -> None:
    """The snapshot as the run's dataset input (name, id as digest, where it lives).

    Safe when several runs of one experiment log the same snapshot at once (Tune trials that
    start together): MLflow's store reads "is the dataset there?" and inserts it if not, in
    two statements, so two runs can both read "absent" and the second insert breaks the
    datasets table's (experiment, name, digest) key. The winner's row is there by then: a
    retry finds it and only links this run (the whole failed insert was rolled back)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    source = CodeDatasetSource(
        {"ganflow.snapshot_id": manifest["id"], "ganflow.storage": storage_url}
    )
    ds = MetaDataset(
        source, name=str(manifest.get("name") or manifest["id"]), digest=manifest["id"]
    )
    inp = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
    c = client(uri)
    for attempt in range(attempts):
        try:
            c.log_inputs(run_id, datasets=[inp])
            return
        except MlflowException as exc:
            text = str(exc).lower()  # SQLite "UNIQUE constraint", Postgres/MySQL "duplicate"
            if attempt == attempts - 1 or ("unique" not in text and "duplicate" not in text):
                raise
            linked = c.get_run(run_id).inputs.dataset_inputs
            if any(d.dataset.digest == manifest["id"] for d in linked):
                return
            time.sleep(0.05 * (attempt + 1))


# --- the generator package and the logged model ---------------------------------------------
#
# One model per run: the chosen generator(s) (a training run's best step on val, EMA weights
# when kept) as an MLflow logged model with a python_function flavor (models-from-code: the
# class is shipped as code, never pickled) whose payload is the weights-only package below.
# The registry registers that logged model; `ganflow generate`, `ganflow serve` and
# `mlflow models serve` all load the same artifacts.

MODEL_FILE = "generator.safetensors"
META_FILE = "ganflow_model.json"
PACKAGE_ARTIFACT = "package"  # key (and folder) of the package inside the logged model
MODEL_NAME = "generator"  # the logged model's name in its run
FORMAT_VERSION = 1
# Marks a logged model as ganflow's (MLmodel metadata); loaders refuse models without it.
MODEL_FORMAT = "ganflow-generator-v1"
# The models-from-code file MLflow ships with the model and runs when it loads it. It lives
# with the registry code that serves it; this module only passes its path to MLflow (it is
# never imported here, so the layering holds).
MODEL_CODE = Path(__file__).parent / "registry" / "pyfunc_model.py"
# Samples one request (or one `ganflow generate`) may ask for: 1,024 images of 64 x 64 RGB
# are 50 MB as float32; far more ran a machine out of memory (issue 16).
MAX_SAMPLES = 1024
# What the served model needs besides ganflow itself (served with --env-manager local in the
# ganflow environment, the project image on a cluster).
PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy", "pillow"]


def generator_keys(family: str) -> tuple[str, ...]:
    """The networks a package ships: the family's generators, as gan_core's registry names
    them (CycleGAN: both directions, G: X -> Y and F: Y -> X)."""
    from gan_core.train import FAMILIES

    return FAMILIES[family].generators


def write_package(
    cfg: GanConfig, models: dict[str, nn.Module], out_dir: str | Path, extra: dict | None = None
) -> Path:
    """The generator(s) as safetensors plus a JSON description (family, flat config, image
    size, labels, snapshot, metrics) in out_dir: tensors and JSON only, nothing pickled."""
    from safetensors.torch import save_file

    from gan_core.train import plain

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key in generator_keys(cfg.family):
        for pname, t in plain(models[key]).state_dict().items():
            tensors[f"{key}.{pname}"] = t.detach().cpu().contiguous()
    save_file(tensors, str(out / MODEL_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "family": cfg.family,
        "config": cfg.to_flat_dict(),
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "labels": list(range(cfg.model.num_classes)) if cfg.family == "cgan" else [],
        "generators": list(generator_keys(cfg.family)),
        **(extra or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def serving_signature(cfg: GanConfig):
    """(signature, input example) of the served model, per family (README, "Serving").

    gan: {n, seed} -> n images; cgan: {labels, seed} -> one image per label; cyclegan:
    {images (base64 PNG strings or [C, S, S] arrays in [-1, 1]), direction G|F} -> images.
    Param ``format``: ``array`` (default, values in [-1, 1]) or ``png`` (base64 PNG)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema

    seed = ColSpec("long", "seed", required=False)
    if cfg.family == "gan":
        inputs = Schema([ColSpec("long", "n"), seed])
        example = {"n": 4, "seed": 0}
    elif cfg.family == "cgan":
        inputs = Schema([ColSpec(Array("long"), "labels"), seed])
        example = {"labels": [i % cfg.model.num_classes for i in range(4)], "seed": 0}
    else:
        inputs = Schema(
            [ColSpec(AnyType(), "images"), ColSpec("string", "direction", required=False)]
        )
        s, ch = cfg.data.image_size, cfg.data.channels
        example = {"images": [np.zeros((ch, s, s), dtype=np.float32).tolist()], "direction": "G"}
    params = ParamSchema([ParamSpec("format", "string", "array")])
    return ModelSignature(inputs=inputs, params=params), example


def _run_snapshot(c, run_id: str) -> tuple[str, object | None]:
    """The run's snapshot id (tag) and its dataset input, if logged (for metric lineage)."""
    run = c.get_run(run_id)
    snapshot = run.data.tags.get("ganflow.snapshot_id", "")
    for inp in run.inputs.dataset_inputs if run.inputs else []:
        if snapshot and inp.dataset.digest == snapshot:
            return snapshot, inp.dataset
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return snapshot or (inputs[0].dataset.digest if inputs else ""), (
        inputs[0].dataset if inputs else None
    )


def log_generator(
    uri: str,
    run_id: str,
    cfg: GanConfig,
    models: dict[str, nn.Module],
    extra: dict | None = None,
    tags: dict[str, str] | None = None,
) -> list[str]:
    """Log the run's chosen generator(s) once, as the run's logged model ``generator``: a
    python_function model from code whose payload is the weights-only package, with the
    serving signature and an input example, the flat config as its params, the run's final
    figures as its metrics (linked to the snapshot's dataset) and the snapshot as a tag.
    ``models``: the networks to serve (a training run passes its best step's EMA
    generator); ``tags``: more logged-model tags (a training run: ``ganflow.best_step`` and
    the val figure that chose it). Returns [models:/<model_id>]."""
    import tempfile

    import mlflow
    from mlflow.entities import Metric

    c = client(uri)
    snapshot, dataset = _run_snapshot(c, run_id)
    run_metrics = c.get_run(run_id).data.metrics
    figures = {
        k.removeprefix("eval."): v
        for k, v in run_metrics.items()
        if k.startswith("eval.") and not k.startswith("eval.val_")
    }
    meta = {"snapshot_id": snapshot, "run_id": run_id, "metrics": figures, **(extra or {})}
    signature, example = serving_signature(cfg)
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = write_package(cfg, models, Path(tmp) / PACKAGE_ARTIFACT, meta)
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # MLflow suggests type hints on predict; the signature here is explicit instead.
            warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(MODEL_CODE),
                artifacts={PACKAGE_ARTIFACT: str(pkg)},
                signature=signature,
                input_example=example,
                pip_requirements=PIP_REQUIREMENTS,
                metadata={"ganflow.format": MODEL_FORMAT, "ganflow.family": cfg.family},
                params={k: str(v) for k, v in cfg.to_flat_dict().items()},
                tags={
                    **(tags or {}),
                    "ganflow.family": cfg.family,
                    "ganflow.snapshot_id": snapshot,
                    "ganflow.format": MODEL_FORMAT,
                },
                model_type=f"ganflow-{cfg.family}",
            )
    if figures:
        now = int(time.time() * 1000)
        link = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset else {}
        c.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), now, 0, model_id=info.model_id, **link)
                for k, v in figures.items()
            ],
        )
    return [info.model_uri]


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


# --- the retraining's own run ------------------------------------------------------------------

RETRAINING_EXPERIMENT = "ganflow-retraining"


def log_retraining(uri: str, rows: list[dict]) -> str:
    """One MLflow run per retraining (experiment ``ganflow-retraining``): per family what was
    decided (tags ``<family>.decision``, ``<family>.snapshot_id``, ``<family>.start``) and,
    where the data changed, the champion's figures on the new snapshot's val split as
    ``<family>.champion.val_<metric>`` (with the candidate's as ``<family>.candidate.*``).
    The step is the retraining's sequence number in the experiment, so the experiment's
    chart view over step (or over time) shows the champion's figure snapshot after
    snapshot: a drop is a drift of the data away from the model in use. Returns the run id."""
    from mlflow.entities import Metric

    c = client(uri)
    exp = ensure_experiment(uri, RETRAINING_EXPERIMENT)
    # Sequence number: runs before this one (a few hundred a year on a weekly schedule).
    step = len(c.search_runs([exp], max_results=50_000))
    run = c.create_run(exp, run_name=f"retraining-{time.strftime('%Y%m%d-%H%M%S')}")
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    for r in rows:
        fam = r["family"]
        tags = {
            f"{fam}.decision": r["decision"],
            f"{fam}.model": r["name"],
            f"{fam}.snapshot_id": r["snapshot_id"],
            f"{fam}.start": r.get("start") or "-",
            f"{fam}.why": (r.get("why") or "")[:500],
        }
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
        measured = r.get("champion_on_snapshot")
        if measured and "error" in measured:
            c.set_tag(run_id, f"{fam}.champion_error", measured["error"][:500])
        elif measured:
            c.set_tag(run_id, f"{fam}.champion_version", measured["version"])
            for k, v in measured["figures"].items():
                metrics.append(Metric(f"{fam}.champion.val_{k}", float(v), now, step))
        promotion = r.get("promotion") or {}
        if promotion.get("candidate") is not None:
            name = f"{fam}.candidate.val_{promotion['metric']}"
            metrics.append(Metric(name, float(promotion["candidate"]), now, step))
    for i in range(0, len(metrics), 500):
        c.log_batch(run_id, metrics=metrics[i : i + 500])
    c.set_terminated(run_id, "FINISHED")
    return run_id

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
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flows.settings import mlflow_artifact_root, mlflow_tracking_uri, redact
from gan_core.config import GanConfig
from gan_core.viz import grid_array

RUN_NAME_TAG = "ganflow.run_name"
"""Tag holding the Ray run name, so a rerun of the same name resumes the same MLflow run."""

# The model's pip requirements, stated so log_model does not spend seconds inferring them.
PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}"]


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


def log_grid(uri: str, run_id: str, images: torch.Tensor, nrow: int, step: int) -> None:
    """Sample grid as an MLflow image series ('samples'), so the UI shows it step by step."""
    pixels = grid_array(images, nrow=nrow)
    # Small images upscaled (nearest) to about 64 px a tile so they are readable in the UI
    # (16-px digits 4x); 64 px and larger are logged as they are.
    k = max(1, 64 // images.shape[-1])
    pixels = np.kron(pixels, np.ones((k, k) + (1,) * (pixels.ndim - 2), dtype=np.uint8))
    client(uri).log_image(run_id, pixels, key="samples", step=step)


def log_dataset_input(uri: str, run_id: str, manifest: dict, storage_url: str) -> None:
    """The snapshot as the run's dataset input (name, id as digest, where it lives)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = CodeDatasetSource(
        {"ganflow.snapshot_id": manifest["id"], "ganflow.storage": storage_url}
    )
    ds = MetaDataset(
        source, name=str(manifest.get("name") or manifest["id"]), digest=manifest["id"]
    )
    inp = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
    client(uri).log_inputs(run_id, datasets=[inp])


def log_generator(uri: str, run_id: str, cfg: GanConfig, models: dict[str, nn.Module]) -> list[str]:
    """The final generator(s) as MLflow PyTorch models with a signature and an input example.

    gan: z [4, z_dim] -> images; cgan: (z, y) -> images; cyclegan: G (X -> Y) and F (Y -> X),
    each images -> images. MLflow's default pt2 format exports forward with the example; its
    batch of 4 (> 1) keeps the batch dimension dynamic, so any batch size is served (a batch
    of 1 would fix it). Returns model URIs."""
    import mlflow
    from mlflow.models import infer_signature

    from gan_core.train import plain

    mlflow.set_tracking_uri(uri)
    gen = torch.Generator().manual_seed(0)
    s, ch = cfg.data.image_size, cfg.data.channels
    specs: list[tuple[str, nn.Module, object, object]] = []
    if cfg.family in ("gan", "cgan"):
        G = plain(models["G"]).cpu().eval()
        z = torch.randn(4, cfg.model.z_dim, generator=gen)
        if cfg.family == "gan":
            with torch.no_grad():
                out = G(z).numpy()
            specs.append(("generator", G, z.numpy(), (z.numpy(), out)))
        else:
            y = torch.arange(4) % cfg.model.num_classes
            with torch.no_grad():
                out = G(z, y).numpy()
            example = (z.numpy(), y.numpy())
            specs.append(("generator", G, example, ({"z": z.numpy(), "y": y.numpy()}, out)))
    else:
        for key, name in (("G", "generator"), ("F", "generator_F")):
            net = plain(models[key]).cpu().eval()
            x = torch.rand(4, ch, s, s, generator=gen) * 2 - 1
            with torch.no_grad():
                out = net(x).numpy()
            specs.append((name, net, x.numpy(), (x.numpy(), out)))
    uris = []
    with mlflow.start_run(run_id=run_id):
        for name, net, example, (sig_in, sig_out) in specs:
            info = mlflow.pytorch.log_model(
                net,
                name=name,
                signature=infer_signature(sig_in, sig_out),
                input_example=example,
                pip_requirements=PIP_REQUIREMENTS,
            )
            uris.append(info.model_uri)
    return uris


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)

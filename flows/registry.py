"""Model registry and promotion on MLflow: register a trained generator, gate its promotion
to `champion` on a fair comparison with the current champion, roll back, and load it again.

What is registered: a folder with the generator's weights as safetensors and a JSON file
with everything needed to use them (family, the flat config, image size, label set,
dataset snapshot, metrics). Loading reads those two files only, so nothing from the store
is ever unpickled. Aliases and tags are used throughout (MLflow stages are deprecated):

- alias ``champion``: the model in use; ``challenger``: the latest candidate that lost.
- registered-model tag ``ganflow.champion_history``: JSON list of past champions, newest
  last, so ``rollback`` can move ``champion`` back.
- version tags ``promotion.decision`` / ``promotion.reason`` and ``eval.<metric>`` /
  ``eval.champion.<metric>``: the decision with both figures.

Two promotions racing on one model are serialised by a lock that is itself a registered
model (``<name>.promotion-lock``): creating a registered model is atomic in every MLflow
backend (a unique key in its database), so exactly one promoter holds it. A lock older than
its TTL is considered abandoned (the holder crashed) and is broken.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gan_core.config import GanConfig, apply_overrides
from gan_core.evaluate import evaluate, primary_metric
from gan_core.models import build_models
from gan_core.train import plain

MODEL_FILE = "generator.safetensors"
META_FILE = "ganflow_model.json"
PACKAGE_DIR = "ganflow_generator"  # artifact path inside the MLflow run
HISTORY_TAG = "ganflow.champion_history"
FORMAT_VERSION = 1


class RegistryError(ValueError):
    """A registry operation cannot be done (unknown model, nothing to roll back to, ...)."""


def model_name(family: str, dataset: str) -> str:
    """ganflow-<family>-<dataset>, with the dataset reduced to [a-z0-9-]."""
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "data"
    return f"ganflow-{family}-{slug}"


def _generator_keys(family: str) -> tuple[str, ...]:
    # CycleGAN ships both directions: G (X -> Y) and F (Y -> X).
    return ("G", "F") if family == "cyclegan" else ("G",)


def package_generator(
    cfg: GanConfig, models: dict[str, nn.Module], out_dir: str | Path, extra: dict | None = None
) -> Path:
    """Write the generator(s) as safetensors plus a JSON description into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key in _generator_keys(cfg.family):
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
        "generators": list(_generator_keys(cfg.family)),
        **(extra or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def load_package(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GanConfig, dict[str, nn.Module], dict]:
    """Rebuild the generator(s) from a package folder: JSON + safetensors, no pickle."""
    path = Path(path)
    meta_path, weights_path = path / META_FILE, path / MODEL_FILE
    if not meta_path.exists() or not weights_path.exists():
        raise RegistryError(
            f"{path} is not a ganflow generator package (needs {META_FILE} and {MODEL_FILE})"
        )
    meta = json.loads(meta_path.read_text())
    cfg = GanConfig.from_flat_dict(meta["config"])
    tensors = load_file(str(weights_path), device=str(device))
    built = build_models(cfg)
    models: dict[str, nn.Module] = {}
    for key in meta["generators"]:
        net = built[key]
        prefix = f"{key}."
        net.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
        models[key] = net.to(device).eval()
    return cfg, models, meta


# --- MLflow side -------------------------------------------------------------------------


def _client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    from flows.settings import mlflow_tracking_uri

    uri = tracking_uri or mlflow_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register(
    run_id: str,
    cfg: GanConfig,
    models: dict[str, nn.Module],
    name: str,
    metrics: dict[str, float],
    snapshot_id: str,
    code_version: str = "",
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log the package into run_id's artifacts and register it as a new version of name.
    Returns the version number (as a string, MLflow's type)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    extra = {
        "snapshot_id": snapshot_id,
        "metrics": metrics,
        "code_version": code_version,
        "run_id": run_id,
    }
    with tempfile.TemporaryDirectory() as tmp:
        pkg = package_generator(cfg, models, Path(tmp) / PACKAGE_DIR, extra)
        client.log_artifacts(run_id, str(pkg), PACKAGE_DIR)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{PACKAGE_DIR}"
    with contextlib.suppress(MlflowException):  # already exists: fine
        client.create_registered_model(
            name, tags={"ganflow.family": cfg.family}, description=f"ganflow {cfg.family} generator"
        )
    primary, _ = primary_metric(cfg, has_truth="truth_error_ratio" in metrics)
    tags = {
        "ganflow.family": cfg.family,
        "ganflow.snapshot_id": snapshot_id,
        "ganflow.code_version": code_version,
        "ganflow.config": json.dumps(cfg.to_flat_dict(), sort_keys=True)[:5000],
        "ganflow.primary_metric": primary,
        **{f"train_metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
        **(tags or {}),
    }
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return str(mv.version)


def _resolve(client, name: str, ref: str | None) -> str:
    """'3' -> '3'; 'champion' (alias) -> its version; None -> champion."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named {name!r}") from None
    ref = ref or "champion"
    if ref.isdigit():
        return ref
    try:
        return str(client.get_model_version_by_alias(name, ref).version)
    except MlflowException:
        raise RegistryError(f"model {name!r} has no alias {ref!r}") from None


def parse_model_ref(text: str) -> tuple[str, str | None]:
    """NAME, NAME@alias or NAME/version -> (name, alias-or-version or None)."""
    if "@" in text:
        name, _, alias = text.partition("@")
        return name, alias
    m = re.fullmatch(r"(.+)/(\d+)", text)
    if m:
        return m.group(1), m.group(2)
    return text, None


def load_registered(
    ref: str, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> tuple[GanConfig, dict[str, nn.Module], dict]:
    """Load NAME[@alias|/version] (default @champion) from the registry, weights only."""
    import mlflow

    client = _client(tracking_uri)
    name, sel = parse_model_ref(ref)
    version = _resolve(client, name, sel)
    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=tmp, tracking_uri=client.tracking_uri
        )
        cfg, models, meta = load_package(local, device)
    meta["name"], meta["version"] = name, version
    return cfg, models, meta


@contextlib.contextmanager
def promotion_lock(
    client, name: str, ttl_s: float = 600.0, wait_s: float = 120.0
) -> Iterator[None]:
    """Mutual exclusion across processes and machines through the registry itself."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}.promotion-lock"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"owner": token, "created": f"{time.time():.3f}"},
                description="ganflow promotion lock (safe to delete if stale)",
            )
            break
        except MlflowException:
            with contextlib.suppress(MlflowException):
                held = client.get_registered_model(lock)
                if time.time() - float(held.tags.get("created", "0")) > ttl_s:
                    client.delete_registered_model(lock)  # abandoned by a crashed promoter
                    continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"timed out waiting for the promotion lock of {name!r}"
                ) from None
            time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


@dataclass
class Decision:
    name: str
    version: str
    decision: str  # "champion" | "rejected"
    metric: str
    candidate: float
    champion: float | None
    champion_version: str | None
    margin: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _is_better(candidate: float, champion: float, mode: str, margin: float) -> bool:
    return candidate < champion - margin if mode == "min" else candidate > champion + margin


def evaluate_version(
    client, name: str, version: str, heldout, judge, seed: int = 0, inception=None
) -> tuple[GanConfig, dict[str, float]]:
    """The version's config and figures under fixed conditions: the given held-out data,
    judge, seed and metric code (FID/KID exactly when ``inception`` is given)."""
    import mlflow

    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=tmp, tracking_uri=client.tracking_uri
        )
        cfg, models, _ = load_package(local)
    cfg = apply_overrides(cfg, {"eval.inception": inception is not None})
    return cfg, evaluate(cfg, models, heldout, judge, seed=seed, inception=inception)


def promote(
    name: str,
    version: str,
    heldout,
    judge,
    margin: float = 0.0,
    seed: int = 0,
    tracking_uri: str | None = None,
    inception=None,
) -> Decision:
    """Make version the champion if it beats the current champion by more than margin on
    the primary metric, both evaluated here on the same data (the snapshot's validation
    split, in the pipeline) with the same judge and seed."""
    client = _client(tracking_uri)
    mv = client.get_model_version(name, version)
    family = mv.tags.get("ganflow.family")
    if family not in ("gan", "cgan", "cyclegan"):
        raise RegistryError(f"{name} v{version} is not a ganflow model (no ganflow.family tag)")
    has_truth = getattr(heldout, "x_truth", None) is not None
    with promotion_lock(client, name):
        cfg, figures = evaluate_version(client, name, version, heldout, judge, seed, inception)
        metric, mode = primary_metric(cfg, has_truth)
        cand = figures[metric]
        client.set_model_version_tag(name, version, f"eval.{metric}", f"{cand:.6g}")
        try:
            champ_version = _resolve(client, name, "champion")
        except RegistryError:
            champ_version = None
        champ = None
        if champ_version is not None and champ_version != version:
            _, champ_figures = evaluate_version(
                client, name, champ_version, heldout, judge, seed, inception
            )
            champ = champ_figures[metric]
        if (
            champ_version is None
            or champ_version == version
            or _is_better(cand, champ, mode, margin)
        ):
            if champ_version == version:
                reason = f"v{version} is already the champion ({metric} {cand:.4g})"
            elif champ is None:
                reason = "no champion yet"
            else:
                reason = f"{metric} {cand:.4g} beats champion v{champ_version} {champ:.4g} by more than {margin:g} ({mode})"
            history = json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))
            if champ_version is not None and champ_version != version:
                history.append(champ_version)
            client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
            client.set_registered_model_alias(name, "champion", version)
            decision = "champion"
        else:
            reason = f"{metric} {cand:.4g} does not beat champion v{champ_version} {champ:.4g} by more than {margin:g} ({mode})"
            client.set_registered_model_alias(name, "challenger", version)
            decision = "rejected"
        tags = {"promotion.decision": decision, "promotion.reason": reason}
        if champ is not None:
            tags[f"eval.champion.{metric}"] = f"{champ:.6g}"
            tags["eval.champion.version"] = str(champ_version)
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
    return Decision(name, version, decision, metric, cand, champ, champ_version, margin, reason)


def rollback(name: str, tracking_uri: str | None = None) -> dict:
    """Move `champion` back to the previous champion; the demoted version is tagged."""
    client = _client(tracking_uri)
    with promotion_lock(client, name):
        current = _resolve(client, name, "champion")
        history = json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))
        if not history:
            raise RegistryError(
                f"{name} has no previous champion to roll back to (champion is v{current})"
            )
        previous = history.pop()
        client.set_registered_model_alias(name, "champion", previous)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        client.set_model_version_tag(name, current, "promotion.rolled_back", "true")
    return {"name": name, "champion": previous, "demoted": current}

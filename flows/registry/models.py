"""Registered models on MLflow: register a trained generator as a new version, resolve
NAME[@alias|/version], load it back (weights only)."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from flows.registry.package import PACKAGE_DIR, RegistryError, load_package, package_generator
from gan_core.config import GanConfig
from gan_core.evaluate import primary_metric


def _client(tracking_uri: str | None = None):
    """The one MLflow client factory (flows.tracking.client), for the configured URI."""
    from flows.settings import mlflow_tracking_uri
    from flows.tracking import client

    return client(tracking_uri or mlflow_tracking_uri())


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

"""The generator package: weights as safetensors plus a JSON description (family, flat config,
image size, labels, snapshot, metrics). Loading reads those two files only: nothing from a
store is ever unpickled.

The format is written by :func:`flows.tracking.write_package` (the training run logs it inside
its MLflow model, below the registry in the data path); this module reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from flows.tracking import META_FILE, MODEL_FILE
from flows.tracking import write_package as package_generator
from gan_core.config import GanConfig
from gan_core.models import build_models
from gan_core.overrides import from_flat_dict

PACKAGE_DIR = "ganflow_generator"  # legacy: the loose artifact folder of versions before v2
HISTORY_TAG = "ganflow.champion_history"

__all__ = [
    "HISTORY_TAG",
    "META_FILE",
    "MODEL_FILE",
    "PACKAGE_DIR",
    "RegistryError",
    "load_package",
    "model_name",
    "package_generator",
]


class RegistryError(ValueError):
    """A registry operation cannot be done (unknown model, nothing to roll back to, ...)."""


def model_name(family: str, dataset: str) -> str:
    """ganflow-<family>-<dataset>, with the dataset reduced to [a-z0-9-]."""
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "data"
    return f"ganflow-{family}-{slug}"


def load_package(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GanConfig, dict[str, nn.Module], dict]:
    """Rebuild the generator(s) from a package folder: JSON + safetensors, no pickle."""
    path = Path(path)
    meta_path, weights_path = path / META_FILE, path / MODEL_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise RegistryError(
            f"{path.name} is not a ganflow generator package (needs {META_FILE} and {MODEL_FILE})"
        )
    try:
        meta = json.loads(meta_path.read_text())
        cfg = from_flat_dict(meta["config"])
        tensors = load_file(str(weights_path), device=str(device))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise RegistryError(f"damaged generator package ({type(exc).__name__}: {exc})") from None
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

"""The generator package: weights as safetensors plus a JSON description (family, flat config,
image size, labels, snapshot, metrics). Loading reads those two files only: nothing from a
store is ever unpickled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gan_core.config import GanConfig
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
    """The networks a package ships: the family's generators, as gan_core's registry names
    them (CycleGAN: both directions, G: X -> Y and F: Y -> X)."""
    from gan_core.train import FAMILIES

    return FAMILIES[family].generators


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

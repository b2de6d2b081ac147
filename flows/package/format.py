"""The generator package: the chosen generator(s) as safetensors plus a JSON description
(family, flat config, image size, labels, snapshot, metrics), and what the logged model that
carries it is made of (its names, its format marker, its models-from-code file, its serving
signature).

One model per run: the chosen generator(s) (a training run's best step on val, EMA weights
when kept) as an MLflow logged model with a python_function flavor (models-from-code: the
class is shipped as code, never pickled) whose payload is this weights-only package.
flows.tracking logs it; the registry registers that logged model; `ganflow generate`,
`ganflow serve` and `mlflow models serve` all load the same artifacts. Writing and reading
touch tensors and JSON only: nothing from a store is ever unpickled.

MLflow and the heavier gan_core modules are imported inside the functions: flows.tracking
imports this module, and importing it starts nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gan_core.config import GanConfig

MODEL_FILE = "generator.safetensors"
META_FILE = "ganflow_model.json"
PACKAGE_ARTIFACT = "package"  # key (and folder) of the package inside the logged model
MODEL_NAME = "generator"  # the logged model's name in its run
FORMAT_VERSION = 1
# Marks a logged model as ganflow's (MLmodel metadata); loaders refuse models without it.
MODEL_FORMAT = "ganflow-generator-v1"
# The models-from-code file MLflow ships with the model and runs when it loads it: the
# served class (flows.package.pyfunc) lives beside this module, in the same package; only
# its path is passed to MLflow (it is never imported here).
MODEL_CODE = Path(__file__).parent / "pyfunc_model.py"
# Samples one request (or one `ganflow generate`) may ask for: 1,024 images of 64 x 64 RGB
# are 50 MB as float32; far more ran a machine out of memory (issue 16).
MAX_SAMPLES = 1024
# What the served model needs besides ganflow itself (served with --env-manager local in the
# ganflow environment, the project image on a cluster).
PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy", "pillow"]


class RegistryError(ValueError):
    """A registry operation cannot be done (unknown model, nothing to roll back to, a damaged
    package, ...).

    Defined here, below the registry, because reading a package (:func:`load_package`) raises
    it too; flows.registry re-exports this very class, so every ``except RegistryError``
    catches a damaged package as well."""


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


def load_package(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GanConfig, dict[str, nn.Module], dict]:
    """Rebuild the generator(s) from a package folder: JSON + safetensors, no pickle."""
    from safetensors.torch import load_file

    from gan_core.models import build_models
    from gan_core.overrides import from_flat_dict

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

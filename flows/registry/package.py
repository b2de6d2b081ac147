"""The registry's names around the generator package: registered model names, the champion
history tag, the legacy package folder, and the error every registry operation raises.

The package format itself (write, read, its file names) lives in flows.package, below both
the training run that logs it and the registry that loads it; its reader and names are
re-exported here for the registry's importers. Loading reads a package's JSON and
safetensors only: nothing from a store is ever unpickled."""

from __future__ import annotations

import re

from flows.package import META_FILE, MODEL_FILE, RegistryError, load_package
from flows.package import write_package as package_generator

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


def model_name(family: str, dataset: str) -> str:
    """ganflow-<family>-<dataset>, with the dataset reduced to [a-z0-9-]."""
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "data"
    return f"ganflow-{family}-{slug}"

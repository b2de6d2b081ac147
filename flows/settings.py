"""Where local state lives. Read at call time, never at import (no import-time side effects)."""

from __future__ import annotations

import os
from pathlib import Path


def ganflow_home() -> Path:
    """All local state (MLflow database and artifacts, snapshots, Ray storage, caches) lives
    under GANFLOW_HOME, default ./.ganflow in the working directory."""
    return Path(os.environ.get("GANFLOW_HOME", ".ganflow")).absolute()


def cache_dir() -> Path:
    return ganflow_home() / "cache"


def runs_dir() -> Path:
    return ganflow_home() / "runs"

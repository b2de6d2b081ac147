"""Seeding a fresh GANFLOW_HOME's cache with the judges the run has already trained."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path


def seed_judges(home: Path, cache: Path) -> Path:
    """Copy the judges in ``cache`` (conftest's shared ``classifier_cache``) into
    ``home/cache``. The cache is shared by both xdist workers: a file another worker is
    writing under a dot-name is skipped, and one renamed away between listing and copying is
    not an error. Returns home."""
    dest = Path(home) / "cache"
    dest.mkdir(parents=True, exist_ok=True)
    for f in Path(cache).iterdir():
        if f.name.startswith(".") or not f.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            shutil.copy(f, dest / f.name)
    return Path(home)

"""Seeding a fresh GANFLOW_HOME: the judges the run has already trained, and stores that are
already migrated."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
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


def build_store_templates(folder: Path) -> None:
    """A migrated MLflow SQLite store (``mlflow.db``) and Prefect database (``prefect.db``),
    built in subprocesses by the installed MLflow and Prefect themselves. A fresh store
    migrates from scratch when it is first opened: about 5 CPU-seconds for MLflow and 10 for
    Prefect's server on this 2-core machine (measured), in every `ganflow` subprocess or
    server a test starts on a new home."""
    folder.mkdir(parents=True, exist_ok=True)
    mlflow_db = folder / "mlflow.db"
    code = (
        "import sqlalchemy, mlflow.store.db.utils as u; "
        f"u._initialize_tables(sqlalchemy.create_engine('sqlite:///{mlflow_db}'))"
    )
    _run_or_say_why("MLflow store", [sys.executable, "-c", code], None)
    prefect = Path(sys.executable).parent / "prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(folder / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    argv = [str(prefect), "server", "database", "upgrade", "-y"]
    _run_or_say_why("Prefect database", argv, env)
    shutil.move(folder / "prefect" / "prefect.db", folder / "prefect.db")


def _run_or_say_why(what: str, argv: list[str], env: dict | None) -> None:
    """Run a template build step; when it fails, the error carries the step's own last lines
    (a bare CalledProcessError names only the exit status, and every test that needs the
    templates would fail with it)."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"building the {what} template failed (exit {proc.returncode}):\n{tail}")


def seed_stores(templates: Path, mlflow_db: Path | None = None, prefect_home=None) -> None:
    """Copy the migrated templates (conftest's ``store_templates``) to where a subprocess or
    server will open its stores: ``mlflow_db`` (a SQLite file MLflow has not created yet) and
    ``prefect_home`` (a PREFECT_HOME without a database). MLflow goes on as with a store it
    migrated itself (it creates the default experiment at the first open); Prefect's server
    finds its schema at the head revision. What a brand-new home does at its first run stays
    tested where a test starts one unseeded (test_console's default `ganflow train`)."""
    if mlflow_db is not None:
        Path(mlflow_db).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(templates) / "mlflow.db", mlflow_db)
    if prefect_home is not None:
        Path(prefect_home).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(templates) / "prefect.db", Path(prefect_home) / "prefect.db")

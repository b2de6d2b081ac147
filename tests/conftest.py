"""Shared test setup. Every test runs with its own GANFLOW_HOME so nothing leaks into the
working tree; services (Ray, MLflow, S3, Prefect) are started by the tests that need them."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch

# One intra-op thread: with Ray workers or other processes beside on 2 cores, OpenMP
# oversubscription slowed training 10-30x here (measured), and results stay bit-stable.
torch.set_num_threads(1)


# `make test` runs the suite on two xdist workers, a file at a time (--dist loadfile: a module's
# Ray cluster, servers and trained models are built once). Each worker takes the next file in
# collection order, so the longest files go first (measured, minutes each on 2 cores) and the
# many short ones fill in beside them at the end; a file not named keeps its place after them.
# (A long file left out runs last, one worker idle beside it: re-rank from `make test`'s
# durations when a file grows.)
LONGEST_FIRST = (
    "test_tune.py",
    "test_own_data.py",
    "test_tracking_outage.py",
    "test_train_ray.py",
    "test_pbt.py",
    "test_faults.py",
    "test_watch_e2e.py",
    "test_pipeline.py",
    "test_gpu_check.py",
    "test_retrain_pipeline.py",
    "test_retrain_side_by_side.py",
    "test_infra_live.py",
    "test_two_jobs.py",
    "test_inception.py",
    "test_ingest_cluster.py",
    "test_deployment_e2e.py",
    "test_console.py",
    "test_pipeline_pbt.py",
    "test_behaviour.py",
    "test_bench_quality.py",
    "test_serving.py",
    "test_train_ray_flow.py",
    "test_train_ray_cluster.py",
    "test_watch.py",
    "test_registry.py",
    "test_data_path.py",
    "test_stabilisers_ddp.py",
    "test_bad_input.py",
    "test_collapse.py",
    "test_metrics.py",
)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: files in their usual order
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


@pytest.fixture(scope="session", autouse=True)
def _prefect_home_per_session(tmp_path_factory):
    """Prefect's ephemeral server keeps its database under PREFECT_HOME: one per session (per
    xdist worker), never the user's ~/.prefect, so two workers never share one SQLite file.
    Modules that want their own set it over this one."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GANFLOW_HOME", str(tmp_path / "ganflow-home"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    yield


@pytest.fixture(scope="session", autouse=True)
def _mlflow_schema_once(tmp_path_factory):
    """MLflow migrates every new SQLite store from scratch (about 5 s on 2 cores, and most
    tests here start a fresh one). In this process the migrations run once, into a template;
    each new SQLite store then gets the template's schema copied in (SQLite's backup API) and
    MLflow goes on as with a migrated database: the same tables and revision, the default
    experiment created by MLflow itself. Subprocesses (servers, CLI runs) still migrate."""
    import sqlite3

    import mlflow.store.db.utils as db_utils
    import mlflow.store.model_registry.sqlalchemy_store as registry_store
    import sqlalchemy

    real = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow-schema") / "schema.db"
    lock = threading.Lock()  # stores opened from several threads (the promotion races)

    def initialize(engine):
        path = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        if not path or path == ":memory:":
            return real(engine)
        with lock:
            if db_utils._all_tables_exist(engine):
                return None
            if not template.exists():
                built = sqlalchemy.create_engine(f"sqlite:///{template}")
                real(built)
                built.dispose()
            src, dst = sqlite3.connect(template), sqlite3.connect(path)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
        return None

    mp = pytest.MonkeyPatch()
    mp.setattr(db_utils, "_initialize_tables", initialize)
    mp.setattr(registry_store, "_initialize_tables", initialize)
    yield
    mp.undo()


def _train_builtin_judges(cache: Path, home: Path) -> None:
    """The judges of the built-in sets that every pipeline, search and Train run in the suite
    judges by (digits for gan and cgan, digits-unpaired for cyclegan, at the presets' size),
    trained as a Train worker trains them and cached under their snapshot ids, as a worker
    looks them up (flows.train.data_config.judge_data)."""
    from flows.ingest.resolve import ensure_snapshot
    from flows.train.data_config import judge_data, load_heldout, load_judge
    from gan_core.presets import preset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GANFLOW_HOME", str(home))
        for family in ("gan", "cyclegan"):
            cfg = preset(family)
            sid = ensure_snapshot(cfg.data.dataset, image_size=cfg.data.image_size).id
            heldout = load_heldout(sid, None, cfg)["test"]
            load_judge(sid, cache, judge_data(sid, None, heldout))


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder for the whole run, shared by both xdist workers: ``build(folder, root)`` runs
    once, under a file lock, in the first worker that asks; the others wait for it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / ".ready").exists():
            build(folder, root)
            (folder / ".ready").touch()
    return folder


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    """Judges and classifiers for the whole run, shared by both xdist workers: the built-in
    sets' judges are trained once, under a file lock, before a test copies this folder into
    its GANFLOW_HOME (a judge costs seconds on the critical path of every fresh home's first
    evaluation: trials starting together each trained it). Other keys are trained by the
    first test that asks for them (writes are atomic, so two workers never see half a file)."""
    return _built_once(
        tmp_path_factory,
        "judge-cache",
        lambda cache, root: _train_builtin_judges(cache, root / "judge-cache-home"),
    )


@pytest.fixture(scope="session")
def store_templates(tmp_path_factory):
    """A migrated MLflow SQLite store and Prefect database for the whole run (both xdist
    workers), built once under a file lock; tests copy them into a new home with
    home_cache.seed_stores before a subprocess or server opens it."""
    from home_cache import build_store_templates

    return _built_once(
        tmp_path_factory, "store-templates", lambda folder, _root: build_store_templates(folder)
    )


@pytest.fixture(scope="session")
def trained_cgan():
    """preset("cgan") trained 700 steps on the built-in digits, once per session (about 20 s
    on 2 cores): a cGAN that has learnt its labels (class accuracy about 0.96), for the tests
    that only read it (collapse, registry gating, serving). Returns (cfg, models); copy the
    models before changing them."""
    from gan_core.data import load_builtin
    from gan_core.overrides import apply_overrides
    from gan_core.presets import preset
    from gan_core.train import init_state, train

    cfg = apply_overrides(preset("cgan"), {"train.steps": 700})
    data = load_builtin(cfg.data.dataset, cfg.data.image_size, "train")
    with torch.random.fork_rng(devices=[]):
        models = train(init_state(cfg, data, "cpu"), data).models
    return cfg, models


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root can mount one here), for full-disk faults; skipped where mounting
    is not allowed. A mount is seen by every process, Ray's workers included."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

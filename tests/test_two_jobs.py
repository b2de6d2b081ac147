"""Two ganflow jobs at once on one machine: a search and a training, each with its own
GANFLOW_HOME and so its own local Ray instance.

With two instances on a machine, Ray's state API cannot pick "the" local one: Ray Train's
PlacementGroupCleaner (one per Train run) died with "Found multiple active Ray instances", its
traceback reached the training's console, and the cleaners stayed alive with their
placement groups' fate unwatched (a search then hung on CPUs nobody used). ganflow now
addresses each instance it starts explicitly (flows.preflight.ensure_ray).

Each job runs the `ganflow` entry point in a small wrapper that, after the command returns and
before its instance stops with the process, asks that instance (by its address) which
placement groups and actors are still there, and what RAY_ADDRESS a fresh worker sees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from home_cache import seed_judges, seed_stores

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The job: `ganflow <argv>` as the console script runs it, then a report on its own Ray
# instance to the file in TWO_JOBS_REPORT (not the console, which the test reads as a user's).
_JOB = r"""
import gc, glob, json, os, re, sys, time

from flows.cli import main

KEEP = set(json.loads(os.environ["TWO_JOBS_KEEP"]))
rc = main(sys.argv[1:])
report = {"rc": rc, "end_ms": time.time() * 1000}
import ray

if ray.is_initialized():
    from ray.util.state import list_actors, list_nodes, list_placement_groups

    from flows.console import ray_session_logs

    gc.collect()  # actor handles the finished command no longer holds
    address = ray.get_runtime_context().gcs_address
    report["address"] = address
    report["start_ms"] = min(n.start_time_ms for n in list_nodes(address=address, detail=True))
    # Teardown is asynchronous (actors exit after fit returns): give it a few seconds.
    deadline = time.time() + 30
    while True:
        actors = list_actors(address=address, filters=[("state", "!=", "DEAD")], limit=1000)
        pgs = list_placement_groups(
            address=address, filters=[("state", "!=", "REMOVED")], limit=1000
        )
        report["actors"] = sorted(a.class_name for a in actors)
        report["placement_groups"] = [(p.placement_group_id, p.state) for p in pgs]
        if time.time() > deadline or not (pgs or set(report["actors"]) - KEEP):
            break
        time.sleep(1)
    report["cpus"] = [ray.available_resources().get("CPU"), ray.cluster_resources()["CPU"]]
    # A fresh worker process of the instance: which cluster its state API would query.
    probe = ray.remote(num_cpus=0)(lambda: os.environ.get("RAY_ADDRESS"))
    report["worker_ray_address"] = ray.get(probe.remote())
    # What the instance's workers and actors wrote (the console shows only ganflow's lines):
    # a state-API query that could not tell the instances apart, or a thread it killed (Ray
    # Train's PlacementGroupCleanerMonitor). Not every traceback: on an overloaded machine
    # Ray logs transient timeouts it retries ("safe to ignore"), whatever else runs.
    bad = re.compile(
        r"multiple active Ray instances|Could not find any running Ray instance"
        r"|Exception in thread"
    )
    report["worker_log_problems"] = [
        f"{os.path.basename(path)}: {line.strip()}"
        for path in sorted(glob.glob(os.path.join(ray_session_logs(), "worker-*")))
        for line in open(path, errors="replace")
        if bad.search(line)
    ]
with open(os.environ["TWO_JOBS_REPORT"], "w") as f:
    json.dump(report, f)
sys.exit(rc)
"""

# Actors that may outlive the command inside its process, none holding a CPU or a placement
# group: Ray Train's per-instance bookkeeping singletons, and the driver's last Train
# controller (with its dataset manager), whose handle Ray Train's Ctrl-C handler keeps until
# the process exits. The instance stops with the process; the test checks that too.
_KEEP = {"TrainStateActor", "_AutoscalingCoordinatorActor", "TrainController", "DatasetManager"}

# Lines that come from Ray's internals rather than ganflow: tracebacks, C++ log records
# ("[2026-12-05 17:35:38,037 E 11361 11389] core_worker.cc:2465: ..."), Python log records
# ("... WARNING worker.py:123 -- ..."), and lines streamed from a named Ray process.
_RAY_INTERNALS = re.compile(
    r"Traceback|Found multiple active Ray instances|core_worker|raylet|gcs_server"
    r"|site-packages/ray/|^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\]|\w+\.py:\d+ -- "
    r"|^\((\w+ )?pid=\d+",
    re.MULTILINE,
)

_TINY = ["--set", "train.steps=20", "--set", "train.log_every=10", "--set", "model.hidden=32"]


def _env(home: Path, report: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        # Each job starts its own local Ray and uses its own MLflow/Prefect under its home.
        if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")
    }
    env.update(
        {
            "GANFLOW_HOME": str(home),
            "PREFECT_HOME": str(home / "prefect"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "TWO_JOBS_REPORT": str(report),
            "TWO_JOBS_KEEP": json.dumps(sorted(_KEEP)),
        }
    )
    return env


def _instance_processes(address: str) -> list[str]:
    """Processes on this machine whose command line names the instance's GCS address (its
    raylet, workers, agents)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        if address in cmd:
            found.append(f"{d.name}: {cmd[:160]}")
    return found


def test_a_search_and_a_training_at_once(tmp_path, classifier_cache, store_templates):
    space = tmp_path / "space.yaml"
    space.write_text("train.d_steps: {grid: [1, 2]}\n")
    jobs = {
        "tune": [
            "tune",
            "--family",
            "gan",
            "--space",
            str(space),
            "--scheduler",
            "fifo",
            "--name",
            "two-jobs-search",
            *_TINY,
            "--set",
            "eval.every=20",
            "--json",
        ],
        "train": ["train", "--family", "gan", *_TINY, "--json"],
    }
    procs, reports, logs = {}, {}, {}
    t0 = time.monotonic()
    for name, argv in jobs.items():
        home = seed_judges(tmp_path / name, classifier_cache)
        seed_stores(store_templates, mlflow_db=home / "mlflow.db", prefect_home=home / "prefect")
        reports[name] = tmp_path / f"{name}-report.json"
        logs[name] = (tmp_path / f"{name}.out").open("w+")
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _JOB, *argv],
            env=_env(home, reports[name]),
            stdout=subprocess.PIPE,
            stderr=logs[name],
            text=True,
            start_new_session=True,
        )
    outs = {}
    try:
        for name, proc in procs.items():
            stdout, _ = proc.communicate(timeout=540)
            logs[name].seek(0)
            outs[name] = (stdout, logs[name].read())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    took = time.monotonic() - t0

    for name, proc in procs.items():
        stdout, stderr = outs[name]
        console = stdout + stderr
        assert proc.returncode == 0, f"{name} rc {proc.returncode}:\n{console[-3000:]}"
        bad = [m.group(0) for m in _RAY_INTERNALS.finditer(console)]
        assert not bad, f"{name}'s console has lines from Ray's internals {bad}:\n{console}"
    train = json.loads(outs["train"][0].strip().splitlines()[-1])
    assert train["steps"] == 20
    search = json.loads(outs["tune"][0].strip().splitlines()[-1])
    assert len(search["trials"]) == 2
    assert all(t["error"] is None and t["step"] == 20 for t in search["trials"]), search

    r = {name: json.loads(reports[name].read_text()) for name in jobs}
    # The two instances ran side by side (otherwise this test shows nothing).
    overlap_s = (
        min(x["end_ms"] for x in r.values()) - max(x["start_ms"] for x in r.values())
    ) / 1e3
    assert overlap_s > 10, (overlap_s, r)
    assert r["tune"]["address"] != r["train"]["address"]
    for name, x in r.items():
        # Every process of the instance addresses it explicitly, never "the only one here".
        assert x["worker_ray_address"] == x["address"], (name, x)
        assert x["worker_log_problems"] == [], (name, x)
        assert x["placement_groups"] == [], (name, x)
        assert set(x["actors"]) <= _KEEP, (name, x)
        free, total = x["cpus"]
        assert free == total, (name, x)  # nothing reserves a CPU any more
    # And when the jobs end, their instances end with them.
    deadline = time.time() + 30
    while (left := _instance_processes(r["tune"]["address"])) or (
        left := _instance_processes(r["train"]["address"])
    ):
        assert time.time() < deadline, left
        time.sleep(1)
    print(f"two jobs at once: {took:.0f} s (side by side {overlap_s:.0f} s)")

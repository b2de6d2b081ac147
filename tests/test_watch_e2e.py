"""Retraining starts on new data (issue 21), on a real Prefect server: `prefect server start`,
the repository's deployments applied with `prefect deploy` (the retraining deployment's
ganflow.dataset.changed trigger, the dataset watcher), and `ganflow watch` polling a local
folder and a prefix on a moto S3 server. No worker runs: the test counts the flow runs the
trigger creates, and what they are told to retrain.

- a source that does not change starts no run;
- images added to the local folder (used by gan and cgan) start exactly one run, for that
  source, which retrains those two families;
- a burst of 50 uploads to the S3 prefix (used by cyclegan), spread over longer than the
  quiet period's polls, starts exactly one run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from home_cache import seed_stores
from test_deployment_e2e import BIN, ROOT, _free_port, _prefect, _wait_http

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
pytest_plugins = ["s3_server"]  # the moto server fixtures: moto_endpoint, s3

POLL_S, QUIET_S = 1, 4


def _png(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), color=i % 256).save(buf, format="PNG")
    return buf.getvalue()


def _api(port: int, path: str, body: dict | None = None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _triggered(port: int, deployment_id: str) -> list[dict]:
    """The retraining deployment's runs other than the cron's own."""
    runs = _api(port, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
    return [r for r in runs if not r["auto_scheduled"]]


def _wait_runs(port: int, dep: str, n: int, timeout: float) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = _triggered(port, dep)
        if len(runs) >= n:
            return runs
        time.sleep(0.5)
    return _triggered(port, dep)


@pytest.fixture(scope="module")
def prefect(tmp_path_factory, store_templates):
    """`prefect server start` on loopback, one per module (a start is tens of seconds on a
    busy 2-core machine); yields (port, settings), the settings pointing a client at it (a
    test adds them to its own environment, which may hold what its other fixtures set)."""
    home = tmp_path_factory.mktemp("prefect-server")
    seed_stores(store_templates, prefect_home=home / "prefect")
    port = _free_port()
    settings = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **settings},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", 120)
        yield port, settings
    finally:
        _stop([proc])


def _stop(procs) -> None:
    for p in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, 15)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=20)


def test_new_data_starts_one_retraining_per_source(prefect, tmp_path, s3):
    from flows.orchestration.retraining import PipelineConfig, for_source
    from flows.orchestration.watch import source_id

    local = tmp_path / "photos"
    local.mkdir()
    for i in range(5):
        (local / f"{i}.png").write_bytes(_png(i))
    fs = s3.fs()
    for i in range(5):
        fs.pipe(f"{s3.bucket}/imgs/{i}.png", _png(i))
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "families": ["gan", "cgan", "cyclegan"],
                "datasets": {"gan": str(local), "cgan": str(local), "cyclegan": s3.url("imgs/")},
            }
        )
    )
    port, settings = prefect
    env = {**os.environ, **settings, "GANFLOW_HOME": str(tmp_path / "home")}
    procs = []
    try:
        spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
        spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] = str(ROOT)
        deps = {d["name"]: d for d in spec["deployments"]}
        deps["weekly-retraining"]["parameters"]["config_path"] = str(config)
        pfile = tmp_path / "prefect.yaml"
        pfile.write_text(yaml.safe_dump(spec))
        pool = deps["weekly-retraining"]["work_pool"]["name"]
        r = _prefect(["work-pool", "create", pool, "--type", "process"], env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        r = _prefect(
            ["--no-prompt", "deploy", "--prefect-file", str(pfile)]
            + ["-n", "weekly-retraining", "-n", "dataset-watcher"],
            env,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        dep = _api(port, "/deployments/name/ganflow-retraining/weekly-retraining")["id"]
        watcher = _api(port, "/deployments/name/ganflow-dataset-watcher/dataset-watcher")
        assert watcher["parameters"]["quiet_seconds"] > 0

        log = open(tmp_path / "watch.log", "w")  # noqa: SIM115 (closed with the process)
        cmd = [sys.executable, "-m", "flows.cli", "watch", "--config", str(config)]
        cmd += ["--every", str(POLL_S), "--quiet", str(QUIET_S)]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
        )

        def watch_log() -> str:
            return (tmp_path / "watch.log").read_text()

        deadline = time.time() + 120
        while watch_log().count("watching (5 files)") < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert watch_log().count("watching (5 files)") == 2, watch_log()

        # No change: several quiet periods, no run.
        time.sleep(3 * QUIET_S)
        assert _triggered(port, dep) == [], watch_log()

        # Images added to the local folder: one run, for that source (gan and cgan).
        for i in range(5, 8):
            (local / f"{i}.png").write_bytes(_png(i))
        runs = _wait_runs(port, dep, 1, 60)
        time.sleep(2 * QUIET_S)
        runs = _triggered(port, dep)
        assert len(runs) == 1, (runs, watch_log())
        assert runs[0]["parameters"]["source"] == source_id(str(local))
        assert runs[0]["parameters"]["config_path"] == str(config)
        pc = PipelineConfig.load(str(config))
        assert for_source(pc, runs[0]["parameters"]["source"]).families == ("gan", "cgan")

        # A burst of 50 uploads to the S3 prefix, spread over more than the quiet period
        # (each poll sees a new listing): one run when it is over.
        for i in range(50):
            fs.pipe(f"{s3.bucket}/imgs/burst-{i}.png", _png(i))
            time.sleep(1.5 * QUIET_S / 50)
        runs = _wait_runs(port, dep, 2, 60)
        time.sleep(2 * QUIET_S)
        runs = _triggered(port, dep)
        assert len(runs) == 2, (runs, watch_log())
        s3_runs = [r for r in runs if r["parameters"]["source"] == source_id(s3.url("imgs/"))]
        assert len(s3_runs) == 1, runs
        assert for_source(pc, s3_runs[0]["parameters"]["source"]).families == ("cyclegan",)
        assert watch_log().count("ganflow.dataset.changed") == 2, watch_log()
    finally:
        _stop(procs)


def _runs_of(port: int, deployment_id: str, state: str | None = None) -> list[dict]:
    body: dict = {"deployments": {"id": {"any_": [deployment_id]}}}
    if state:
        body["flow_runs"] = {"state": {"type": {"any_": [state]}}}
    return _api(port, "/flow_runs/filter", body)


def _ask(what, tries: int = 12):
    """what(), asked again while the server is too slow to answer (a loaded machine)."""
    for _ in range(tries - 1):
        try:
            return what()
        except OSError:
            time.sleep(1)
    return what()


def _wait_for(what, timeout: float, log) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = what()
        except OSError:  # the server slow to answer on a loaded machine: ask again
            got = None
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s; the schedule's log:\n{log()[-4000:]}")


@pytest.mark.timeout(1200)  # its waits are generous: a loaded machine slows Prefect's server
def test_schedule_watch_serves_the_trigger_and_new_data_starts_one_run(prefect, tmp_path):
    """`ganflow schedule --watch` with no worker and no `prefect deploy`: it registers the
    retraining deployment (cron plus the data trigger) and the watcher on the server and runs
    both itself. An unchanged folder starts nothing; new images start one retraining run,
    for that source, served by the same process."""
    from flows.orchestration.watch import source_id

    port, settings = prefect
    local = tmp_path / "photos"
    local.mkdir()
    for i in range(5):
        (local / f"{i}.png").write_bytes(_png(i))
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"families": ["gan"], "datasets": {"gan": str(local)}}))
    env = {
        **os.environ,
        **settings,
        "GANFLOW_HOME": str(tmp_path / "home"),
        # The served deployments' runner looks for due runs this often (Prefect's default
        # is 10 s); the watcher's interval below is its schedule.
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    log_path = tmp_path / "schedule.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed with the process)
    cmd = [sys.executable, "-m", "flows.cli", "schedule", "--config", str(config)]
    cmd += ["--name", "sched", "--watch", "3", "--quiet", str(QUIET_S)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    log.close()

    def schedule_log() -> str:
        return log_path.read_text()

    try:

        def deployment(name: str):
            with contextlib.suppress(OSError):
                return _api(port, f"/deployments/name/{name}")["id"]
            return None

        dep = _wait_for(lambda: deployment("ganflow-retraining/sched"), 120, schedule_log)
        watcher = _wait_for(
            lambda: deployment("ganflow-dataset-watcher/sched-watcher"), 60, schedule_log
        )
        # The watcher has polled the unchanged folder a few times, longer than the quiet
        # period: still no retraining run.
        _wait_for(lambda: len(_runs_of(port, watcher, "COMPLETED")) >= 3, 300, schedule_log)
        time.sleep(QUIET_S)
        assert _ask(lambda: [r for r in _runs_of(port, dep) if not r["auto_scheduled"]]) == [], (
            schedule_log()
        )

        for i in range(5, 8):
            (local / f"{i}.png").write_bytes(_png(i))

        def triggered() -> list[dict]:
            return [r for r in _runs_of(port, dep) if not r["auto_scheduled"]]

        _wait_for(triggered, 300, schedule_log)
        # More polls of the now unchanged folder, past the quiet period: no second run.
        done = len(_ask(lambda: _runs_of(port, watcher, "COMPLETED")))
        _wait_for(lambda: len(_runs_of(port, watcher, "COMPLETED")) >= done + 2, 300, schedule_log)
        runs = _wait_for(triggered, 60, schedule_log)
        assert len(runs) == 1, (runs, schedule_log())
        assert runs[0]["parameters"]["source"] == source_id(str(local))
        assert runs[0]["parameters"]["config_path"] == str(config)
        assert proc.poll() is None, schedule_log()  # still serving
    finally:
        _stop([proc])

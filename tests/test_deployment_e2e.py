"""Scheduled retraining for real: `prefect server start` on loopback, a worker on the process
pool, the deployments of deploy/prefect.yaml applied with `prefect deploy`, a retraining run
triggered through the server, and the MLflow registry showing a new champion version."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from home_cache import seed_judges, seed_stores

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def _prefect(args, env, **kw):
    return subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, **kw
    )


def test_deployment_runs_through_prefect_server_and_worker(
    tmp_path, classifier_cache, store_templates
):
    home = tmp_path / "home"
    seed_judges(home, classifier_cache)
    seed_stores(store_templates, mlflow_db=home / "mlflow.db", prefect_home=tmp_path / "prefect")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "GANFLOW_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    procs = []
    try:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(server)
        _wait_http(f"http://127.0.0.1:{port}/api/health", 120)

        # The repository's deployments, with the image's code folder pointed at this checkout.
        spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
        text = (ROOT / "deploy" / "prefect.yaml").read_text().replace("/opt/ganflow", str(ROOT))
        pfile = tmp_path / "prefect.yaml"
        pfile.write_text(text)
        pool = spec["deployments"][0]["work_pool"]["name"]
        r = _prefect(["work-pool", "create", pool, "--type", "process"], env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        r = _prefect(
            ["--no-prompt", "deploy", "--all", "--prefect-file", str(pfile)], env, timeout=300
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(worker)

        config = tmp_path / "pipeline.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "families": ["gan"],
                    "overrides": {"gan": {"train.steps": 100, "train.log_every": 50}},
                }
            )
        )
        r = _prefect(
            [
                "deployment",
                "run",
                "ganflow-retraining/weekly-retraining",
                "--param",
                f"config_path={config}",
                "--watch",
                "--watch-timeout",
                "600",
            ],
            env,
            timeout=700,
        )
        assert r.returncode == 0 and "Completed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 15)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=20)

    from mlflow import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    name = "ganflow-gan-builtin-digits"
    mv = c.get_model_version_by_alias(name, "champion")
    assert str(mv.version) == "1"
    assert mv.tags["promotion.decision"] == "champion"
    # The scheduled deployment carries its weekly cron.
    assert spec["deployments"][0]["schedules"][0]["cron"] == "0 3 * * 1"

"""Preflight checks of the configured remote services: each one, configured with a dead port or
a wrong credential, gives one line naming it; `ganflow run` stops there with exit 2 before
any work. (A real MLflow basic-auth server rejecting a password is checked in
tests/test_infra_live.py; here a tiny local server answers like one, in milliseconds.)"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flows.preflight import PreflightError, check_services, ray_host_port

pytest_plugins = ["s3_server"]  # moto server fixtures: moto_endpoint, s3
ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-do-not-print"
_SERVICE_VARS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_API_KEY",
    "GANFLOW_STORAGE_ROOT",
    "GANFLOW_RAY_STORAGE",
    "RAY_ADDRESS",
)


@pytest.fixture(autouse=True)
def _no_services(monkeypatch):
    for var in _SERVICE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GANFLOW_PREFLIGHT_TIMEOUT_S", "3")


def _dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    """/health and /api/health: 200; the MLflow API: 200 with user:SECRET, else 401 (like
    `mlflow server --app-name basic-auth`)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        import base64

        good = "Basic " + base64.b64encode(f"ganflow:{SECRET}".encode()).decode()
        if self.path.endswith("/health"):
            code, body = 200, b"OK"
        elif self.headers.get("Authorization") == good:
            code, body = 200, json.dumps({"experiments": []}).encode()
        else:
            code, body = 401, b"You are not authenticated."
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _one_line_error(match: str) -> str:
    with pytest.raises(PreflightError) as exc:
        check_services()
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert match in msg, msg
    assert SECRET not in msg and os.environ.get("AWS_SECRET_ACCESS_KEY", "x" * 9) not in msg
    return msg


def test_nothing_configured_checks_nothing():
    assert check_services() == []


def test_sqlite_and_local_paths_are_not_remote(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setenv("GANFLOW_STORAGE_ROOT", str(tmp_path / "snapshots"))
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert check_services() == []


def test_mlflow_dead_port(monkeypatch):
    port = _dead_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ganflow:{SECRET}@127.0.0.1:{port}")
    msg = _one_line_error("MLflow at http://***@127.0.0.1:")
    assert "unreachable" in msg and "MLFLOW_TRACKING_URI" in msg


def test_mlflow_credentials(monkeypatch, fake_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fake_server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ganflow")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET + "-wrong")
    _one_line_error(f"MLflow at {fake_server}: credentials rejected (HTTP 401)")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    _one_line_error("HTTP 401 without credentials; set MLFLOW_TRACKING_USERNAME")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ganflow")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    assert check_services() == ["mlflow"]


def test_prefect_dead_port_and_ok(monkeypatch, fake_server):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_dead_port()}/api")
    _one_line_error("Prefect API at http://127.0.0.1:")
    monkeypatch.setenv("PREFECT_API_URL", f"{fake_server}/api")
    assert check_services() == ["prefect"]


def test_ray_dead_port(monkeypatch):
    port = _dead_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    msg = _one_line_error(f"Ray cluster at 127.0.0.1:{port}: unreachable")
    assert "RAY_ADDRESS" in msg


def test_ray_address_forms():
    assert ray_host_port("auto") is None and ray_host_port("local") is None
    assert ray_host_port("ray-head:6379") == ("ray-head", 6379)
    assert ray_host_port("ray://head") == ("head", 10001)
    assert ray_host_port("[::1]:6380") == ("::1", 6380)
    with pytest.raises(PreflightError, match="not host:port"):
        ray_host_port("head:port")


def test_ray_live_port(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{s.getsockname()[1]}")
        assert check_services() == ["ray"]


def test_object_store_ok_and_deduplicated(s3, monkeypatch):
    monkeypatch.setenv("GANFLOW_STORAGE_ROOT", s3.url("snapshots"))
    monkeypatch.setenv("GANFLOW_RAY_STORAGE", s3.url("ray"))
    assert check_services() == [f"s3://{s3.bucket}"]


def test_object_store_missing_bucket(s3, monkeypatch):
    monkeypatch.setenv("GANFLOW_RAY_STORAGE", "s3://no-such-bucket-here/ray")
    msg = _one_line_error("object store at http://127.0.0.1:")
    assert "bucket 'no-such-bucket-here' does not exist (from GANFLOW_RAY_STORAGE)" in msg


def test_object_store_bad_credentials(s3, monkeypatch):
    monkeypatch.setenv("GANFLOW_STORAGE_ROOT", s3.url("snapshots"))
    s3.require_auth(True)  # moto checks signatures now: the test key is unknown to it
    msg = _one_line_error(f"credentials rejected for bucket '{s3.bucket}'")
    assert "InvalidAccessKeyId" in msg and "AWS_ACCESS_KEY_ID" in msg


def test_object_store_unreachable(s3, monkeypatch):
    monkeypatch.setenv("GANFLOW_STORAGE_ROOT", s3.url("snapshots"))
    monkeypatch.setenv("GANFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{_dead_port()}")
    _one_line_error("unreachable")


def test_explicit_env_mapping(s3):
    env = {
        "GANFLOW_STORAGE_ROOT": "s3://other-missing-bucket/x",
        "GANFLOW_S3_ENDPOINT_URL": s3.endpoint,
        "AWS_ACCESS_KEY_ID": "k" * 8,
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    with pytest.raises(PreflightError, match="bucket 'other-missing-bucket' does not exist"):
        check_services(env)


def test_ganflow_run_stops_before_any_work(tmp_path):
    """A dead MLflow server: exit 2, one line on stderr naming MLflow, and no snapshot."""
    home = tmp_path / "home"
    config = tmp_path / "tiny.yaml"
    config.write_text("families: [gan]\noverrides: {gan: {train.steps: 10}}\n")
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARS}
    env.update(
        GANFLOW_HOME=str(home),
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_dead_port()}",
        MLFLOW_TRACKING_USERNAME="ganflow",
        MLFLOW_TRACKING_PASSWORD=SECRET,
        PREFECT_HOME=str(tmp_path / "prefect"),
    )
    r = subprocess.run(
        [str(Path(sys.executable).parent / "ganflow"), "run", "--config", str(config), "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ganflow run: error: MLflow at http://127.0.0.1:"), lines[0]
    assert "unreachable" in lines[0] and SECRET not in r.stderr + r.stdout
    assert r.stdout == ""
    assert not (home / "snapshots").exists()
    assert not (home / "mlflow.db").exists()

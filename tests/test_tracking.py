"""MLflow helpers: fail-fast reachability, explicit artifact locations, run reuse by name."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from flows import tracking


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_in_seconds_with_one_line():
    uri = f"http://user:hunter2@127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(tracking.TrackingError) as info:
        tracking.check_reachable(uri, timeout_s=2)
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert "unreachable" in msg and "\n" not in msg
    assert "hunter2" not in msg  # no secrets in errors


def test_a_server_that_answers_is_reachable():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


def test_redact_hides_credentials():
    assert tracking.redact("https://u:p@host:5000/x") == "https://***@host:5000/x"
    assert tracking.redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_default_uri_is_sqlite_under_ganflow_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GANFLOW_HOME", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(tracking.tracking_uri())


def test_experiment_has_explicit_artifact_location_and_runs_are_reused_by_name(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("GANFLOW_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri()
    exp = tracking.ensure_experiment(uri, "t")
    assert tracking.ensure_experiment(uri, "t") == exp
    c = tracking.client(uri)
    location = c.get_experiment(exp).artifact_location
    assert location == (tmp_path / "mlartifacts").as_uri() + "/t"
    a = tracking.find_or_create_run(uri, exp, "job-1", {})
    assert tracking.find_or_create_run(uri, exp, "job-1", {}) == a  # unfinished: resumed
    assert tracking.find_or_create_run(uri, exp, "job-2", {}) != a
    tracking.finish_run(uri, a)
    assert tracking.find_or_create_run(uri, exp, "job-1", {}) != a  # finished: a new run
    assert not (tmp_path / "mlruns").exists()

"""A tracking server that goes away during a training run (issue 24, item 1): rank 0's
records are spooled on local disk, sent in order when the server answers again, and a run
that ends while it is still away keeps its spool for `ganflow tracking replay`.

Against a real `mlflow server` (SQLite backend, experiments with a local artifact root, as
the pipeline creates them), started, killed (SIGKILL: a lost server says nothing) and
started again on the same port and database."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from home_cache import seed_judges, seed_stores

from flows import tracking

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A call made while the server is down must return in well under this (MLflow's own
# defaults retried for minutes: 7 retries with a growing backoff).
QUICK_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except OSError:
        return False


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite backend, in its own process group so that
    stop() kills it and its workers at once (never by name)."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.db = root / "server.db"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 180) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No job runner (MLflow's GenAI jobs, 7 more Python processes at every start): ganflow
        # runs no MLflow jobs, and this module starts the server 6 times on 2 cores.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        log = open(self.root / "server.log", "a")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.db}",
                "--default-artifact-root",
                (self.root / "server-artifacts").as_uri(),
            ],
            env=env,
            cwd=self.root,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.time() + timeout_s
        while not _healthy(self.url):
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError((self.root / "server.log").read_text()[-3000:])
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        while _healthy(self.url):  # its workers go with the group
            time.sleep(0.1)


@pytest.fixture(scope="module")
def _module_server(tmp_path_factory, store_templates):
    """One server (one port, one database) for the module: a start took 46-56 s on a busy
    2-core machine, and every test here stops and restarts it anyway. Tests tell their own
    records apart by run id, or count rows from where they started (:func:`_loss_rows`)."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    seed_stores(store_templates, mlflow_db=srv.db)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def server(_module_server):
    """The module's server, up at the start of the test (a failed test may have left it
    down)."""
    if _module_server.proc is None:
        _module_server.start()
    return _module_server


def _new_run(uri: str) -> str:
    exp = tracking.ensure_experiment(uri, "outage")
    return tracking.client(uri).create_run(exp, run_name="outage").info.run_id


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    """The steps of key's history in the order they were logged (their timestamps)."""
    history = tracking.client(uri).get_metric_history(run_id, key)
    return [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def _image_steps(uri: str, run_id: str, key: str) -> set[int]:
    names = [f.path for f in tracking.client(uri).list_artifacts(run_id, "images")]
    return {int(m.group(1)) for n in names if (m := re.search(rf"/{key}\+step\+(\d+)\+", n))}


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


PIXELS = np.arange(48 * 48, dtype=np.uint8).reshape(48, 48)


@pytest.mark.slow  # starts and restarts a real MLflow server
def test_outage_is_buffered_and_sent_in_order_when_the_server_is_back(server):
    uri = server.url
    run_id = _new_run(uri)
    lines: list[str] = []
    logger = tracking.RunLogger(uri, run_id, say=lines.append, probe_s=0)
    for step in range(1, 6):
        logger.log_metrics({"loss_D": float(step)}, step)
    logger.log_image(PIXELS, "samples", 5)

    server.stop()
    slowest = 0.0
    for step in range(6, 11):
        slowest = max(slowest, _timed(logger.log_metrics, {"loss_D": float(step)}, step))
    slowest = max(slowest, _timed(logger.log_image, PIXELS, "samples", 8))
    slowest = max(slowest, _timed(logger.set_tags, {"ganflow.samples": "rows"}, 9))
    assert slowest < QUICK_S, f"a call stalled {slowest:.1f} s with the server down"
    assert logger.spool.pending() == 7
    [down] = [x for x in lines if "unreachable" in x]
    assert f"{uri} unreachable since step 6: buffering to {logger.spool.path}" in down
    assert "training goes on" in down

    server.start()
    for step in range(11, 13):
        logger.log_metrics({"loss_D": float(step)}, step)
    assert [x for x in lines if "back" in x] == [
        f"MLflow server at {uri} back: sent 7 buffered records"
    ]
    assert len(lines) == 2, lines
    tracking.finish_run(uri, run_id, "FINISHED")

    assert _steps(uri, run_id, "loss_D") == list(range(1, 13))
    assert _image_steps(uri, run_id, "samples") == {5, 8}
    run = tracking.client(uri).get_run(run_id)
    assert run.data.tags["ganflow.samples"] == "rows"
    assert run.info.status == "FINISHED"
    assert not logger.spool.path.exists()


@pytest.mark.slow  # starts and restarts a real MLflow server
def test_server_gone_at_the_end_keeps_the_spool_for_the_replay_command(server, capfd, monkeypatch):
    from flows.cli import main

    monkeypatch.setenv(tracking.END_WAIT_ENV, "0")  # no wait at the end: the spool at once
    uri = server.url
    run_id = _new_run(uri)
    logger = tracking.RunLogger(uri, run_id, say=lambda line: None, probe_s=0)
    logger.log_metrics({"loss_D": 1.0}, 1)
    server.stop()
    for step in (2, 3):
        logger.log_metrics({"loss_D": float(step)}, step)
    logger.log_image(PIXELS, "best_samples", 3)

    # The driver's end of the run: another process, so only the spool on disk is shared.
    tracking.run_logger.cache_clear()
    assert _timed(tracking.finish_run, uri, run_id, "FINISHED") < QUICK_S
    spool = tracking.spool_dir(run_id)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"send them with: ganflow tracking replay {spool}" in err[0]
    assert "still unreachable at the end" in err[0]
    assert tracking.Spool(spool).pending() == 4  # 2 metrics, the image, the status

    server.start()
    assert tracking.client(uri).get_run(run_id).info.status == "RUNNING"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["tracking", "replay", str(spool), "--json"]) == 0
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert result == {"run_id": run_id, "sent": 4, "dropped": 0, "status": "FINISHED"}
    assert _steps(uri, run_id, "loss_D") == [1, 2, 3]
    assert _image_steps(uri, run_id, "best_samples") == {3}
    assert tracking.client(uri).get_run(run_id).info.status == "FINISHED"
    assert not spool.exists()


@pytest.mark.slow  # starts and restarts a real MLflow server
def test_the_end_waits_for_a_server_that_comes_back(server, monkeypatch):
    # The server goes away just before the run's end and is back 3 s later: the end waits
    # for it (up to GANFLOW_TRACKING_END_WAIT_S), sends the spool and ends the run itself,
    # so nobody has a replay to run.
    monkeypatch.setenv(tracking.END_WAIT_ENV, "120")
    uri = server.url
    run_id = _new_run(uri)
    lines: list[str] = []
    logger = tracking.RunLogger(uri, run_id, say=lines.append, probe_s=0)
    logger.log_metrics({"loss_D": 1.0}, 1)
    server.stop()
    logger.log_metrics({"loss_D": 2.0}, 2)
    back = threading.Timer(3.0, server.start)
    back.start()
    try:
        logger.end("FINISHED")
    finally:
        back.join()
    assert any("waiting up to 120 s" in x for x in lines), lines
    assert any(" back: sent " in x for x in lines), lines
    assert not any("tracking replay" in x for x in lines), lines
    assert tracking.client(uri).get_run(run_id).info.status == "FINISHED"
    assert _steps(uri, run_id, "loss_D") == [1, 2]
    assert not logger.spool.path.exists()


def test_replay_of_a_missing_spool_is_one_line(tmp_path, capsys):
    from flows.cli import main

    assert main(["tracking", "replay", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a tracking spool" in err and "\n" not in err


def test_spool_bounds_drop_oldest_files_and_newest_metrics_past_the_bound(tmp_path):
    spool = tracking.Spool(tmp_path / "spool", max_records=3, max_file_bytes=2500)
    spool.open("http://user:secret@127.0.0.1:1", "r1")
    assert "secret" not in (spool.path / "spool.json").read_text()
    for _ in range(3):
        d = spool.new_file_dir()
        (d / "image.npy").write_bytes(b"x" * 1000)
        spool.trim_files()
    assert sorted(d.name for d in (spool.path / "files").iterdir()) == ["1", "2"]
    for step in range(4):
        spool.append({"t": "metrics", "step": step, "ts": 0, "m": {"loss": 1.0}})
    spool.append({"t": "end", "status": "FINISHED"})  # never dropped
    assert [r["t"] for _, r in spool.unsent()] == ["metrics"] * 3 + ["end"]
    assert spool.dropped == 1
    # A process killed mid-write leaves a partial line: it is not a record.
    with spool.records_file.open("a") as f:
        f.write('{"t": "metr')
    assert spool.pending() == 4


def test_a_local_store_has_no_spool_and_no_short_http(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run_id = _new_run(uri)
    logger = tracking.RunLogger(uri, run_id)
    assert logger.spool is None

    def no_short_http():
        raise AssertionError("short_http on a local store")

    monkeypatch.setattr(tracking, "short_http", no_short_http)
    logger.log_metrics({"loss_D": 1.0}, 1)
    tracking.finish_run(uri, run_id)
    assert tracking.client(uri).get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "ganflow-home" / tracking.SPOOL_FOLDER).exists()


def test_secrets_stay_out_of_the_lines(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.END_WAIT_ENV, "0.5")  # the end's waiting line too
    lines: list[str] = []
    uri = f"http://admin:hunter2@127.0.0.1:{_free_port()}"
    logger = tracking.RunLogger(uri, "0" * 32, tracking.Spool(tmp_path / "s"), lines.append, 0)
    logger.log_metrics({"loss_D": 1.0}, 1)
    logger.end("FAILED")
    assert len(lines) == 3 and not any("hunter2" in x or "admin" in x for x in lines), lines
    assert "hunter2" not in (tmp_path / "s" / "spool.json").read_text()


# --- a real training run through a server that goes away ------------------------------------


def _loss_rows(db: Path) -> int:
    """Loss metric rows the server has stored (read beside it, as its own SQLite file), all
    runs': a test counts from the figure before its own run starts."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute("SELECT count(*) FROM metrics WHERE key LIKE 'loss%'").fetchone()
            return int(row[0])
    except sqlite3.Error:
        return 0


def _train(tmp_path: Path, classifier_cache: Path, uri: str, steps: int, end_wait: float):
    home = tmp_path / "home"
    seed_judges(home, classifier_cache)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "MLFLOW_", "PREFECT_", "GANFLOW_"))
    }
    env.update(
        GANFLOW_HOME=str(home),
        MLFLOW_TRACKING_URI=uri,
        GANFLOW_TRACKING_PROBE_S="1",
        GANFLOW_TRACKING_END_WAIT_S=str(end_wait),
        RAY_USAGE_STATS_ENABLED="0",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    argv = ["train", "--family", "gan", "--dataset", "builtin:digits", "--json"]
    for kv in (f"train.steps={steps}", "train.log_every=5", "eval.every=1000"):
        argv += ["--set", kv]
    return home, subprocess.Popen(
        [str(BIN / "ganflow"), *argv],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish_beside(proc, fault, join_s: float) -> tuple[str, str]:
    """Run ``fault`` in a thread while the training process finishes; (stdout, stderr),
    the training's exit status checked (0)."""
    chaos = threading.Thread(target=fault)
    chaos.start()
    try:
        out, err = proc.communicate(timeout=540)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        chaos.join(timeout=join_s)
    print(err, file=sys.stderr)  # shown when the test fails
    assert proc.returncode == 0, err[-3000:]
    return out, err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_goes_on_through_a_server_outage(server, tmp_path, classifier_cache):
    steps = 400
    # A 60 s outage: training may end while the server is away; the end waits for it
    # (however slowly it restarts on a busy machine), then every logged step is sent.
    before = _loss_rows(server.db)
    home, proc = _train(tmp_path, classifier_cache, server.url, steps, end_wait=300)
    outage: dict[str, float] = {}

    def take_the_server_away() -> None:
        # A few log points in (training has started), down for a minute, back.
        while _loss_rows(server.db) < before + 6 and proc.poll() is None:
            time.sleep(0.2)
        outage["at_rows"] = _loss_rows(server.db) - before
        server.stop()
        outage["down"] = time.time()
        time.sleep(60)
        server.start()
        outage["up"] = time.time()

    out, err = _finish_beside(proc, take_the_server_away, join_s=240)
    assert "up" in outage, "the server was never taken away"
    run_id = json.loads(out.strip().splitlines()[-1])["run_id"]
    down = [x for x in err.splitlines() if "unreachable since" in x]
    assert len(down) == 1, down
    assert f"MLflow server at {server.url} unreachable since step" in down[0]
    assert len([x for x in err.splitlines() if " back: sent " in x]) == 1
    since = int(re.search(r"since step (\d+)", down[0]).group(1))
    assert since < steps

    c = tracking.client(server.url)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    losses = [k for k in run.data.metrics if k.startswith("loss")]
    assert losses
    for key in losses:
        assert sorted(set(_steps(server.url, run_id, key))) == list(range(5, steps + 1, 5)), key
    # Training did not wait for the server: log points went on while it was down (their
    # records keep the time they were logged). MLflow's own retries would hold the first
    # call that failed until the server was back, with no log point in between.
    history = c.get_metric_history(run_id, losses[0])
    during = {m.step for m in history if outage["down"] < m.timestamp / 1000 < outage["up"]}
    assert len(during) >= 3, (sorted(during), outage)
    assert _image_steps(server.url, run_id, "samples")
    assert not (home / tracking.SPOOL_FOLDER / run_id).exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_that_ends_without_the_server_is_replayed(server, tmp_path, classifier_cache):
    """The server goes away for good near the end: the evaluation, the grids, the loss plot
    and the model wait in the spool; the run ends with one line naming the replay command,
    and the replay (once the server is back) completes the run as it would have been."""
    steps = 200
    before = _loss_rows(server.db)
    home, proc = _train(tmp_path, classifier_cache, server.url, steps, end_wait=0)
    rows = before + 2 * (steps // 5 - 6)  # loss_D and loss_G, 6 log points before the end

    def take_the_server_away() -> None:
        while _loss_rows(server.db) < rows and proc.poll() is None:
            time.sleep(0.1)
        server.stop()

    out, err = _finish_beside(proc, take_the_server_away, join_s=60)
    run_id = json.loads(out.strip().splitlines()[-1])["run_id"]
    spool = home / tracking.SPOOL_FOLDER / run_id
    assert len([x for x in err.splitlines() if "unreachable since step" in x]) == 1
    [end] = [x for x in err.splitlines() if "tracking replay" in x]
    assert end.endswith(f"send them with: ganflow tracking replay {spool}"), end
    records = [r["t"] for _, r in tracking.Spool(spool).unsent()]
    assert {"metrics", "image", "loss_plot", "generator"} <= set(records), records
    assert records[-1] == "end"

    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "GANFLOW_"))}
    env.update(GANFLOW_HOME=str(home), MLFLOW_TRACKING_URI=server.url)
    replay = subprocess.run(
        [str(BIN / "ganflow"), "tracking", "replay", str(spool), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replay.returncode == 0, replay.stderr[-3000:]
    result = json.loads(replay.stdout.strip().splitlines()[-1])
    assert result["status"] == "FINISHED" and result["dropped"] == 0, result
    assert result["sent"] == len(records)
    assert not spool.exists()

    c = tracking.client(server.url)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in [k for k in run.data.metrics if k.startswith("loss")]:
        assert sorted(set(_steps(server.url, run_id, key))) == list(range(5, steps + 1, 5)), key
    assert "eval.fd" in run.data.metrics and "ganflow.best_step" in run.data.tags
    assert "losses.png" in {a.path for a in c.list_artifacts(run_id)}
    assert _image_steps(server.url, run_id, "best_samples")
    import mlflow

    with tracking.fluent_uri(server.url):  # this server stops with the test: not left set
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id], output_format="list"
        )
    [logged] = [m for m in models if m.source_run_id == run_id and m.name == "generator"]
    assert logged.tags["ganflow.best_step"] == run.data.tags["ganflow.best_step"]

"""Faults injected into real work, and what survives them (issue 24).

- Orphaned runs: a `ganflow train` killed with SIGKILL (no cleanup) leaves its MLflow run
  RUNNING; the next command that opens the experiment marks it KILLED, saying why, and
  changes nothing else about it. The rule itself (whose runs are orphans) on a real SQLite
  store, without Ray.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import orphans

pytestmark = pytest.mark.timeout(900)


# --- orphaned runs ---------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _stamp(seconds_ago: float) -> str:
    t = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds_ago)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_only_runs_whose_owner_is_gone_are_marked(tmp_path, monkeypatch, capsys):
    from flows import tracking

    monkeypatch.setenv("GANFLOW_HEARTBEAT_S", "30")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(uri, "faults")
    host = socket.gethostname()
    fresh, old = _stamp(5), _stamp(3600)
    hb, owner = orphans.HEARTBEAT_TAG, orphans.OWNER_TAG
    runs = {
        "dead-here": {hb: fresh, owner: f"{_dead_pid()}@{host}"},
        "alive-here": {hb: fresh, owner: f"{os.getpid()}@{host}"},
        "silent-elsewhere": {hb: old, owner: "123@another-host"},
        "beating-elsewhere": {hb: fresh, owner: "123@another-host"},
        "no-heartbeat": {},
        "finished-dead": {hb: old, owner: f"{_dead_pid()}@{host}"},
    }
    ids = {}
    for name, tags in runs.items():
        ids[name] = c.create_run(exp, run_name=name, tags=tags).info.run_id
        c.log_metric(ids[name], "loss", 1.5, step=7)
        c.log_param(ids[name], "lr", "0.0002")
    c.set_terminated(ids["finished-dead"], "FINISHED")
    before = {n: c.get_run(i) for n, i in ids.items()}

    marked = orphans.reap(uri, [exp])

    assert sorted(marked) == sorted([ids["dead-here"], ids["silent-elsewhere"]])
    status = {n: c.get_run(i).info.status for n, i in ids.items()}
    assert status == {
        "dead-here": "KILLED",
        "alive-here": "RUNNING",
        "silent-elsewhere": "KILLED",
        "beating-elsewhere": "RUNNING",
        "no-heartbeat": "RUNNING",
        "finished-dead": "FINISHED",
    }
    for name, run_id in ids.items():
        after = c.get_run(run_id)
        assert after.data.metrics == before[name].data.metrics
        assert after.data.params == before[name].data.params
        added = set(after.data.tags) - set(before[name].data.tags)
        assert added == ({orphans.REASON_TAG} if run_id in marked else set()), name
    why = c.get_run(ids["dead-here"]).data.tags[orphans.REASON_TAG]
    assert "is gone" in why and f"marked KILLED by {os.getpid()}@{host}" in why
    assert "no heartbeat for 3" in c.get_run(ids["silent-elsewhere"]).data.tags[orphans.REASON_TAG]
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[ganflow]")]
    assert len(err) == 2 and all("was left RUNNING" in ln for ln in err), err
    assert orphans.reap(uri, [exp]) == []  # nothing left to mark


def test_heartbeat_beats_while_the_block_runs(tmp_path):
    from flows import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    run_id = c.create_run(tracking.ensure_experiment(uri, "hb")).info.run_id
    seen = set()
    with orphans.Heartbeat(uri, run_id, every_s=0.2):
        tags = c.get_run(run_id).data.tags
        assert tags[orphans.OWNER_TAG] == f"{os.getpid()}@{socket.gethostname()}"
        deadline = time.monotonic() + 30
        while len(seen) < 3 and time.monotonic() < deadline:
            seen.add(c.get_run(run_id).data.tags[orphans.HEARTBEAT_TAG])
            time.sleep(0.1)
    assert len(seen) >= 3
    last = c.get_run(run_id).data.tags[orphans.HEARTBEAT_TAG]
    time.sleep(0.6)
    assert c.get_run(run_id).data.tags[orphans.HEARTBEAT_TAG] == last  # stopped with the block


def _rows(db: Path, sql: str, *args) -> list:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        return con.execute(sql, args).fetchall()


def _run_state(db: Path, run_id: str) -> dict:
    return {
        "metrics": sorted(
            _rows(db, "select key, value, step from metrics where run_uuid=?", run_id)
        ),
        "params": sorted(_rows(db, "select key, value from params where run_uuid=?", run_id)),
        "tags": dict(_rows(db, "select key, value from tags where run_uuid=?", run_id)),
        "status": _rows(db, "select status from runs where run_uuid=?", run_id)[0][0],
    }


def _descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc; psutil is not a dependency)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        kids = [p for p, pp in parent.items() if pp == here]
        found += kids
        todo += kids
    return found


def _kill(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _ganflow(argv: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.slow  # two `ganflow train` processes with Ray: minutes on 2 loaded cores
def test_killed_training_run_is_marked_by_the_next_command(tmp_path):
    from ray_isolated import RAY_TEST_ENV

    home = tmp_path / "home"
    db = home / "mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GANFLOW_", "MLFLOW_", "RAY_"))}
    env |= RAY_TEST_ENV | {"GANFLOW_HOME": str(home), "GANFLOW_HEARTBEAT_S": "1"}
    victim = _ganflow(
        ["train", "--family", "gan", "--run-name", "victim"]
        + ["--set", "train.steps=1000000", "--set", "train.log_every=5"],
        env,
        start_new_session=True,  # its Ray processes are ours to clean up after
    )
    run_id = None
    beats: set[str] = set()
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and victim.poll() is None:
            time.sleep(1)
            if not db.exists():
                continue
            try:
                found = _rows(db, "select run_uuid from runs where name='victim'")
                if found:
                    run_id = found[0][0]
                    state = _run_state(db, run_id)
                    beats.add(state["tags"].get(orphans.HEARTBEAT_TAG, ""))
                    if len(state["metrics"]) >= 2 and len(beats - {""}) >= 3:
                        break  # mid-run: training logged, the heartbeat moving
            except sqlite3.OperationalError:  # the schema is being created
                continue
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert run_id is not None and len(beats - {""}) >= 3, "training never got going"
    finally:
        family = _descendants(victim.pid)  # its Ray processes: ours to clean up after
        victim.send_signal(signal.SIGKILL)  # kill -9: no handler, no finally, no atexit
        victim.communicate()
        time.sleep(2)  # what the dead driver's workers still do, they do now
        _kill(family)
    time.sleep(1)
    left = _run_state(db, run_id)
    assert left["status"] == "RUNNING"  # what a SIGKILL leaves

    nxt = _ganflow(
        ["train", "--family", "gan", "--run-name", "next", "--set", "train.steps=2"], env
    )
    out, err = nxt.communicate(timeout=600)
    assert nxt.returncode == 0, err[-3000:]
    after = _run_state(db, run_id)
    assert after["status"] == "KILLED"
    reason = after["tags"].pop(orphans.REASON_TAG)
    assert f"its process {victim.pid} on {socket.gethostname()} is gone" in reason
    # Nothing else about the killed run changed: every metric, param and tag as it was.
    assert after == {**left, "status": "KILLED"}
    lines = [ln for ln in err.splitlines() if "was left RUNNING" in ln]
    assert len(lines) == 1 and "MLflow run victim" in lines[0], err[-3000:]
    statuses = dict(_rows(db, "select name, status from runs"))
    assert statuses == {"victim": "KILLED", "next": "FINISHED"}

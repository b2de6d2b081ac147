"""Faults injected into real work, and what survives them (issue 24).

- Orphaned runs: a `ganflow train` killed with SIGKILL (no cleanup) leaves its MLflow run
  RUNNING; the next command that opens the experiment marks it KILLED, saying why, and
  changes nothing else about it. The rule itself (whose runs are orphans) on a real SQLite
  store, without Ray.
- Checkpoints: only committed ones with every file's hash intact are resumed from (a damaged
  latest one under a real Ray resume, where the run goes back to the one before, is
  test_train_ray.py's rerun test, on that module's cluster); a full disk (a 256 KiB tmpfs,
  mounted as root) is one line naming the folder and the space needed, with nothing of the
  checkpoint left, in the upload and in the local write (through `ganflow train`:
  test_bad_input.py, on its cluster); moto's S3 server stopped for 2 s mid-upload is waited
  out by the retries.
- Promotion: a promoter SIGKILLed after each of its registry writes in turn (9 points); the
  next promotion finds the registry as if the decision had not started or had finished.
- Orchestration: the Prefect server SIGKILLed under a running `ganflow train --flow` and
  started again on its database; the flow completes and the server shows it COMPLETED.
(The MLflow server's outages: test_tracking_outage.py.)
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
import threading
import time
from pathlib import Path

import pytest
from home_cache import seed_judges, seed_stores

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
    # Read-write on purpose: a writer killed with -9 mid-transaction leaves a hot journal, and
    # only a connection that may write can roll it back ("attempt to write a readonly
    # database" otherwise). The caller checks the file exists, so nothing creates it here.
    with sqlite3.connect(db, timeout=30) as con:
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
def test_killed_training_run_is_marked_by_the_next_command(
    tmp_path, classifier_cache, store_templates
):
    from ray_isolated import RAY_TEST_ENV

    home = seed_judges(tmp_path / "home", classifier_cache)
    db = home / "mlflow.db"
    seed_stores(store_templates, mlflow_db=db)
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


# --- checkpoints: written, verified, committed; a full disk; storage that comes and goes ------


@pytest.fixture(scope="module")
def gan_state():
    from gan_core.data import load_builtin
    from gan_core.presets import preset
    from gan_core.train import init_state, train

    cfg = preset("gan", "tiny")
    data = load_builtin(cfg.data.dataset, cfg.data.image_size)
    state = init_state(cfg, data, "cpu")
    train(state, data, until=2)
    return state


def _checkpoint(state, folder: Path, world_size: int = 2) -> Path:
    from flows.train.checkpoints import write_checkpoint

    folder.mkdir(parents=True)
    for rank in range(world_size):
        write_checkpoint(state, folder, rank, world_size)
    return folder


def _stored(state, root: Path, step: int, filesystem=None) -> Path:
    """A checkpoint of two ranks uploaded into root/checkpoint-<step> as the workers do."""
    from pyarrow import fs as pafs

    from flows.train.checkpoints import upload_checkpoint, write_checkpoint

    dest = root / f"checkpoint-{step:08d}"
    for rank in range(2):
        src = root.parent / f"src-{step}-{rank}"
        src.mkdir(parents=True)
        write_checkpoint(state, src, rank, 2)
        upload_checkpoint(src, filesystem or pafs.LocalFileSystem(), str(dest))
    return dest


def test_resume_takes_only_complete_checkpoints(gan_state, tmp_path):
    from ray.train import Checkpoint

    from flows.train.checkpoints import complete_checkpoint, incomplete

    run = tmp_path / "run"
    c1, c2, c3 = (_stored(gan_state, run, s) for s in (10, 20, 30))
    assert incomplete(c3) is None
    assert sorted(p.name for p in c3.iterdir()) == [
        "commit-rank-00000.json",
        "commit-rank-00001.json",
        "rank-00000.pt",
        "rank-00001.pt",
        "state.pt",
    ]  # no temporary file left behind
    said: list[str] = []
    latest = Checkpoint(str(c3))
    assert complete_checkpoint(latest, said.append) is latest and not said

    # The latest one damaged after it was committed (a byte flipped, same size): the one before.
    data = bytearray((c3 / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (c3 / "state.pt").write_bytes(bytes(data))
    assert incomplete(c3) == "state.pt does not match the hash recorded when it was written"
    # The one before that lost rank 1's commit (an upload cut short): skipped too.
    (c2 / "commit-rank-00001.json").unlink()
    assert incomplete(c2) == "rank 1 never committed"
    picked = complete_checkpoint(latest, said.append)
    assert Path(picked.path) == c1
    assert said == [
        "checkpoint checkpoint-00000030 is incomplete (state.pt does not match the hash "
        "recorded when it was written); resuming from checkpoint-00000010"
    ]
    (c1 / "rank-00001.pt").write_bytes((c1 / "rank-00001.pt").read_bytes()[:-10])  # truncated
    assert complete_checkpoint(latest, said.append) is None
    assert said[-1].endswith("and no earlier one is complete; starting over")


def test_full_disk_is_one_line_and_leaves_no_half_checkpoint(
    gan_state, small_disk, tmp_path, monkeypatch
):
    from pyarrow import fs as pafs

    import flows.train.checkpoints as ck

    src = _checkpoint(gan_state, tmp_path / "src", world_size=1)
    need = sum(p.stat().st_size for p in src.iterdir())
    assert need > 256 * 2**10  # the tiny GAN's checkpoint (about 300 KiB) outgrows the disk
    dest = small_disk / "run" / "checkpoint-00000002"
    with pytest.raises(ck.CheckpointError) as err:
        ck.upload_checkpoint(src, pafs.LocalFileSystem(), str(dest))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"disk full: a checkpoint needs {need / 2**20:.1f} MiB in {dest} and ")
    assert "MiB is free there" in msg
    assert not list(small_disk.rglob("*")), "written before the space was known to be there"

    # The disk fills while the files are written (the check ahead sees room, another writer
    # takes it): ENOSPC from the write itself, the same one line, and nothing of it is left.
    monkeypatch.setattr(ck, "_free", lambda path: None)
    with pytest.raises(ck.CheckpointError, match=r"^disk full: a checkpoint needs [\d.]+ MiB in "):
        ck.upload_checkpoint(src, pafs.LocalFileSystem(), str(dest))
    assert [p for p in small_disk.rglob("*") if p.is_file()] == []


def test_write_to_a_full_local_disk_is_one_line(gan_state, small_disk):
    from flows.train.checkpoints import CheckpointError, write_checkpoint

    with pytest.raises(CheckpointError, match=r"^disk full: a checkpoint needs [\d.]+ MiB in "):
        write_checkpoint(gan_state, small_disk, 0, 1)


def test_storage_outage_during_a_checkpoint_upload_is_retried(gan_state, tmp_path, monkeypatch):
    """The S3 API (moto's server) stops just before a checkpoint upload and comes back 2 s
    later on the same port: the upload waits it out (flows.storage.with_retries) and the
    checkpoint is complete. A missing bucket is not transient: one line, at once."""
    from moto.server import ThreadedMotoServer

    from flows.train.checkpoints import CheckpointError, incomplete, upload_checkpoint
    from flows.train.spec import StorageSpec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "GANFLOW_STORAGE_RETRIES": "8",  # 0.2 s doubling: up to 51 s in all
    }.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        _, fs = StorageSpec("s3://ckpts/ray", f"http://127.0.0.1:{port}").resolve()
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="ckpts")
        src = _checkpoint(gan_state, tmp_path / "src", world_size=1)
        dest = "ckpts/ray/run/checkpoint-00000002"

        server.stop()  # the outage
        t0 = time.monotonic()
        threading.Timer(2.0, server.start).start()
        upload_checkpoint(src, fs, dest)
        took = time.monotonic() - t0
        assert took >= 2.0, f"uploaded in {took:.1f} s while the server was down?"
        back = tmp_path / "back"
        fs_files = [i for i in fs.get_file_info(pafs_selector(dest)) if i.is_file]
        back.mkdir()
        for info in fs_files:
            with fs.open_input_stream(info.path) as f:
                (back / info.base_name).write_bytes(f.read())
        assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in src.iterdir())
        assert incomplete(back) is None

        t0 = time.monotonic()
        with pytest.raises(CheckpointError) as err:
            upload_checkpoint(src, fs, "no-such-bucket/run/checkpoint-00000002")
        assert "\n" not in str(err.value) and "no-such-bucket" in str(err.value)
        assert time.monotonic() - t0 < 10, "a missing bucket was retried as if transient"
    finally:
        server.stop()


def pafs_selector(path: str):
    from pyarrow import fs as pafs

    return pafs.FileSelector(path)


# --- a promotion killed between its writes ---------------------------------------------------

# Run in a subprocess: promote v2 of model "m" (its figures beat the champion v1's), counting
# the registry writes on "m"; with KILL_AT=k the process SIGKILLs itself right after the k-th.
# Figures are fixed (no networks are loaded); the lock's TTL is 2 s so the next contender
# breaks a dead holder's lock quickly.
_PROMOTER = """
import functools, importlib, json, os, signal, sys
from mlflow import MlflowClient
pm = importlib.import_module("flows.registry.promote")  # the package exports a function so named
from gan_core.presets import preset

uri, version, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
FIGS = {"1": 2.0, "2": 1.0, "3": 3.0}
pm.evaluate_version = lambda c, n, v, *a, **k: (preset("gan", "tiny"), {"fd": FIGS[v]})
pm.promotion_lock = functools.partial(pm.promotion_lock, ttl_s=2.0)
writes = []
for method in ("set_registered_model_tag", "set_registered_model_alias",
               "set_model_version_tag", "delete_registered_model_tag"):
    real = getattr(MlflowClient, method)
    def wrapped(self, name, *args, _real=real, _method=method, **kw):
        out = _real(self, name, *args, **kw)
        if name == "m":
            writes.append([_method, str(args[0])])
            if len(writes) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(MlflowClient, method, wrapped)
pm.promote("m", version, None, None, tracking_uri=uri)
print(json.dumps(writes))
"""


def _registry(path: Path) -> str:
    from flows.registry.models import _client

    uri = f"sqlite:///{path}"
    c = _client(uri)
    c.create_registered_model("m", tags={"ganflow.family": "gan"})
    for _ in range(3):
        c.create_model_version("m", "ganflow:/test", tags={"ganflow.family": "gan"})
    c.set_registered_model_alias("m", "champion", "1")
    return uri


def _registry_state(uri: str) -> dict:
    from flows.registry.models import _client
    from flows.registry.promote import PENDING_TAG

    c = _client(uri)
    model = c.get_registered_model("m")
    lock_entries = c.search_model_versions("name = 'm.promotion-lock'")
    return {
        "aliases": {k: str(v) for k, v in model.aliases.items()},
        "history": model.tags.get("ganflow.champion_history"),
        "pending": model.tags.get(PENDING_TAG),
        "decisions": {
            v: c.get_model_version("m", v).tags.get("promotion.decision") for v in ("2", "3")
        },
        "locks": len(lock_entries),
    }


@pytest.mark.slow  # a dozen subprocesses importing MLflow and torch: minutes on 2 cores
def test_promotion_killed_at_each_write_leaves_the_registry_consistent(tmp_path, monkeypatch):
    """Promote v2 (better than champion v1) in a process killed after each of its registry
    writes in turn; then the next promotion (v3, worse) runs. Whatever the point, the
    registry ends as if v2's promotion had either never started or fully finished, never in
    between: the alias, the champion history and the decision tags agree, and no decision is
    left pending."""
    import functools
    import importlib
    import json

    from gan_core.presets import preset

    pm = importlib.import_module("flows.registry.promote")

    figs = {"1": 2.0, "2": 1.0, "3": 3.0}
    monkeypatch.setattr(
        pm, "evaluate_version", lambda c, n, v, *a, **k: (preset("gan", "tiny"), {"fd": figs[v]})
    )
    monkeypatch.setattr(pm, "promotion_lock", functools.partial(pm.promotion_lock, ttl_s=2.0))

    def promoter(uri: str, version: str, kill_at: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _PROMOTER, uri, version, str(kill_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # The reference outcomes: v2 promoted then v3 judged, or v3 judged alone.
    finished = _registry(tmp_path / "finished.db")
    pm.promote("m", "2", None, None, tracking_uri=finished)
    pm.promote("m", "3", None, None, tracking_uri=finished)
    never = _registry(tmp_path / "never.db")
    pm.promote("m", "3", None, None, tracking_uri=never)
    outcomes = {"finished": _registry_state(finished), "never": _registry_state(never)}
    assert outcomes["finished"]["aliases"] == {"champion": "2", "challenger": "3"}
    assert outcomes["never"]["aliases"] == {"champion": "1", "challenger": "3"}

    dry = promoter(_registry(tmp_path / "dry.db"), "2", 0)
    out, err = dry.communicate(timeout=600)
    assert dry.returncode == 0, err[-3000:]
    writes = json.loads(out.strip().splitlines()[-1])
    recorded = writes.index(["set_registered_model_tag", pm.PENDING_TAG]) + 1
    assert writes[-1] == ["delete_registered_model_tag", pm.PENDING_TAG]

    uris = {k: _registry(tmp_path / f"killed-{k}.db") for k in range(1, len(writes) + 1)}
    procs = {k: promoter(uri, "2", k) for k, uri in uris.items()}
    for k, proc in procs.items():
        proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, (k, proc.returncode)
    for k, uri in uris.items():
        left = _registry_state(uri)
        assert left["locks"] == 1  # the dead promoter's lock entry, broken by the next one
        pm.promote("m", "3", None, None, tracking_uri=uri)
        got = _registry_state(uri)
        want = outcomes["finished" if k >= recorded else "never"]
        assert got == want, (k, writes[k - 1], got)
    print(
        f"killed after each of {len(writes)} writes; the decision is recorded at write {recorded}"
    )


# --- the Prefect server restarted under a running flow ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_api(url: str, path: str, body: dict | None = None):
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{url}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


class PrefectServer:
    """`prefect server start` on loopback with its database in ``home``: stopped with
    SIGKILL (its whole process group) and started again on the same port and database."""

    def __init__(self, home: Path):
        self.home, self.port = home, _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env |= {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
        }
        self.proc: subprocess.Popen | None = None

    def healthy(self) -> bool:
        try:
            return _prefect_api(self.url, "/health") is True
        except OSError:
            return False

    def start(self, timeout_s: float = 240) -> None:
        prefect = Path(sys.executable).parent / "prefect"
        argv = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            assert self.proc.poll() is None, "the Prefect server exited"
            assert time.monotonic() < deadline, "the Prefect server did not come up"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def flow_runs(self) -> list[dict]:
        return _prefect_api(self.url, "/flow_runs/filter", {"limit": 50})


@pytest.mark.slow
def test_prefect_server_restart_mid_flow_is_waited_out(tmp_path, classifier_cache, store_templates):
    # `ganflow train --flow` reports to a Prefect server, which is killed (SIGKILL) while the
    # flow runs and started again on the same database a few seconds later: the training
    # goes on, the flow's state calls wait for the server (Prefect's client retries a lost
    # connection with backoff, about a minute in all), the command exits 0 and the server
    # shows the flow run COMPLETED, with the MLflow run FINISHED.
    from ray_isolated import RAY_TEST_ENV

    seed_stores(store_templates, prefect_home=tmp_path / "prefect")
    server = PrefectServer(tmp_path / "prefect")
    server.start()
    home = seed_judges(tmp_path / "home", classifier_cache)
    seed_stores(store_templates, mlflow_db=home / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GANFLOW_", "MLFLOW_", "RAY_"))}
    env |= {k: v for k, v in server.env.items() if k.startswith("PREFECT_")}
    env |= RAY_TEST_ENV | {"GANFLOW_HOME": str(home)}
    job = _ganflow(
        ["train", "--flow", "--family", "gan", "--run-name", "through-restart", "--json"]
        # The outage comes before training starts (7 s after the flow runs, Ray still
        # starting); 1,500 steps (~15 s) keep the job going well past the restart, and a job
        # that ends during an outage waits for the server anyway (the client's retries).
        + ["--set", "train.steps=1500", "--set", "train.log_every=50"],
        env,
        start_new_session=True,
    )
    restarted = False
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and job.poll() is None:
            runs = server.flow_runs()
            if runs and runs[0]["state_type"] == "RUNNING":
                break
            time.sleep(0.5)
        assert job.poll() is None, job.communicate()[1][-3000:]
        time.sleep(3)  # well inside the flow: Ray's job has started
        server.stop()
        time.sleep(4)
        alive_through_outage = job.poll() is None
        server.start()
        restarted = True
        out, err = job.communicate(timeout=600)
    finally:
        family = _descendants(job.pid)
        if job.poll() is None:
            job.kill()
            job.communicate()
        _kill(family)
        if not restarted:
            server.stop()
    try:
        assert restarted and job.returncode == 0, err[-3000:]
        assert alive_through_outage, "the flow ended before the server went away: not tested"
        import json

        result = json.loads(out.strip().splitlines()[-1])
        [run] = server.flow_runs()
        assert run["state_type"] == "COMPLETED", run["state_type"]
        assert run["flow_id"] and run["name"]
        statuses = dict(_rows(home / "mlflow.db", "select name, status from runs"))
        assert statuses == {"through-restart": "FINISHED"}, statuses
        assert result["run_id"]
    finally:
        server.stop()

"""Ingest on a Ray cluster (flows.ingest.cluster) against the local ingest of the same files:
a simulated 2-node cluster (ray.cluster_utils.Cluster, 1 CPU per node) reached through
RAY_ADDRESS, a local folder and the moto S3 server. Same snapshot id, byte-identical shards,
the same manifest but for its time; quarantine, the bad-share limit and lost workers."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from ingest_data import png, upload, write
from own_data import labelled
from ray_isolated import isolated_cluster, use_test_env

import flows.ingest.cluster as cluster
import flows.ingest.runner as runner
from flows.ingest.layouts import IngestError
from flows.ingest.runner import ingest
from flows.ingest.stages import IngestOptions
from flows.snapshots import resolve_snapshot

pytest_plugins = ["s3_server"]  # the moto server fixtures: moto_endpoint, s3
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def two_nodes():
    pytest.importorskip("ray")
    from s3_server import ACCESS_KEY, SECRET_KEY

    with pytest.MonkeyPatch.context() as mp:
        use_test_env(mp)
        # Credentials live in each node's own environment (they never travel with tasks):
        # the nodes are started with the keys the s3 fixture sets later for the driver.
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        with isolated_cluster([1, 1], connect=False) as c:
            mp.setenv("RAY_ADDRESS", c.address)  # auto: every ingest here goes to the cluster
            yield c


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Three classes of odd-sized RGB PNGs (crop and resize at work), one grayscale PNG."""
    root = labelled(tmp_path_factory.mktemp("raw"), per_class=20, size=(37, 29))
    (root / "circle" / "gray.png").write_bytes(png(np.full((30, 30), 77, dtype=np.uint8)))
    return root


@pytest.fixture
def spy(monkeypatch):
    """Which path ran: the stages the runner called on the cluster."""
    calls = []
    for name in ("fetch_on_cluster", "decode_on_cluster"):
        real = getattr(runner, name)

        def wrapped(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(runner, name, wrapped)
    return calls


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server for the module (about 10 s to start)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.delenv("PREFECT_API_URL", raising=False)
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=60):
            yield


def _files(root: Path, sid: str) -> dict[str, bytes]:
    folder = root / sid
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _same_snapshot(a_root: Path, b_root: Path, sid: str) -> None:
    a, b = _files(a_root, sid), _files(b_root, sid)
    assert sorted(a) == sorted(b) and len(a) > 1  # the manifest and shards
    for n in a:
        if n == "manifest.json":
            ma, mb = json.loads(a[n]), json.loads(b[n])
            ma.pop("created"), mb.pop("created")
            assert ma == mb
        else:
            assert a[n] == b[n], f"{n} differs"


def _nothing_written(root: Path) -> None:
    """No manifest, no shard, no .tmp file, no ref: not a file under the root."""
    left = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert left == []


def _decode_nodes() -> set[str]:
    """The nodes the decode tasks ran on (task events reach the state API within seconds)."""
    from ray.util.state import list_tasks

    nodes: set[str] = set()
    for _ in range(50):
        tasks = list_tasks(
            filters=[("name", "=", "ganflow-ingest-decode")], raise_on_missing_output=False
        )
        nodes = {t.node_id for t in tasks if t.node_id}
        if len(nodes) == 2:
            break
        time.sleep(0.2)
    return nodes


def test_cli_through_the_prefect_flow_on_the_cluster(
    two_nodes, prefect_server, source, tmp_path, spy, capsys
):
    """First in Ray terms here: the flow's task connects this process to the cluster."""
    from flows.cli import main

    root = str(tmp_path / "store")
    assert main(["ingest", str(source), "--root", root, "--cluster", "yes", "--json"]) == 0
    assert spy == ["fetch_on_cluster", "decode_on_cluster"]
    on = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    args = ["ingest", str(source), "--root", str(tmp_path / "local"), "--json", "--quiet"]
    assert main([*args, "--cluster", "no", "--no-prefect"]) == 0
    assert spy == ["fetch_on_cluster", "decode_on_cluster"]  # no: the local stages ran
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert on["id"] == local["id"] and not on["reused"]
    _same_snapshot(tmp_path / "local", tmp_path / "store", on["id"])


def test_local_folder_on_two_nodes_equals_local_ingest(
    two_nodes, source, tmp_path, spy, monkeypatch
):
    import ray

    import flows.snapshots.store as store_mod

    # Several shards per split: written by several tasks, each from the chunks it needs.
    monkeypatch.setattr(store_mod, "SHARD_BYTES", 20000)
    local = ingest(str(source), root=str(tmp_path / "local"), cluster="no")
    assert spy == []
    seen = []
    on = ingest(
        str(source),
        root=str(tmp_path / "cluster"),
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    assert spy == ["fetch_on_cluster", "decode_on_cluster"]
    assert on.id == local.id and on.num_images == local.num_images == 61
    _same_snapshot(tmp_path / "local", tmp_path / "cluster", on.id)
    assert ("decode", 61, 61) in seen and ("read", 61, 61) in seen
    assert len([s for s in seen if s[0] == "decode"]) > 1  # reported as tasks finish
    manifest = resolve_snapshot(on.id, str(tmp_path / "local"))
    shards = len({(s.split, s.part, s.shard) for s in manifest.shards})
    assert shards > 3 and seen[-1] == ("write", shards, shards)  # one write task per shard
    assert len(ray.nodes()) == 2 and len(_decode_nodes()) == 2


def test_s3_source_read_by_workers_equals_local_ingest(two_nodes, source, s3, tmp_path, spy):
    upload(source, s3.fs(), f"{s3.bucket}/raw")
    local = ingest(s3.url("raw"), root=str(tmp_path / "local"), cluster="no")
    on = ingest(s3.url("raw"), root=str(tmp_path / "cluster"))
    assert spy == ["fetch_on_cluster", "decode_on_cluster"]
    assert on.id == local.id
    _same_snapshot(tmp_path / "local", tmp_path / "cluster", on.id)
    assert not list((Path(os.environ["GANFLOW_HOME"]) / "tmp").glob("ingest-*/*"))


def test_quarantine_and_bad_share_limit_on_the_cluster(two_nodes, tmp_path, spy):
    rng = np.random.default_rng(0)
    files = {
        f"{c}/{i:02d}.png": png(rng.integers(0, 256, (12, 12, 3), dtype="uint8"))
        for c in "ab"
        for i in range(12)
    }
    files["b/broken.png"] = files["b/00.png"][:40]
    raw = write(tmp_path / "raw", files)
    local = ingest(str(raw), root=str(tmp_path / "local"), cluster="no")
    on = ingest(str(raw), root=str(tmp_path / "cluster"))
    assert spy == ["fetch_on_cluster", "decode_on_cluster"]
    assert on.id == local.id and on.quarantined == local.quarantined
    assert [q.path for q in on.quarantined] == ["b/broken.png"]
    with pytest.raises(IngestError) as exc:
        ingest(str(raw), root=str(tmp_path / "strict"), options=IngestOptions(max_bad_fraction=0))
    assert "1 of 25 files" in str(exc.value) and "\n" not in str(exc.value)
    _nothing_written(tmp_path / "strict")


def test_lost_worker_retried_or_nothing_written(two_nodes, source, tmp_path, monkeypatch, spy):
    monkeypatch.setattr(cluster, "MAX_RETRIES", 1)
    monkeypatch.setenv(cluster._FAULT_VAR, f"decode:99:{tmp_path / 'deaths-a'}")
    with pytest.raises(IngestError) as exc:
        ingest(str(source), root=str(tmp_path / "lost"))
    msg = str(exc.value)
    assert "ingest decode on the Ray cluster failed" in msg and "nothing was written" in msg
    assert "\n" not in msg
    _nothing_written(tmp_path / "lost")
    # One death, then the retry succeeds: the snapshot is the local one.
    monkeypatch.setenv(cluster._FAULT_VAR, f"decode:1:{tmp_path / 'deaths-b'}")
    on = ingest(str(source), root=str(tmp_path / "retried"))
    # At least one worker died (tasks starting together may each see no death recorded
    # yet and die too: each is a different task, retried once).
    assert len((tmp_path / "deaths-b").read_bytes()) >= 1
    local = ingest(str(source), root=str(tmp_path / "local"), cluster="no")
    assert on.id == local.id
    _same_snapshot(tmp_path / "local", tmp_path / "retried", on.id)


def test_lost_writer_or_cut_write_leaves_no_partial_snapshot(
    two_nodes, source, tmp_path, monkeypatch
):
    """Shards are written by the workers: a writer lost for good, or a failure after every
    shard is written but before the manifest (Ctrl-C here), leaves no file behind."""
    import flows.snapshots.store as store_mod

    monkeypatch.setattr(store_mod, "SHARD_BYTES", 20000)
    monkeypatch.setattr(cluster, "MAX_RETRIES", 0)
    monkeypatch.setenv(cluster._FAULT_VAR, f"write:1:{tmp_path / 'deaths'}")
    with pytest.raises(IngestError, match="ingest write on the Ray cluster failed for shard"):
        ingest(str(source), root=str(tmp_path / "lost"))
    _nothing_written(tmp_path / "lost")
    monkeypatch.delenv(cluster._FAULT_VAR)

    def interrupted(self, manifest, shards):
        assert len(shards) > 3 and all(
            (tmp_path / "cut" / manifest.id / s.file).exists() for s in shards
        )
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.Store, "finish_snapshot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest(str(source), root=str(tmp_path / "cut"))
    _nothing_written(tmp_path / "cut")


def test_decode_task_rereads_and_checks_the_hash(s3, tmp_path):
    """What a decode task does with files changed or removed since the fetch (no Ray needed:
    the task's function, called here): quarantined with the local path's reasons."""
    from flows.ingest.layouts import SourceFile

    good, other = (png(np.full((9, 9), v, dtype=np.uint8)) for v in (10, 200))
    fs = s3.fs()
    for name in ("same", "changed", "gone"):
        fs.pipe_file(f"{s3.bucket}/{name}.png", good)
    sha = hashlib.sha256(good).hexdigest()
    files = [
        cluster.RemoteSourceFile(f"{n}.png", sha, len(good), s3.url(f"{n}.png"), (1, 9, 9))
        for n in ("same", "changed", "gone")
    ]
    (tmp_path / "local.png").write_bytes(other)
    files.append(SourceFile("local.png", sha, len(good), str(tmp_path / "local.png")))
    fs.pipe_file(f"{s3.bucket}/changed.png", other)
    fs.rm(f"{s3.bucket}/gone.png")
    out = cluster._decode_task(files, 8, "crop")
    assert out[0].images[0].shape == (8, 8, 1)
    assert out[1:] == [
        "changed.png: changed while being ingested",
        "gone.png: unreadable (removed while being ingested)",
        "local.png: changed while being ingested",
    ]
    assert files[0].read() == good  # RemoteSourceFile.read: the same check, one file

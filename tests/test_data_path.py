"""The data path at scale: 8-bit snapshots, rows read by index, minibatches streamed with a
read ahead that keeps Algorithm 1's stream and exact resume, and the node's shard cache
(one verified copy per node, whatever the number of workers starting at once)."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from ingest_data import noise, png, write

import flows.snapshots.store as store_mod
from flows.ingest import ensure_snapshot, ingest
from flows.ingest.stages import IngestOptions
from flows.snapshots import SnapshotOutdated, resolve_snapshot
from flows.snapshots.cache import snapshot_cache
from flows.snapshots.load import load_dataset, open_dataset
from gan_core.data import StoredRows, in_memory, spread, to_uint8, to_unit
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import Feeder, init_state, load_state_dict, plain, state_dict, train

pytest_plugins = ["s3_server"]

ALL_TRAIN = {"test_fraction": 0.0, "val_fraction": 0.0}


def test_to_uint8_inverts_to_unit_for_every_byte():
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_unit(every)), every)


def test_uint8_round_trip_is_exact_for_8_bit_sources(tmp_path):
    """PNGs at the stored size come back byte for byte (RGB and grayscale); the snapshot
    stores uint8, a quarter of float32's bytes."""
    rgb = [noise(16, 16, seed=i) for i in range(6)]
    gray = [noise(16, 16, seed=50 + i, channels=1) for i in range(6)]
    root = str(tmp_path / "store")
    for arrays, channels in ((rgb, 3), (gray, 1)):
        src = write(tmp_path / f"raw{channels}", {f"{i}.png": png(a) for i, a in enumerate(arrays)})
        r = ingest(str(src), root=root, options=IngestOptions(**ALL_TRAIN))
        m = resolve_snapshot(r.id, root)
        assert m.pixels == "uint8" and m.channels == channels
        assert {s.dtype for s in m.shards if s.array == "images"} == {"|u1"}
        rows = open_dataset(r.id, "train", root).images
        assert isinstance(rows, StoredRows) and rows.dtype == torch.uint8
        got = rows[:].numpy()  # [n, C, H, W], in path order 0..5
        want = np.stack([a if a.ndim == 3 else a[..., None] for a in arrays]).transpose(0, 3, 1, 2)
        assert np.array_equal(got, want)
        images_bytes = sum(s.bytes for s in m.shards if s.array == "images")
        assert images_bytes < 6 * channels * 16 * 16 * 4 / 3  # well under float32's size


def test_float_sources_stay_float(tmp_path):
    x = np.random.default_rng(0).random((8, 12, 12, 3), dtype=np.float32)  # in [0, 1]
    buf = io.BytesIO()
    np.savez(buf, images=x)
    src = write(tmp_path / "raw", {"a.npz": buf.getvalue()})
    root = str(tmp_path / "store")
    r = ingest(str(src / "a.npz"), root=root, options=IngestOptions(**ALL_TRAIN))
    assert resolve_snapshot(r.id, root).pixels == "float32"
    got = load_dataset(r.id, "train", root).images
    np.testing.assert_allclose(got.numpy(), x.transpose(0, 3, 1, 2) * 2 - 1, atol=1e-6)


def test_stored_rows_read_any_rows_across_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "SHARD_BYTES", 3000)  # several shards per split
    root = str(tmp_path / "store")
    sid = ensure_snapshot("builtin:digits", root, image_size=16).id
    manifest = resolve_snapshot(sid, root)
    assert len([s for s in manifest.shards if s.split == "train"]) > 10
    data = open_dataset(sid, "train", root)
    whole = data.images[:]
    idx = torch.tensor([len(data) - 1, 0, 5, 5, 37, 11, 300, len(data) // 2])
    assert torch.equal(data.images.take(idx), whole[idx])
    assert torch.equal(pickle.loads(pickle.dumps(data.images))[idx], whole[idx])
    with pytest.raises(IndexError, match="out of range"):
        data.images.take([len(data)])
    # Bounded in-memory subsets: evenly spaced, every class present.
    sub = in_memory(data, 50)
    assert len(sub) == 50 and sub.images.dtype == torch.float32
    assert torch.equal(sub.images, to_unit(whole[spread(len(data), 50)]))
    assert set(sub.labels.tolist()) == set(range(10))


def _cfg(family: str, steps: int, log_every: int, **extra):
    sets = {"train.steps": steps, "train.log_every": log_every, "train.d_steps": 2, **extra}
    if family == "cyclegan":
        sets.update({"train.pool_size": 4, "data.augment": "jitter_flip"})
    else:
        sets["data.augment"] = "flip"
    return apply_overrides(preset(family, "tiny"), sets)


def _weights(state) -> list[torch.Tensor]:
    return [p.detach().clone() for m in state.models.values() for p in plain(m).parameters()]


@pytest.mark.parametrize("family", ["cgan", "cyclegan"])
def test_streamed_minibatches_equal_in_memory_training(family, tmp_path):
    """Rows read by index with a read ahead give the same losses and weights, bit for bit,
    as the same pixels held in memory: the read ahead draws in the samplers' own order."""
    root = str(tmp_path / "store")
    cfg = _cfg(family, 6, 2)
    sid = ensure_snapshot(cfg.data.dataset, root, image_size=cfg.data.image_size).id
    stored = open_dataset(sid, "train", root)
    memory = in_memory(stored)
    logs = {}
    weights = {}
    for name, data in (("stored", stored), ("memory", memory)):
        state = init_state(cfg, data, "cpu")
        log = []
        train(state, data, callbacks=[lambda s, m, log=log: log.append(m)])
        logs[name] = [{k: v for k, v in m.items() if k != "data_wait_s"} for m in log]
        weights[name] = _weights(state)
    assert logs["stored"] == logs["memory"]
    assert all(torch.equal(a, b) for a, b in zip(weights["stored"], weights["memory"]))


def test_checkpoint_at_a_log_point_resumes_exactly_while_reading_ahead(tmp_path):
    """A checkpoint taken by a callback mid-run (as Ray workers do) holds the samplers as of
    the minibatches consumed, not the one read ahead: resuming reproduces the full run."""
    root = str(tmp_path / "store")
    cfg = _cfg("cyclegan", 8, 2)
    sid = ensure_snapshot(cfg.data.dataset, root, image_size=cfg.data.image_size).id
    data = open_dataset(sid, "train", root)
    saved = {}

    def keep(state, metrics):
        if state.step == 4:
            saved["sd"] = pickle.loads(pickle.dumps(state_dict(state)))

    full = init_state(cfg, data, "cpu")
    train(full, data, callbacks=[keep])
    resumed = load_state_dict(init_state(cfg, data, "cpu"), saved["sd"])
    assert resumed.step == 4
    train(resumed, data)
    assert all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(resumed)))


def test_feeder_reads_ahead_only_where_asked(tmp_path):
    root = str(tmp_path / "store")
    cfg = _cfg("gan", 2, 1)
    sid = ensure_snapshot(cfg.data.dataset, root, image_size=cfg.data.image_size).id
    data = open_dataset(sid, "train", root)
    state = init_state(cfg, data, "cpu")
    feeder = Feeder(state, data)
    batch = feeder.next(ahead=True)
    assert batch.x.dtype == torch.float32 and batch.x.abs().max() <= 1.0
    assert feeder._pending is not None  # the next minibatch is being read
    feeder.next(ahead=False)
    assert feeder._pending is None
    feeder.close()


def test_old_format_is_refused_with_the_reingest_command(tmp_path):
    root = tmp_path / "store"
    sid = ensure_snapshot("builtin:digits", str(root)).id
    path = root / sid / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 2}))
    with pytest.raises(SnapshotOutdated, match="format 2.*re-ingest its source: ganflow ingest"):
        open_dataset(sid, "train", str(root))


def _open_in_child(root: str, sid: str, home: str, log: str, env: dict, go) -> None:
    os.environ.update(env)
    os.environ["GANFLOW_HOME"] = home
    import flows.snapshots.cache as cache

    real = cache._download

    def counted(store, manifest, entry, dest):
        with open(log, "a") as f:
            f.write(entry.file + "\n")
        real(store, manifest, entry, dest)

    cache._download = counted
    go.wait()
    data = open_dataset(sid, "train", root)
    assert len(data) > 0
    with open(log, "a") as f:
        f.write("opened " + os.path.dirname(data.images.paths[0]) + "\n")


@pytest.mark.slow
def test_two_workers_on_a_node_share_one_verified_copy_of_a_remote_snapshot(
    s3, tmp_path, monkeypatch
):
    """Two processes opening an S3 snapshot at once: every shard is downloaded once, into one
    content-addressed folder both read from, with no temporary file left; a shard altered in
    the cache's source is caught by its hash."""
    root = s3.url("snapshots")
    sid = ensure_snapshot("builtin:digits", root).id
    home = str(tmp_path / "node-home")
    log = str(tmp_path / "downloads.log")
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "GANFLOW_S3"))}
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [
        ctx.Process(target=_open_in_child, args=(root, sid, home, log, env, go)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lines = Path(log).read_text().split("\n")
    downloads = [line for line in lines if line and not line.startswith("opened")]
    train_files = {s.file for s in resolve_snapshot(sid, root).shards if s.split == "train"}
    assert sorted(downloads) == sorted(train_files)  # each once, not once per worker
    folders = {line.split(" ", 1)[1] for line in lines if line.startswith("opened")}
    monkeypatch.setenv("GANFLOW_HOME", home)
    assert folders == {str(snapshot_cache(sid))}
    assert not [f for f in os.listdir(snapshot_cache(sid)) if ".tmp-" in f]


def test_a_corrupt_remote_shard_is_never_cached(s3, tmp_path):
    root = s3.url("snapshots")
    sid = ensure_snapshot("builtin:digits", root).id
    manifest = resolve_snapshot(sid, root)
    shard = next(s.file for s in manifest.shards if s.split == "test")
    fs = s3.fs()
    path = f"{s3.bucket}/snapshots/{sid}/{shard}"
    fs.pipe_file(path, fs.cat_file(path)[:-5] + b"XXXXX")
    with pytest.raises(ValueError, match=f"shard {shard} is missing or does not match"):
        open_dataset(sid, "test", root)
    assert not (snapshot_cache(sid) / shard).exists()
    assert not [f for f in os.listdir(snapshot_cache(sid)) if ".tmp-" in f]


@pytest.mark.slow
def test_memory_benchmark_prints_its_table(capsys):
    from flows.bench.data import main

    assert main(["memory", "--sizes", "200,800", "--image-size", "16", "--steps", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[1].split()[:3] == ["images", "mode", "split"]
    rows = json.loads(out[-1])["memory"]
    assert [(r["mode"], r["n"]) for r in rows] == [
        ("before", 180),
        ("after", 180),
        ("before", 720),
        ("after", 720),
    ]
    assert all(r["VmHWM"] > 0 and r["RssAnon"] > 0 for r in rows)


def test_a_file_removed_between_listing_and_reading_is_one_line(tmp_path, monkeypatch):
    import flows.ingest.runner as runner
    from flows.ingest.layouts import IngestError

    src = write(tmp_path / "raw", {f"{i}.png": png(noise(8, 8, seed=i)) for i in range(4)})
    real = runner.scan_source

    def scan_then_remove(url, options):
        scan = real(url, options)
        (src / "2.png").unlink()
        return scan

    monkeypatch.setattr(runner, "scan_source", scan_then_remove)
    store = tmp_path / "store"
    with pytest.raises(IngestError, match=r"^2.png: removed from .* while being ingested"):
        ingest(str(src), root=str(store))
    assert not store.exists() or not any(store.iterdir())

"""Checkpoints: weights-only, and a resumed run is the uninterrupted run."""

from __future__ import annotations

import pickle

import pytest
import torch

from gan_core.data import load_builtin
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import init_state, load_checkpoint, read_checkpoint, save_checkpoint, train


def _run(cfg, data, state, until=None):
    log = []
    train(state, data, callbacks=[lambda s, m: log.append((s.step, m))], until=until)
    return log


@pytest.mark.parametrize("family", ["gan", "cgan", "cyclegan"])
def test_resume_continues_exactly(family, tmp_path):
    # Small pool so CycleGAN's pool is full and swapping by the halfway point.
    cfg = apply_overrides(
        preset(family, "tiny"),
        {"train.steps": 12, "train.log_every": 1, "train.pool_size": 10, "train.d_steps": 2},
    )
    data = load_builtin(cfg.data.dataset, cfg.data.image_size)

    full = _run(cfg, data, init_state(cfg, data, "cpu"))

    first = init_state(cfg, data, "cpu")
    head = _run(cfg, data, first, until=6)
    path = save_checkpoint(first, tmp_path / "ckpt.pt")
    del first
    resumed = load_checkpoint(path, data, "cpu")
    assert resumed.step == 6
    tail = _run(cfg, data, resumed)

    assert [s for s, _ in head + tail] == list(range(1, 13))
    for (s1, m1), (s2, m2) in zip(full, head + tail):
        assert s1 == s2
        assert m1 == m2, f"step {s1}: {m1} != {m2}"  # bit-identical losses after the resume


def test_checkpoint_holds_no_pickled_objects(tmp_path):
    cfg = preset("cyclegan", "tiny")
    data = load_builtin(cfg.data.dataset, cfg.data.image_size)
    state = init_state(cfg, data, "cpu")
    train(state, data, until=3)
    path = save_checkpoint(state, tmp_path / "c.pt")
    sd = read_checkpoint(path)  # weights_only=True
    assert sd["step"] == 3 and sd["config"]["family"] == "cyclegan"
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_a_pickle_payload_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"step": 1, "payload": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(path)


# --- the staging folders Ray's report copies from (flows.train.checkpoints) -----------------


def test_staging_folders_of_killed_processes_are_swept(tmp_path, monkeypatch):
    """Ray kills a worker inside report, so its staging folder's clean-up never runs: the next
    staging folder on the host removes those of gone processes, and nothing of a live process,
    of another host (a shared /tmp) or, for unnamed ones from before, younger than a day."""
    import os
    import subprocess
    import sys
    import tempfile
    import threading
    import time

    from flows.train import checkpoints

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal\n"
            "from flows.train.checkpoints import staging_folder\n"
            "with staging_folder() as d:\n"
            "    (d / 'rank-00001.pt').write_bytes(b'0' * 4096)\n"
            "    print(d, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n",
        ],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    left = tmp_path / killed.stdout.strip().rsplit("/", 1)[-1]
    assert left.is_dir() and (left / "rank-00001.pt").exists()  # what Ray's kill leaves

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = checkpoints._host()
        busy = threading.Event()
        other = threading.Thread(target=busy.wait)  # another thread of this process
        other.start()
        kept = [
            tmp_path / f"ganflow-ckpt-{live.pid}@{host}-live0001",
            tmp_path / f"ganflow-ckpt-{os.getpid()}.{other.ident}@{host}-thread01",
            tmp_path / "ganflow-ckpt-999999999@other.host-shared01",
            tmp_path / "ganflow-ckpt-young001",
        ]
        old = tmp_path / "ganflow-ckpt-old00001"
        for folder in [*kept, old]:
            folder.mkdir()
        two_days_ago = time.time() - 2 * 86400
        os.utime(old, (two_days_ago, two_days_ago))

        mine = tmp_path / f"ganflow-ckpt-{os.getpid()}.{threading.get_ident()}@{host}-mine0001"
        mine.mkdir()  # this thread's own from a report it never returned from
        with checkpoints.staging_folder() as fresh:
            assert fresh.parent == tmp_path and fresh.is_dir()
            assert not left.exists() and not old.exists() and not mine.exists()
            assert all(folder.is_dir() for folder in kept)
        assert not fresh.exists()
    finally:
        live.kill()
        live.wait()
        busy.set()
        other.join()
    assert checkpoints.sweep_staging(tmp_path) == 2  # the other process's and thread's, gone

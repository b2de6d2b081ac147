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

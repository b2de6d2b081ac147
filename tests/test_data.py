"""Built-in data: shipped, split, and with a known ground-truth mapping for CycleGAN."""

from __future__ import annotations

import pytest
import torch

from gan_core.data import (
    MinibatchSampler,
    appearance_transform,
    load_builtin,
    load_digits,
    load_digits_unpaired,
)


def test_digits_split_is_stratified_and_disjoint():
    train, test = load_digits(16, "train"), load_digits(16, "test")
    assert len(train) + len(test) == 1797
    assert 0.18 < len(test) / 1797 < 0.22
    assert train.images.shape[1:] == (1, 16, 16)
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert torch.bincount(test.labels, minlength=10).min() >= 30
    # No held-out image appears in training.
    tr = {tuple(r) for r in train.images.flatten(1).tolist()}
    assert not any(tuple(r) in tr for r in test.images.flatten(1).tolist())


def test_unpaired_halves_and_ground_truth():
    u = load_digits_unpaired(16, "train")
    assert abs(len(u.x) - len(u.y)) <= 1
    torch.testing.assert_close(u.x_truth, appearance_transform(u.x.images))
    # Y looks different from X: a bright background after inversion, thicker strokes.
    assert u.x.images.mean() < -0.3 and u.y.images.mean() > u.x.images.mean() + 0.3
    assert (u.x_truth - u.x.images).abs().mean() > 0.5  # the identity map is far from the truth


def test_unknown_builtin_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown built-in dataset 'builtin:mnist'"):
        load_builtin("builtin:mnist")


def test_sampler_shards_and_resumes():
    a = MinibatchSampler(100, 10, seed=3, rank=0, world_size=2)
    b = MinibatchSampler(100, 10, seed=3, rank=1, world_size=2)
    ia, ib = a.next_indices(), b.next_indices()
    assert not set(ia.tolist()) & set(ib.tolist())  # ranks see disjoint shards
    state = a.state_dict()
    nxt = [a.next_indices() for _ in range(7)]  # crosses an epoch boundary
    a.load_state_dict(state)
    assert all(torch.equal(x, a.next_indices()) for x in nxt)
    with pytest.raises(ValueError, match="batch_size"):
        MinibatchSampler(10, 20, seed=0)

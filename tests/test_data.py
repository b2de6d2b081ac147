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


def _rows(images: torch.Tensor) -> set[tuple]:
    return {tuple(r) for r in images.flatten(1).tolist()}


def test_digits_split_is_stratified_and_disjoint():
    train, val, test = (load_digits(16, s) for s in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == 1797
    assert 0.18 < len(test) / 1797 < 0.22
    assert 0.09 < len(val) / (len(train) + len(val)) < 0.11
    assert train.images.shape[1:] == (1, 16, 16) and val.images.shape[1:] == (1, 16, 16)
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert torch.bincount(test.labels, minlength=10).min() >= 30
    assert torch.bincount(val.labels, minlength=10).min() >= 12  # every class, ~10% of the rest
    # No image is in two splits.
    tr, va, te = _rows(train.images), _rows(val.images), _rows(test.images)
    assert not tr & va and not tr & te and not va & te


def test_digits_test_split_is_unchanged_by_val():
    """The test split is the one from before val existed: per class, the first 20% of a
    permutation seeded 0, with the generator shared across classes in class order."""
    from sklearn.datasets import load_digits as sk_digits

    labels = torch.tensor(sk_digits().target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    held = []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        held.append(idx[: round(len(idx) * 0.2)])
    want = torch.cat(held).sort().values
    images = torch.tensor(sk_digits().images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    test = load_digits(8, "test")
    assert torch.equal(test.labels, labels[want])
    torch.testing.assert_close(test.images, images[want], rtol=0, atol=0)
    u = load_digits_unpaired(8, "val")
    assert len(u.x) + len(u.y) == len(load_digits(8, "val"))
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        load_digits(8, "validation")


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

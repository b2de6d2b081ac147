"""The digits classifier: held-out accuracy in both appearances, determinism, safetensors cache."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

import gan_core.classifier as classifier_mod
from gan_core.classifier import (
    FEATURE_DIM,
    DigitClassifier,
    classifier_accuracy,
    load_or_train_classifier,
    train_digit_classifier,
)
from gan_core.data import appearance_transform, load_digits

IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def trained() -> tuple[DigitClassifier, float]:
    start = time.perf_counter()
    clf = train_digit_classifier(IMAGE_SIZE, seed=0)
    return clf, time.perf_counter() - start


def test_held_out_accuracy_both_appearances(trained):
    clf, seconds = trained
    test = load_digits(IMAGE_SIZE, "test")
    acc_x = classifier_accuracy(clf, test.images, test.labels)
    acc_y = classifier_accuracy(clf, appearance_transform(test.images), test.labels)
    print(
        f"classifier s{IMAGE_SIZE}: trained in {seconds:.1f}s, held-out X {acc_x:.4f}, Y {acc_y:.4f}"
    )
    assert not clf.training
    assert acc_x >= 0.95
    assert acc_y >= 0.95


def test_accuracy_with_shuffled_labels_is_near_chance(trained):
    clf, _ = trained
    test = load_digits(IMAGE_SIZE, "test")
    shuffled = test.labels[torch.randperm(len(test), generator=torch.Generator().manual_seed(1))]
    assert classifier_accuracy(clf, test.images, shuffled) < 0.3


def test_training_is_deterministic_and_leaves_global_rng_alone(trained):
    clf, _ = trained
    before = torch.get_rng_state()
    again = train_digit_classifier(IMAGE_SIZE, seed=0)
    torch.testing.assert_close(torch.get_rng_state(), before, rtol=0, atol=0)
    for name, tensor in clf.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("size", [8, 16, 28, 32])
def test_any_image_size_gives_features_and_logits(size):
    clf = DigitClassifier()
    x = torch.rand(3, 1, size, size) * 2 - 1
    assert clf.features(x).shape == (3, FEATURE_DIM)
    assert clf(x).shape == (3, 10)


def test_cache_round_trip_does_not_retrain(trained, tmp_path, monkeypatch):
    clf, _ = trained
    calls = []

    def fake_train(image_size: int, seed: int = 0) -> DigitClassifier:
        calls.append((image_size, seed))
        return clf  # reuse the module's model: the cache, not training, is under test

    monkeypatch.setattr(classifier_mod, "train_digit_classifier", fake_train)
    first = load_or_train_classifier(IMAGE_SIZE, tmp_path / "cache", seed=0)
    assert calls == [(IMAGE_SIZE, 0)]
    path = classifier_mod.classifier_cache_path(IMAGE_SIZE, tmp_path / "cache", seed=0)
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    assert set(load_file(str(path))) == set(clf.state_dict())

    def must_not_train(image_size: int, seed: int = 0) -> DigitClassifier:
        raise AssertionError("a cached classifier was retrained")

    monkeypatch.setattr(classifier_mod, "train_digit_classifier", must_not_train)
    second = load_or_train_classifier(IMAGE_SIZE, tmp_path / "cache", seed=0)
    assert second is not first
    assert not second.training
    for name, tensor in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[name], tensor, rtol=0, atol=0)

    # Another seed is another cache entry, so it must train.
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_classifier(IMAGE_SIZE, tmp_path / "cache", seed=1)


def test_judge_is_trained_once_per_snapshot_and_cached(tmp_path, monkeypatch):
    """The snapshot judge: trained on the first call (labels -> the class task), then read
    from its safetensors cache (task and held-out accuracy in the metadata), not retrained."""
    from gan_core import judge as judge_mod
    from gan_core.data import load_digits

    train, test = load_digits(IMAGE_SIZE, "train"), load_digits(IMAGE_SIZE, "test")
    first = judge_mod.load_or_train_judge("snap-a", lambda: (train, test), tmp_path)
    assert first.task == "classes" and first.num_classes == 10
    assert first.heldout_accuracy > 0.9

    def must_not_train(*a, **k):
        raise AssertionError("a cached judge was retrained")

    monkeypatch.setattr(judge_mod, "train_judge", must_not_train)
    second = judge_mod.load_or_train_judge("snap-a", must_not_train, tmp_path)
    assert (second.task, second.num_classes) == ("classes", 10)
    assert second.heldout_accuracy == first.heldout_accuracy
    for name, tensor in first.net.state_dict().items():
        torch.testing.assert_close(second.net.state_dict()[name], tensor, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="retrained"):  # another snapshot, another judge
        judge_mod.load_or_train_judge("snap-b", (train, test), tmp_path)

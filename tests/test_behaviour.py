"""Trained models judged by behaviour on held-out digits, within CI budgets.

The floors are the issue's; the short runs here clear them with margin (figures measured
on a 2-core machine are in the comments), and the main job's default configs do better.
"""

from __future__ import annotations

import pytest
import torch

from gan_core.data import load_builtin
from gan_core.evaluate import evaluate
from gan_core.judge import load_or_train_judge
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import init_state, train

pytestmark = pytest.mark.slow


def _train_and_eval(family: str, overrides: dict, cache) -> dict:
    cfg = apply_overrides(preset(family), overrides)
    data = load_builtin(cfg.data.dataset, cfg.data.image_size, "train")
    heldout = load_builtin(cfg.data.dataset, cfg.data.image_size, "test")
    judge = load_or_train_judge(cfg.data.dataset, data, cache, heldout=heldout)
    with torch.random.fork_rng(devices=[]):
        state = train(init_state(cfg, data, "cpu"), data)
    out = evaluate(cfg, state.models, heldout, judge)
    print(family, out)
    return out


def test_cgan_samples_carry_their_label(classifier_cache, trained_cgan):
    # conftest's cGAN, trained once per session (700 steps): measured 0.961, 10 classes
    cfg, models = trained_cgan
    data = load_builtin(cfg.data.dataset, cfg.data.image_size, "train")
    heldout = load_builtin(cfg.data.dataset, cfg.data.image_size, "test")
    judge = load_or_train_judge(cfg.data.dataset, data, classifier_cache, heldout=heldout)
    out = evaluate(cfg, models, heldout, judge)
    print("cgan", out)
    assert out["class_accuracy"] >= 0.80
    assert out["classes_covered"] == 10


def test_gan_covers_the_classes(classifier_cache):
    out = _train_and_eval("gan", {"train.steps": 1200}, classifier_cache)  # measured 10, FD 45.9
    assert out["classes_covered"] >= 9


def test_cyclegan_beats_identity_by_half(classifier_cache):
    out = _train_and_eval("cyclegan", {"train.steps": 300}, classifier_cache)  # measured 0.082
    assert out["truth_error_ratio"] <= 0.5
    assert out["label_preservation"] >= 0.8  # measured 0.983: G(x) keeps the digit

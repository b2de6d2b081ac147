"""The config tree: validation names the field; flat dicts round-trip."""

from __future__ import annotations

import pytest

from gan_core.config import ConfigError
from gan_core.overrides import apply_overrides, from_flat_dict
from gan_core.presets import preset


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"train.d_steps": 0}, "train.d_steps"),
        ({"d_steps": "-2"}, "train.d_steps"),
        ({"d_steps": "two"}, "train.d_steps"),
        ({"lambda_cyc": -1}, "loss.lambda_cyc"),
        ({"lambda_cyc": "nan"}, "loss.lambda_cyc"),
        ({"family": "wgan"}, "family"),
        ({"model.arch": "resnet"}, "model.arch"),
        ({"model.arch": "conv", "data.image_size": 12}, "data.image_size"),
        ({"batch_size": 0}, "train.batch_size"),
        ({"lr_g": 5}, "optim.lr_g"),
        ({"gan_loss": "wasserstein"}, "loss.gan_loss"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"train.nope": 1}, "train.nope"),
    ],
)
def test_invalid_values_fail_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        apply_overrides(preset("gan"), overrides)


def test_cyclegan_image_size_must_fit_patchgan():
    with pytest.raises(ConfigError, match=r"^data.image_size:.*PatchGAN"):
        apply_overrides(preset("cyclegan"), {"data.image_size": 8})


@pytest.mark.parametrize("family", ["gan", "cgan", "cyclegan"])
@pytest.mark.parametrize("name", ["default", "tiny"])
def test_flat_dict_round_trip_including_strings(family, name):
    cfg = preset(family, name)
    flat = cfg.to_flat_dict()
    assert all("." in k for k in flat if k != "family")
    assert from_flat_dict(flat) == cfg
    as_strings = {k: str(v) for k, v in flat.items()}  # what MLflow gives back
    assert from_flat_dict(as_strings) == cfg


def test_overrides_by_leaf_name():
    cfg = apply_overrides(preset("cyclegan"), ["d_steps=3", "lambda_cyc=2.5", "train.seed=7"])
    assert (cfg.train.d_steps, cfg.loss.lambda_cyc, cfg.train.seed) == (3, 2.5, 7)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["d_steps"])


def test_paper_preset_is_the_paper_sized_mlp():
    cfg = preset("gan", "paper")
    assert (cfg.model.arch, cfg.data.image_size, cfg.train.batch_size) == ("mlp", 28, 64)
    with pytest.raises(ConfigError, match="^preset:"):
        preset("cgan", "paper")


def test_a_preset_is_chosen_with_the_overrides_when_fitting_a_dataset():
    from gan_core.presets import DataFacts, config_for_data

    facts = DataFacts("labelled", 32, 3, ("a", "b", "c"))
    cpu = config_for_data("cgan", facts, ["preset=cpu", "train.steps=900"])
    # The evaluation cadence follows the user's steps (a tenth, at log points of 100)...
    assert (cpu.model.ngf, cpu.train.steps, cpu.eval.every) == (32, 900, 100)
    # ... never past the last step, and an explicit one is kept.
    assert config_for_data("cgan", facts, ["train.steps=40"]).eval.every == 40
    kept = config_for_data("cgan", facts, ["train.steps=900", "eval.every=450"])
    assert kept.eval.every == 450
    assert config_for_data("cgan", facts, ["train.steps=900", "eval.every=0"]).eval.every == 0
    assert config_for_data("cgan", facts).model.ngf == 64
    with pytest.raises(ConfigError, match="preset: unknown preset 'huge'"):
        config_for_data("cgan", facts, {"preset": "huge"})
    with pytest.raises(ConfigError, match="preset: chosen when the config is built"):
        apply_overrides(cpu, ["preset=cpu"])

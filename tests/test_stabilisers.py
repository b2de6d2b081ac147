"""The stabilisers against their definitions: DiffAugment's ops, ADA's controller, the EMA's
half-life, R1 and hinge against the formulas, spectral norm, the projection D, the DCGAN
layout; models registered before them still load; exact resume with all of them on."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gan_core import diffaug, ema, losses
from gan_core.config import AugmentConfig, ConfigError
from gan_core.data import ImageSet
from gan_core.models import ConvDiscriminator, ConvGenerator, build_models
from gan_core.overrides import apply_overrides, from_flat_dict
from gan_core.presets import preset
from gan_core.train import eval_models, init_state, load_state_dict, state_dict, train


def _images(n=8, c=3, s=16, seed=0):
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- DiffAugment ----------------------------------------------------------------------------


def test_each_op_is_the_identity_at_p_zero():
    x = _images()
    draws = diffaug.draw(("color", "translation", "cutout"), 8, torch.Generator().manual_seed(1))
    torch.testing.assert_close(diffaug.apply(x, draws, 0.0), x, rtol=0, atol=1e-6)


def test_translation_moves_whole_pixels_and_pads_with_zeros():
    x = _images(s=16)
    draws = diffaug.draw(("translation",), 8, torch.Generator().manual_seed(2))
    out = diffaug.apply(x, draws, 1.0)
    s = int(16 * diffaug.TRANSLATION_RATIO + 0.5)
    for i in range(8):
        dx, dy = (torch.floor(draws["translation"][i, 1:3] * (2 * s + 1)) - s).int().tolist()
        want = torch.zeros_like(x[i])
        src = x[i][:, max(0, -dy) : 16 - max(0, dy), max(0, -dx) : 16 - max(0, dx)]
        want[:, max(0, dy) : 16 - max(0, -dy), max(0, dx) : 16 - max(0, -dx)] = src
        torch.testing.assert_close(out[i], want, rtol=0, atol=0)


def test_cutout_zeroes_one_square_of_half_the_side():
    x = _images(s=16).abs() + 0.1  # no zeros of its own
    draws = diffaug.draw(("cutout",), 8, torch.Generator().manual_seed(3))
    out = diffaug.apply(x, draws, 1.0)
    for i in range(8):
        hole = (out[i] == 0).all(0)
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 0 < len(rows) <= 8 and 0 < len(cols) <= 8  # clipped at the border only
        assert hole.sum() == len(rows) * len(cols)  # a rectangle
        assert torch.equal(out[i][:, ~hole], x[i][:, ~hole])


def test_ops_are_differentiable_and_follow_their_draws():
    x = _images().requires_grad_(True)
    ops = ("color", "translation", "cutout")
    draws = diffaug.draw(ops, 8, torch.Generator().manual_seed(4))
    out = diffaug.apply(x, draws, 1.0)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(diffaug.apply(x.detach(), draws, 1.0), out.detach())
    other = diffaug.draw(ops, 8, torch.Generator().manual_seed(5))
    assert not torch.allclose(diffaug.apply(x.detach(), other, 1.0), out.detach())


def test_ada_raises_p_when_d_is_sure_of_the_reals_and_lowers_it_otherwise():
    cfg = AugmentConfig(policy="translation", ada=True, ada_images=1000, ada_interval=4)
    aug = diffaug.Augmenter(cfg, batch_size=10, boundary=0.0, device=torch.device("cpu"), seed=0)
    assert float(aug.p) == 0.0  # ADA starts without augmentation
    step = 10 * 4 / 1000
    for _ in range(8):  # r_t = 1 > 0.6: two adjustments up
        aug.observe(torch.ones(10))
    assert float(aug.p) == pytest.approx(2 * step)
    assert float(aug.last_rt) == 1.0
    for _ in range(12):  # r_t = -1 < 0.6: three down, clamped at 0
        aug.observe(-torch.ones(10))
    assert float(aug.p) == 0.0
    fixed = diffaug.Augmenter(
        AugmentConfig(policy="color", p=0.3), 10, 0.0, torch.device("cpu"), seed=0
    )
    fixed.observe(torch.ones(10))
    assert float(fixed.p) == pytest.approx(0.3)


def test_augment_policy_is_validated():
    with pytest.raises(ConfigError, match="augment.policy"):
        AugmentConfig(policy="color,rotate")
    with pytest.raises(ConfigError, match="augment.p"):
        AugmentConfig(p=1.5)
    with pytest.raises(ConfigError, match="augment.policy: needs a convolutional D"):
        apply_overrides(preset("gan"), {"augment.policy": "color"})


# --- EMA ------------------------------------------------------------------------------------


def test_ema_half_life_is_in_images():
    # After half_life images the old weights' share is one half, whatever the batch.
    for batch in (1, 16, 64):
        beta = ema.decay(1000, 0.0, images_seen=10**6, batch=batch)
        assert beta ** (1000 / batch) == pytest.approx(0.5)
    # Ramp-up: early on the half-life is a fraction of the images seen.
    assert ema.decay(1000, 0.05, images_seen=200, batch=10) == pytest.approx(0.5 ** (10 / 10))


def test_ema_update_averages_weights_and_copies_buffers():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    avg = ema.make_average(net)
    before = avg[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net(torch.randn(5, 3))  # moves BN's running statistics
    ema.update(avg, net, beta=0.75)
    torch.testing.assert_close(avg[0].weight, 0.75 * before + 0.25 * net[0].weight)
    torch.testing.assert_close(avg[1].running_mean, net[1].running_mean)
    assert not any(p.requires_grad for p in avg.parameters())


# --- losses and regularisers against the formulas -------------------------------------------


def test_hinge_losses_match_the_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    want_d = (0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3
    assert float(losses.hinge_discriminator_loss(real, fake)) == pytest.approx(want_d)
    assert float(losses.hinge_generator_loss(fake)) == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_r1_is_the_squared_gradient_norm_on_reals():
    # D(x) = <w, x> + b has ∇_x D = w everywhere: R1 = ‖w‖².
    lin = nn.Linear(12, 1)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    r1 = losses.r1_penalty(lin(x.flatten(1)).squeeze(1), x)
    assert float(r1.detach()) == pytest.approx(float(lin.weight.square().sum()), rel=1e-6)
    r1.backward()  # differentiable with respect to D's weights (create_graph)
    torch.testing.assert_close(lin.weight.grad, 2 * lin.weight.detach())


# --- networks -------------------------------------------------------------------------------


def test_spectral_norm_bounds_each_layer_of_d():
    D = ConvDiscriminator(3, 16, 8, sn=True)
    x = torch.randn(4, 3, 16, 16)
    for _ in range(30):  # power iterations run in training forwards
        D(x)
    D.eval()
    for m in D.modules():
        if isinstance(m, nn.Conv2d):
            sigma = torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)
            assert float(sigma) == pytest.approx(1.0, abs=0.05)


def test_projection_d_scores_depend_on_the_label_through_an_inner_product():
    D = ConvDiscriminator(3, 16, 8, num_classes=3, sn=False, conditioning="projection")
    x = torch.randn(2, 3, 16, 16)
    y0, y1 = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    h = D.net(x)
    diff = D(x, y0) - D(x, y1)
    torch.testing.assert_close(diff, ((D.proj.weight[0] - D.proj.weight[1]) * h).sum(1))


def test_minibatch_std_appends_each_groups_feature_std():
    from gan_core.models import MinibatchStd

    x = torch.randn(8, 3, 4, 4)
    out = MinibatchStd(4)(x)
    assert out.shape == (8, 4, 4, 4) and torch.equal(out[:, :3], x)
    # Groups of 4 are strided: images j, j+2, j+4, j+6 (ProGAN's reshape).
    for j in range(2):
        group = x[j::2]
        want = (group.var(0, unbiased=False) + 1e-8).sqrt().mean()
        for i in range(j, 8, 2):
            torch.testing.assert_close(out[i, 3], torch.full((4, 4), float(want)))
    # One image repeated: no variety to see. A short last batch of 3: groups of 1 (zero).
    same = MinibatchStd(4)(x[:1].expand(8, -1, -1, -1).contiguous())
    assert float(same[:, 3].abs().max()) < 1e-3
    assert MinibatchStd(4)(x[:3]).shape == (3, 4, 4, 4)


def test_minibatch_std_lets_d_score_a_collapsed_batch_apart():
    # The same images scored one by one and in a batch differ only through the group std.
    D = ConvDiscriminator(3, 16, 8, sn=False, mbstd=4)
    x = torch.randn(8, 3, 16, 16)
    collapsed = x[:1].expand(8, -1, -1, -1).contiguous()
    assert not torch.allclose(D(x)[:1], D(collapsed)[:1])
    plain = ConvDiscriminator(3, 16, 8, sn=False)
    assert torch.allclose(plain(x)[:1], plain(collapsed)[:1])
    with pytest.raises(ConfigError, match="model.minibatch_std"):
        apply_overrides(preset("gan", "default", 32), {"model.minibatch_std": -1})


def test_resize_upsampling_g_doubles_by_nearest_then_3x3_conv():
    from gan_core.models import ResizeConv

    up = ResizeConv(2, 1, bias=False)
    nn.init.ones_(up.conv.weight)
    x = torch.arange(4.0).view(1, 1, 2, 2).expand(1, 2, 2, 2)
    want = nn.functional.conv2d(
        nn.functional.interpolate(x, scale_factor=2, mode="nearest"), up.conv.weight, padding=1
    )
    torch.testing.assert_close(up(x), want)
    cfg = apply_overrides(
        preset("cgan", "default", 32),
        {"model.g_upsample": "resize", "data.channels": 3, "model.num_classes": 3},
    )
    G = build_models(cfg)["G"]
    assert any(isinstance(m, ResizeConv) for m in G.modules())
    assert not any(isinstance(m, nn.ConvTranspose2d) and m.stride == (2, 2) for m in G.modules())
    assert G(torch.randn(4, cfg.model.z_dim), torch.tensor([0, 1, 2, 0])).shape == (4, 3, 32, 32)
    with pytest.raises(ConfigError, match="model.g_upsample"):
        apply_overrides(preset("gan", "default", 32), {"model.g_upsample": "bilinear"})


def test_dcgan_layout_is_radfords():
    # 64 px, ngf 64: 512 channels at 4x4, halved per doubling, the last conv to RGB.
    G = ConvGenerator(100, 3, 64, 64, layout="dcgan")
    convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3]
    assert not any(isinstance(m, nn.Conv2d) for m in G.modules())
    y = torch.tensor([0, 2])
    cg = ConvGenerator(100, 3, 32, 16, num_classes=3, layout="dcgan", conditioning="projection")
    out = cg(torch.randn(2, 100), y)
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1


def test_models_registered_before_the_stabilisers_still_load():
    # A flat config written before model.g_layout existed rebuilds the old networks: the
    # keys of their state dicts are those the older code wrote (frozen here).
    cfg = apply_overrides(
        preset("cgan", "default", 32), {"data.channels": 3, "model.num_classes": 3}
    )
    flat = {
        k: v
        for k, v in cfg.to_flat_dict().items()
        if k
        not in ("model.g_layout", "model.spectral_norm", "model.conditioning", "model.d_batchnorm")
        and not k.startswith("augment.")
    }
    old = from_flat_dict(flat)
    assert (old.model.g_layout, old.model.spectral_norm, old.model.conditioning) == (
        "wide",
        False,
        "concat",
    )
    models = build_models(old)
    g_keys = sorted(models["G"].state_dict())
    assert g_keys[:4] == ["embed.weight", "net.0.weight", "net.1.bias", "net.1.num_batches_tracked"]
    assert "project.0.weight" in g_keys and "net.9.weight" in g_keys  # the 3x3 full-res conv
    assert sorted(models["D"].state_dict()) == [
        "embed.weight",
        "net.0.bias",
        "net.0.weight",
        "net.2.bias",
        "net.2.weight",
        "net.4.bias",
        "net.4.weight",
        "net.7.bias",
        "net.7.weight",
    ]


# --- the loop with everything on ------------------------------------------------------------


def _stabilised(family="cgan", **extra):
    over = {
        "data.channels": 3,
        "model.num_classes": 3,
        "model.ngf": 8,
        "model.ndf": 8,
        "train.batch_size": 8,
        "train.steps": 12,
        "train.log_every": 3,
        "train.ema_half_life": 200,
        "augment.policy": "color,translation,cutout",
        "augment.ada": True,
        "augment.ada_images": 500,
        "augment.ada_interval": 2,
        "augment.ada_target": 0.0,  # any lean towards "real" raises p: the state moves
        "loss.r1_gamma": 1.0,
        "loss.r1_every": 4,
        "train.device": "cpu",
        **extra,
    }
    if family == "cyclegan":
        for k in ("model.num_classes", "model.ngf", "model.ndf"):
            over.pop(k)
        over.update({"model.ngf": 4, "model.ndf": 4, "augment.policy": "color,translation,cutout"})
        over["augment.ada"] = True
        return apply_overrides(preset("cyclegan", "tiny", 16), over)
    return apply_overrides(preset(family, "default", 32), over)


def _data(family):
    g = torch.Generator().manual_seed(0)
    if family == "cyclegan":
        from gan_core.data import UnpairedSet

        return UnpairedSet(
            ImageSet(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)),
            ImageSet(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)),
        )
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.arange(40) % 3)


@pytest.mark.parametrize("family", ["gan", "cgan", "cyclegan"])
def test_resume_is_exact_with_ema_ada_and_r1(family, tmp_path):
    cfg, data = _stabilised(family), _data(family)
    logs: list[dict] = []
    whole = train(init_state(cfg, data, "cpu"), data, callbacks=[lambda s, r: logs.append(r)])
    assert any("r1" in r for r in logs) and all("augment_p" in r for r in logs)
    if family != "cyclegan":  # random images: D overfits at once, and ADA raises p
        assert logs[-1]["augment_p"] > 0

    first = train(init_state(cfg, data, "cpu"), data, until=6)
    sd = state_dict(first)
    torch.save(sd, tmp_path / "ckpt.pt")
    resumed = load_state_dict(
        init_state(cfg, data, "cpu"), torch.load(tmp_path / "ckpt.pt", weights_only=True)
    )
    train(resumed, data)
    a, b = state_dict(whole), state_dict(resumed)
    for k in whole.models:
        for (n, x), (_, y) in zip(a["models"][k].items(), b["models"][k].items()):
            assert torch.equal(x, y), (k, n)
    for k in whole.ema:
        for (n, x), (_, y) in zip(a["ema"][k].items(), b["ema"][k].items()):
            assert torch.equal(x, y), ("ema", k, n)
    assert torch.equal(a["augment"]["p"], b["augment"]["p"])


def test_eval_models_are_the_averages():
    cfg, data = _stabilised("gan"), _data("gan")
    state = train(init_state(cfg, data, "cpu"), data)
    models = eval_models(state)
    assert models["G"] is state.ema["G"] and models["D"] is state.models["D"]
    live = dict(state.models["G"].named_parameters())
    diff = max(float((p - live[n]).abs().max()) for n, p in models["G"].named_parameters())
    assert diff > 0  # an average, not a copy of the last step
    off = apply_overrides(cfg, {"train.ema_half_life": 0})
    state = init_state(off, data, "cpu")
    assert eval_models(state)["G"] is state.models["G"] and not state.ema
    assert math.isfinite(diff)


def test_standing_statistics_are_recomputed_for_the_weights():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net.eval()
    xs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ema.standing_statistics(net, [(x,) for x in xs])
    with torch.no_grad():
        h = torch.cat([net[0](x) for x in xs])
    torch.testing.assert_close(net[1].running_mean, h.mean(0))
    assert net[1].momentum == 0.1 and not net.training  # restored


def test_the_config_names_every_augmentation_op_there_is():
    from gan_core.config import DIFFAUG_OPS

    assert set(DIFFAUG_OPS) == set(diffaug.OPS)  # the config validates what diffaug runs


# --- the matching-aware discriminator (Reed et al. 2016) ------------------------------------


def test_matching_aware_loss_matches_the_formula():
    real, fake, wrong = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0]), torch.tensor([1.0, -3])
    w = 0.25
    l_real = (0 + 0.5) / 2  # hinge: E[max(0, 1 - D(x, y))]
    l_fake, l_wrong = (0 + 1.0) / 2, (2.0 + 0) / 2  # E[max(0, 1 + D)]
    got = losses.matching_aware_discriminator_loss(
        losses.hinge_discriminator_loss, real, fake, wrong, w
    )
    assert float(got) == pytest.approx(l_real + (1 - w) * l_fake + w * l_wrong)
    # w = 0 is the plain cGAN loss, for every kind of loss
    for kind in ("minimax", "lsgan", "hinge"):
        d = losses.discriminator_loss(kind)
        assert float(losses.matching_aware_discriminator_loss(d, real, fake, wrong, 0.0)) == (
            pytest.approx(float(d(real, fake)))
        )


def test_wrong_labels_are_every_other_class_and_never_the_right_one():
    from gan_core.families import _wrong_labels

    cfg, data = _stabilised("cgan"), _data("cgan")
    state = init_state(cfg, data, "cpu")
    y = torch.arange(3000) % 3
    wrong = _wrong_labels(state, y)
    assert not bool((wrong == y).any())
    for c in range(3):  # uniform over the other two classes
        counts = torch.bincount(wrong[y == c], minlength=3).float() / 1000
        assert counts[c] == 0 and bool(((counts - 0.5).abs() < 0.06).sum() == 2), counts


def _wrong_pairs_judged_fake(mismatch: float) -> float:
    """Train only D (G never updated) on two classes that differ in brightness; the share of
    real images shown with the other class's label that D then scores as fake."""
    from gan_core.families import FAMILIES
    from gan_core.feed import Feeder

    cfg = apply_overrides(
        _stabilised("cgan"),
        {
            "model.num_classes": 2,
            "loss.mismatch": mismatch,
            "augment.policy": "none",
            "augment.ada": False,
            "loss.r1_gamma": 0.0,
        },
    )
    images = torch.cat([torch.zeros(20, 3, 32, 32), torch.full((20, 3, 32, 32), 255.0)])
    data = ImageSet(images.to(torch.uint8), torch.arange(40) // 20)
    state, family = init_state(cfg, data, "cpu"), FAMILIES["cgan"]
    feeder = Feeder(state, data)
    for _ in range(60):
        family.d_step(state, feeder.next(ahead=False))
    D = state.models["D"].eval()
    x = data.images.float() / 127.5 - 1
    with torch.no_grad():
        right, wrong = D(x, data.labels), D(x, 1 - data.labels)
    assert float((right > 0).float().mean()) == 1.0  # the reals themselves: real (hinge: > 0)
    return float((wrong < 0).float().mean())


def test_a_matching_aware_d_learns_to_check_the_label():
    # Without mismatched pairs nothing asks D to tell a right label from a wrong one on real
    # images (measured: it calls half of them real); with them, every one is fake.
    assert _wrong_pairs_judged_fake(0.5) == 1.0
    assert _wrong_pairs_judged_fake(0.0) < 0.9


def test_mismatch_is_validated():
    with pytest.raises(ConfigError, match="loss.mismatch"):
        apply_overrides(preset("gan", "default", 32), {"loss.mismatch": 0.5})
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="loss.mismatch"):
            apply_overrides(preset("cgan", "default", 32), {"loss.mismatch": bad})
    assert preset("cgan", "default", 32).loss.mismatch == 0.5
    assert preset("gan", "default", 32).loss.mismatch == 0.0

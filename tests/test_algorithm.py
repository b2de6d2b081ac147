"""Algorithm 1, checked step by step, for every family."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from gan_core.data import load_builtin
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import FAMILIES, init_state, train

ALL = ("gan", "cgan", "cyclegan")


def _setup(family, **overrides):
    cfg = apply_overrides(preset(family, "tiny"), overrides)
    data = load_builtin(cfg.data.dataset, cfg.data.image_size)
    return cfg, data, init_state(cfg, data, "cpu")


@pytest.mark.parametrize("family", ALL)
def test_k_discriminator_updates_per_generator_update_on_fresh_minibatches(family, monkeypatch):
    cfg, data, state = _setup(family, **{"train.d_steps": 3, "train.steps": 4})
    fam = FAMILIES[family]
    events: list[tuple[str, tuple]] = []
    real_d, real_g = fam.d_step, fam.g_step

    def spy_d(st, batch):
        events.append(("D", tuple(batch.x.flatten(1)[:, :].sum(1).tolist())))
        return real_d(st, batch)

    def spy_g(st, batch):
        events.append(("G", ()))
        return real_g(st, batch)

    monkeypatch.setattr(fam, "d_step", spy_d)
    monkeypatch.setattr(fam, "g_step", spy_g)
    d_opt_steps = []
    state.opt_d.register_step_post_hook(lambda *a: d_opt_steps.append(state.step))
    train(state, data)
    assert [e[0] for e in events] == (["D"] * 3 + ["G"]) * 4
    assert len(d_opt_steps) == 12
    d_batches = [e[1] for e in events if e[0] == "D"]
    for i in range(0, 12, 3):  # the k minibatches of one iteration are all different
        assert len(set(d_batches[i : i + 3])) == 3


@pytest.mark.parametrize("family", ALL)
def test_generator_update_leaves_discriminator_untouched(family):
    cfg, data, state = _setup(family)
    fam = FAMILIES[family]
    fam.d_step(state, fam.next_batch(state, data))  # leaves D's grads populated
    d_keys = fam.discriminators
    before = {k: [p.detach().clone() for p in state.models[k].parameters()] for k in d_keys}
    grads = {k: [p.grad.clone() for p in state.models[k].parameters()] for k in d_keys}
    g_before = [p.detach().clone() for k in fam.generators for p in state.models[k].parameters()]
    fam.g_step(state, fam.next_batch(state, data) if fam.g_uses_data else None)
    for k in d_keys:
        for p, p0, g0 in zip(state.models[k].parameters(), before[k], grads[k]):
            assert torch.equal(p, p0)
            assert torch.equal(p.grad, g0)  # no gradient was accumulated into D in G's update
            assert p.requires_grad  # and D is unfrozen again afterwards
    g_after = [p for k in fam.generators for p in state.models[k].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(g_after, g_before))  # G did move


def test_generator_update_computes_no_discriminator_weight_gradients():
    cfg, data, state = _setup("gan")
    D = state.models["D"]
    seen = []
    for p in D.parameters():
        p.register_hook(lambda g: seen.append(g))
    FAMILIES["gan"].g_step(state, None)
    assert seen == []


def test_each_discriminator_step_draws_fresh_noise():
    cfg, data, state = _setup("gan", **{"train.d_steps": 2, "train.steps": 1})
    zs = []
    orig = state.z

    def spy(m):
        z = orig(m)
        zs.append(z.clone())
        return z

    state.z = spy
    train(state, data)
    assert len(zs) == 3  # k = 2 D steps + 1 G step, each with its own m noise samples
    assert all(z.shape == (cfg.train.batch_size, cfg.model.z_dim) for z in zs)
    assert not torch.equal(zs[0], zs[1]) and not torch.equal(zs[1], zs[2])


def test_cyclegan_loss_weights_cycle_term_by_lambda():
    # With λ = 0 the cycle term must not affect G's update; with λ > 0 it must.
    results = {}
    for lam in (0.0, 10.0):
        cfg, data, state = _setup("cyclegan", **{"loss.lambda_cyc": lam, "loss.lambda_id": 0.0})
        fam = FAMILIES["cyclegan"]
        m = fam.g_step(state, fam.next_batch(state, data))
        results[lam] = m
    for lam, m in results.items():
        assert_close(m["loss_G_total"], m["loss_G"] + m["loss_F"] + lam * m["loss_cyc"])


def test_learning_rate_decays_linearly_for_cyclegan():
    cfg, data, state = _setup(
        "cyclegan", **{"train.steps": 10, "optim.decay_start": 0.5, "train.log_every": 1}
    )
    lrs = []
    train(state, data, callbacks=[lambda s, m: lrs.append(m["lr_g"])])
    lr = cfg.optim.lr_g
    assert_close(torch.tensor(lrs[:5]), torch.full((5,), lr))  # constant for the first half
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    diffs = torch.tensor(lrs[5:]).diff()
    assert_close(diffs, torch.full_like(diffs, -lr / 5))


def test_augmentation_flips_and_jitters_from_the_sampler_stream():
    from gan_core.train import augment

    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    assert augment(x, "none", torch.Generator().manual_seed(0)) is x
    flipped = augment(x, "flip", torch.Generator().manual_seed(0))
    for i in range(2):  # each image is itself or its mirror image
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    a = augment(x, "jitter_flip", torch.Generator().manual_seed(1))
    b = augment(x, "jitter_flip", torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)  # same stream, same batch (exact resume)
    many = torch.stack([augment(x, "flip", torch.Generator().manual_seed(s)) for s in range(20)])
    assert any(torch.equal(m[0], x[0].flip(-1)) for m in many)
    assert any(torch.equal(m[0], x[0]) for m in many)

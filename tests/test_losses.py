"""Each loss against the formula in MISSION.md, and the theory the paper proves."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from gan_core import losses


def _logits(n=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64) * 3, torch.randn(
        n, generator=g, dtype=torch.float64
    ) * 3


def test_value_function_matches_formula():
    real, fake = _logits()
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    expected = torch.log(d_real).mean() + torch.log(1 - d_fake).mean()
    assert_close(losses.value_function(real, fake), expected)
    assert_close(losses.discriminator_minimax_loss(real, fake), -expected)


def test_generator_losses_match_formulas():
    _, fake = _logits(seed=1)
    d_fake = torch.sigmoid(fake)
    assert_close(losses.generator_saturating_loss(fake), torch.log(1 - d_fake).mean())
    assert_close(losses.generator_non_saturating_loss(fake), -torch.log(d_fake).mean())


def test_lsgan_cycle_and_identity_match_formulas():
    real, fake = _logits(seed=2)
    assert_close(
        losses.lsgan_discriminator_loss(real, fake),
        0.5 * (((real - 1) ** 2).mean() + (fake**2).mean()),
    )
    assert_close(losses.lsgan_generator_loss(fake), ((fake - 1) ** 2).mean())
    g = torch.Generator().manual_seed(3)
    x, fgx, y, gfy = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(4))
    l1 = lambda a, b: (a - b).abs().sum() / a.numel()  # noqa: E731  per-pixel mean of |.|
    assert_close(losses.cycle_consistency_loss(x, fgx, y, gfy), l1(fgx, x) + l1(gfy, y))
    assert_close(losses.identity_loss(x, fgx, y, gfy), l1(gfy, y) + l1(fgx, x))


def test_losses_are_stable_for_extreme_logits():
    big = torch.tensor([-200.0, 200.0])
    for value in (
        losses.discriminator_minimax_loss(big, big),
        losses.generator_non_saturating_loss(big),
        losses.generator_saturating_loss(big),
    ):
        assert torch.isfinite(value)
    # D(G(z)) = sigmoid(-200) ~ 1e-87: -log D(G(z)) ~ 200, not inf.
    assert_close(losses.generator_non_saturating_loss(torch.tensor([-200.0])), torch.tensor(200.0))


def test_non_saturating_gradient_where_saturating_vanishes():
    # Early in training D rejects G's samples: D(G(z)) ~ 1e-4, a logit of about -9.2.
    logits = torch.full((64,), -9.2, requires_grad=True)
    losses.generator_saturating_loss(logits).backward()
    g_sat = logits.grad.abs().sum().item()
    logits.grad = None
    losses.generator_non_saturating_loss(logits).backward()
    g_ns = logits.grad.abs().sum().item()
    assert g_sat < 1e-3  # d/da log(1 - sigmoid(a)) = -sigmoid(a) ~ 1e-4
    assert g_ns > 0.99  # d/da -log sigmoid(a) = sigmoid(a) - 1 ~ -1
    assert g_ns / g_sat > 1000


def test_value_at_global_optimum_is_minus_log_4():
    half = torch.zeros(100, dtype=torch.float64)  # logit 0 <=> D = 1/2
    assert_close(
        losses.value_function(half, half), torch.tensor(-math.log(4.0), dtype=torch.float64)
    )


def _fit_discriminator(data: torch.Tensor, fake: torch.Tensor, steps: int = 1500) -> nn.Module:
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(D.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = losses.discriminator_minimax_loss(D(data).squeeze(1), D(fake).squeeze(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return D


@pytest.mark.slow
def test_learned_discriminator_approaches_optimum():
    # p_data = N(0, 1), p_g = N(1.5, 1): D*(x) = p_data / (p_data + p_g) = sigmoid(-1.5 x + 1.125).
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4000, 1, generator=g)
    fake = torch.randn(4000, 1, generator=g) + 1.5
    D = _fit_discriminator(data, fake)
    xs = torch.linspace(-1.5, 3.0, 50).unsqueeze(1)
    with torch.no_grad():
        learned = torch.sigmoid(D(xs)).squeeze(1)
    optimum = torch.sigmoid(-1.5 * xs.squeeze(1) + 1.125)
    assert (learned - optimum).abs().max() < 0.06, (learned - optimum).abs().max()


def test_discriminator_is_one_half_when_pg_equals_pdata():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(4000, 1, generator=g)
    fake = torch.randn(4000, 1, generator=g)
    D = _fit_discriminator(data, fake, steps=600)
    xs = torch.linspace(-2, 2, 41).unsqueeze(1)
    with torch.no_grad():
        d = torch.sigmoid(D(xs)).squeeze(1)
        v = losses.value_function(D(data).squeeze(1), D(fake).squeeze(1))
    assert (d - 0.5).abs().max() < 0.06
    assert abs(v.item() + math.log(4)) < 0.01

"""Metrics against reference math (numpy, scipy) and on real digits with a trained classifier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from gan_core.classifier import load_or_train_classifier
from gan_core.data import appearance_transform, load_digits, load_digits_unpaired
from gan_core.metrics import (
    MODE_COVERAGE_MIN_SHARE,
    class_accuracy,
    cyclegan_metrics,
    feature_statistics,
    frechet_distance,
    frechet_distance_images,
    kernel_distance,
    mode_coverage,
)

IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def clf(classifier_cache):
    # conftest's session-wide cache: the classifier trains once for every module that uses it.
    return load_or_train_classifier(IMAGE_SIZE, classifier_cache)


@pytest.fixture(scope="module")
def test_digits():
    return load_digits(IMAGE_SIZE, "test")


def _random_cov(d: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d, generator=gen, dtype=torch.float64)
    return a @ a.T / (rank or d) + (0 if rank else 1e-3) * torch.eye(d, dtype=torch.float64)


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --- feature_statistics and frechet_distance: formula parity ---------------------------------


def test_feature_statistics_matches_numpy():
    feats = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mu, sigma = feature_statistics(feats.float())
    assert mu.dtype == sigma.dtype == torch.float64
    torch.testing.assert_close(mu, torch.from_numpy(feats.double().numpy().mean(axis=0)))
    torch.testing.assert_close(
        sigma, torch.from_numpy(np.cov(feats.double().numpy(), rowvar=False))
    )


def test_feature_statistics_rejects_a_single_row():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_matches_scipy_sqrtm(seed, d):
    gen = torch.Generator().manual_seed(seed)
    mu1, mu2 = (
        torch.randn(d, generator=gen, dtype=torch.float64),
        torch.randn(d, generator=gen, dtype=torch.float64),
    )
    s1, s2 = _random_cov(d, gen), _random_cov(d, gen)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = _scipy_frechet(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert isinstance(ours, float)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_closed_forms():
    # Same covariance: only the mean term remains.
    gen = torch.Generator().manual_seed(3)
    s = _random_cov(5, gen)
    mu = torch.randn(5, generator=gen, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(5.25, rel=1e-9)
    # Diagonal covariances: sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    b = torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert frechet_distance(zero, torch.diag(a), zero, torch.diag(b)) == pytest.approx(
        expected, rel=1e-9
    )


def test_frechet_of_a_distribution_with_itself_is_zero_even_when_singular():
    gen = torch.Generator().manual_seed(4)
    # 20 samples in 64 dimensions: a rank-19 covariance, as with few generated images.
    feats = torch.randn(20, 64, generator=gen)
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    mu2, sigma2 = feature_statistics(torch.randn(20, 64, generator=gen) + 0.5)
    forward, backward = (
        frechet_distance(mu, sigma, mu2, sigma2),
        frechet_distance(mu2, sigma2, mu, sigma),
    )
    assert forward > 1.0
    assert forward == pytest.approx(backward, rel=1e-6)


def test_frechet_grows_with_the_shift():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(500, 8, generator=gen)
    stats = feature_statistics(x)
    distances = [
        frechet_distance(*stats, *feature_statistics(x + delta)) for delta in (0.0, 0.5, 1.0)
    ]
    assert distances[0] == pytest.approx(0.0, abs=1e-9)
    # A pure shift by delta in every one of 8 dimensions adds exactly 8 * delta^2.
    assert distances[1] == pytest.approx(8 * 0.25, rel=1e-9)
    assert distances[2] == pytest.approx(8 * 1.0, rel=1e-9)


# --- metrics on real digits with the trained classifier ----------------------------------------


def test_frechet_distance_images_separates_real_from_wrong(clf, test_digits):
    images = test_digits.images
    half_a, half_b = images[0::2], images[1::2]
    real_vs_real = frechet_distance_images(half_a, half_b, clf)
    noise = torch.rand(half_b.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_vs_noise = frechet_distance_images(half_a, noise, clf)
    # A collapsed generator: one real digit repeated.
    real_vs_collapsed = frechet_distance_images(
        half_a, half_b[:1].repeat(len(half_b), 1, 1, 1), clf
    )
    print(
        f"FD real/real {real_vs_real:.3f}, real/noise {real_vs_noise:.3f}, real/collapsed {real_vs_collapsed:.3f}"
    )
    assert real_vs_real >= 0
    assert real_vs_noise > 10 * real_vs_real
    assert real_vs_collapsed > 10 * real_vs_real


def test_class_accuracy_true_and_shuffled_labels(clf, test_digits):
    assert class_accuracy(test_digits.images, test_digits.labels, clf) >= 0.95
    perm = torch.randperm(len(test_digits), generator=torch.Generator().manual_seed(0))
    assert class_accuracy(test_digits.images, test_digits.labels[perm], clf) < 0.3


def test_mode_coverage_on_real_and_collapsed_digits(clf, test_digits):
    real = mode_coverage(test_digits.images, clf)
    assert real["classes_covered"] == 10
    assert real["class_entropy"] == pytest.approx(math.log(10), abs=0.05)
    one_digit = test_digits.images[:1].repeat(200, 1, 1, 1)
    collapsed = mode_coverage(one_digit, clf)
    assert collapsed == {"classes_covered": 1, "class_entropy": 0.0}
    assert isinstance(collapsed["classes_covered"], int)


class _PixelIsClass(nn.Module):
    """Stub classifier: the class is the value of pixel (0, 0), so predictions are chosen exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()


def test_mode_coverage_threshold_and_entropy_formula():
    assert MODE_COVERAGE_MIN_SHARE == 0.01
    # 200 predictions: class 0 gets 197, class 5 gets 2 (1%, counted), class 6 gets 1 (0.5%, not).
    classes = torch.tensor([0] * 197 + [5] * 2 + [6])
    images = classes.float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    result = mode_coverage(images, _PixelIsClass())
    assert result["classes_covered"] == 2
    p = torch.tensor([197, 2, 1], dtype=torch.float64) / 200
    assert result["class_entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-12)


# --- cyclegan_metrics ------------------------------------------------------------------------


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.fixture(scope="module")
def unpaired():
    return load_digits_unpaired(IMAGE_SIZE, "test")


def _cyclegan(G, F, data, clf):
    figures, _, _ = cyclegan_metrics(
        G, F, data.x.images, data.y.images, clf, data.x_truth, data.x.labels
    )
    return figures


def test_cyclegan_metrics_with_the_true_map(clf, unpaired):
    m = _cyclegan(_Fn(appearance_transform), _Fn(torch.neg), unpaired, clf)
    assert m["truth_error"] == pytest.approx(0.0, abs=1e-7)
    assert m["truth_error_ratio"] == pytest.approx(0.0, abs=1e-7)
    assert m["identity_truth_error"] > 0.5
    assert m["label_preservation"] >= 0.95
    assert all(isinstance(v, float) for v in m.values())
    # The true map lands on domain Y's distribution: far closer than doing nothing does.
    ident = _cyclegan(nn.Identity(), nn.Identity(), unpaired, clf)
    assert m["fd_g"] < 0.2 * ident["fd_g"]
    assert m["kd_g"] < 0.2 * ident["kd_g"]


def test_cyclegan_metrics_without_truth_or_labels(clf, unpaired):
    figures, g_x, f_y = cyclegan_metrics(
        _Fn(appearance_transform), _Fn(torch.neg), unpaired.x.images, unpaired.y.images, clf
    )
    assert "truth_error_ratio" not in figures and "label_preservation" not in figures
    assert figures["fd_translation"] == pytest.approx((figures["fd_g"] + figures["fd_f"]) / 2)
    assert g_x.shape == unpaired.x.images.shape and f_y.shape == unpaired.y.images.shape


def test_cyclegan_metrics_with_identity_generators(clf, unpaired):
    m = _cyclegan(nn.Identity(), nn.Identity(), unpaired, clf)
    assert m["cycle_error"] == 0.0
    assert m["truth_error_ratio"] == pytest.approx(1.0, rel=1e-12)
    expected = (unpaired.x.images - unpaired.x_truth).abs().double().mean().item()
    assert m["identity_truth_error"] == pytest.approx(expected, rel=1e-12)
    assert m["truth_error"] == pytest.approx(expected, rel=1e-12)
    assert m["label_preservation"] >= 0.95


def test_cycle_error_is_l_cyc(clf, unpaired):
    # G adds 0.1 and F subtracts 0.3: F(G(x)) - x = -0.2 and G(F(y)) - y = -0.2, so L_cyc = 0.4.
    m = _cyclegan(_Fn(lambda t: t + 0.1), _Fn(lambda t: t - 0.3), unpaired, clf)
    assert m["cycle_error"] == pytest.approx(0.4, rel=1e-5)


def test_cyclegan_metrics_restores_module_modes(clf, unpaired):
    G = nn.Sequential(nn.BatchNorm2d(1), nn.Identity())
    F = nn.Identity()
    G.train()
    stats_before = G[0].running_mean.clone()
    _cyclegan(G, F, unpaired, clf)
    assert G.training and G[0].training and F.training
    # Evaluated in eval mode: BatchNorm did not learn from the evaluation data.
    torch.testing.assert_close(G[0].running_mean, stats_before, rtol=0, atol=0)


# --- kernel distance --------------------------------------------------------------------------


def _mmd2_unbiased_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Bińkowski et al.'s unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, written out in loops."""
    d = a.shape[1]

    def k(x, y):
        return (x @ y / d + 1) ** 3

    m = a.shape[0]
    s_aa = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    s_bb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    s_ab = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    return s_aa + s_bb - 2 * s_ab


def test_kernel_distance_matches_the_formula():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 5, generator=g)
    b = torch.randn(30, 5, generator=g) * 1.5 + 0.5
    # One subset of every sample: the estimator is the full unbiased MMD^2 (order irrelevant).
    mean, std = kernel_distance(a, b, subsets=1, subset_size=30)
    assert mean == pytest.approx(
        _mmd2_unbiased_numpy(a.double().numpy(), b.double().numpy()), rel=1e-9
    )
    assert std == 0.0
    c, e = torch.randn(400, 5, generator=g), torch.randn(400, 5, generator=g)
    same, _ = kernel_distance(c, e, subsets=5, subset_size=400)
    assert abs(same) < 0.05 * mean  # unbiased: about 0 for equal distributions

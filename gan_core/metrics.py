"""Evaluation metrics: Fréchet distance, class checks, CycleGAN translation errors.

All functions are pure: they read their arguments, run the models under ``torch.no_grad``
in batches, and return plain Python floats/ints. The classifier is expected in eval mode
(``DigitClassifier`` has no mode-dependent layers); CycleGAN's generators are switched to
eval for the measurement and restored afterwards. Statistics use float64 so that the
Fréchet distance between near-identical sets is not swamped by float32 rounding.

The feature space is a :class:`gan_core.classifier.DigitClassifier` (``clf.features``) that
this project trains itself on the dataset (:mod:`gan_core.judge`); numbers are comparable
only between runs judged by the same classifier (same snapshot and seed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gan_core.classifier import classifier_accuracy, module_device, predict
from gan_core.data import NUM_DIGIT_CLASSES

# A class counts as covered when it receives at least this share of the predictions: 1% is
# a tenth of its fair share among 10 classes, so a few stray misclassifications of a
# collapsed generator do not count as coverage, while a merely under-sampled class does.
MODE_COVERAGE_MIN_SHARE = 0.01
_BATCH_SIZE = 512


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules (and every submodule) in eval mode, restoring each flag on exit.

    Evaluating in train mode would let BatchNorm update its running statistics from the
    evaluation data; restoring the flags keeps the caller's training state untouched.
    """
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


@torch.no_grad()
def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, x: torch.Tensor
) -> torch.Tensor:
    """fn over x in batches on device; results concatenated on CPU.

    Outputs stay on the device until the end, so the host syncs once, not once per batch.
    """
    outs = [fn(x[i : i + _BATCH_SIZE].to(device)) for i in range(0, x.shape[0], _BATCH_SIZE)]
    return torch.cat(outs).cpu()


def _features(clf: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return _batched(clf.features, module_device(clf), images)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (as np.cov, N - 1 denominator), float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got {tuple(features.shape)}")
    f = features.detach().to(torch.float64)
    mu = f.mean(dim=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def _psd_eigenvalues_floor(vals: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues of a PSD matrix that are rounding noise (as numpy's pinv rcond).

    A covariance of N < D samples (few generated images) is singular; its null eigenvalues
    come out as +-1e-16 * largest, and their square roots (1e-8 each) would add up to an
    error of 1e-6 in the distance. Real eigenvalues that small are indistinguishable from
    that noise anyway.
    """
    tol = vals.shape[-1] * torch.finfo(vals.dtype).eps * vals.abs().max()
    return torch.where(vals > tol, vals, torch.zeros_like(vals))


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix via eigh."""
    vals, vecs = torch.linalg.eigh(matrix)
    return (vecs * _psd_eigenvalues_floor(vals).sqrt()) @ vecs.T


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) equals Tr((A S2 A)^(1/2)) with A = S1^(1/2), because S1 S2 is similar
    to A S2 A (= A^-1 (S1 S2) A when A is invertible, and by continuity otherwise). A S2 A
    is symmetric PSD, so symmetric eigensolvers suffice: no scipy, no complex sqrtm, and it
    runs on whatever device the statistics live on.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
            f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}"
        )
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2  # remove the asymmetry that rounding introduces
    tr_covmean = _psd_eigenvalues_floor(torch.linalg.eigvalsh(middle)).sqrt().sum()
    diff = mu1 - mu2
    d2 = diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_covmean
    return float(d2)


def frechet_distance_images(real: torch.Tensor, fake: torch.Tensor, clf: nn.Module) -> float:
    """Fréchet distance between real and fake images in clf's feature space."""
    mu_r, sigma_r = feature_statistics(_features(clf, real))
    mu_f, sigma_f = feature_statistics(_features(clf, fake))
    return frechet_distance(mu_r, sigma_r, mu_f, sigma_f)


def kernel_distance(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    subsets: int = 10,
    subset_size: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel (Inception) distance of Bińkowski et al. 2018: the unbiased estimate of the
    squared MMD with the cubic polynomial kernel k(a, b) = (a·b / d + 1)^3, averaged over
    random subsets (drawn from a seeded generator). Returns (mean, std over subsets).

    Unlike the Fréchet distance it is unbiased, so small sample counts compare fairly."""
    r = real_features.detach().to(torch.float64).cpu()
    f = fake_features.detach().to(torch.float64).cpu()
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(
            f"features must be [N, D] alike, got {tuple(r.shape)} and {tuple(f.shape)}"
        )
    m = min(subset_size, r.shape[0], f.shape[0])
    if m < 2:
        raise ValueError("kernel_distance needs at least 2 samples on each side")
    d = r.shape[1]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        a = r[torch.randperm(r.shape[0], generator=g)[:m]]
        b = f[torch.randperm(f.shape[0], generator=g)[:m]]
        k_aa = (a @ a.T / d + 1) ** 3
        k_bb = (b @ b.T / d + 1) ** 3
        k_ab = (a @ b.T / d + 1) ** 3
        off = m * (m - 1)
        mmd = (
            (k_aa.sum() - k_aa.diagonal().sum()) / off
            + (k_bb.sum() - k_bb.diagonal().sum()) / off
            - 2 * k_ab.mean()
        )
        values.append(float(mmd))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def distances(real: torch.Tensor, fake: torch.Tensor, clf: nn.Module, seed: int = 0) -> dict:
    """Fréchet distance (fd) and kernel distance (kd, kd_std) in clf's feature space."""
    fr, ff = _features(clf, real), _features(clf, fake)
    mu_r, sigma_r = feature_statistics(fr)
    mu_f, sigma_f = feature_statistics(ff)
    kd, kd_std = kernel_distance(fr, ff, seed=seed)
    return {"fd": frechet_distance(mu_r, sigma_r, mu_f, sigma_f), "kd": kd, "kd_std": kd_std}


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, clf: nn.Module) -> float:
    """Share of images that clf assigns to their label (cGAN: the conditioning label)."""
    return classifier_accuracy(clf, images, labels)


def mode_coverage(
    images: torch.Tensor, clf: nn.Module, num_classes: int = NUM_DIGIT_CLASSES
) -> dict:
    """How many classes a generator produces, judged by clf.

    classes_covered: classes receiving at least MODE_COVERAGE_MIN_SHARE (1%) of the
    predictions. class_entropy: entropy in nats of the predicted-class histogram; log(10)
    (about 2.303) for a uniform spread, 0 for a single class.
    """
    if images.shape[0] == 0:
        raise ValueError("mode_coverage needs at least one image")
    counts = torch.bincount(predict(clf, images), minlength=num_classes).double()
    share = counts / counts.sum()
    nonzero = share[share > 0]
    return {
        "classes_covered": int((share >= MODE_COVERAGE_MIN_SHARE).sum()),
        "class_entropy": float(-(nonzero * nonzero.log()).sum()),
    }


def cyclegan_metrics(
    G: nn.Module,
    F: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clf: nn.Module,
    x_truth: torch.Tensor | None = None,
    x_labels: torch.Tensor | None = None,
    y_labels: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """CycleGAN translation quality on held-out x and y. G: X -> Y and F: Y -> X.

    Always (no ground truth needed):
      cycle_error: mean |F(G(x)) - x| + mean |G(F(y)) - y| (L_cyc, per pixel);
      fd_g / kd_g: distance of G(x) to held-out y in clf's features; fd_f / kd_f: of F(y)
        to held-out x; fd_translation: their mean (the primary metric without truth).
    With ground truth T (x_truth = T(x), built-in pairs):
      truth_error: mean |G(x) - x_truth|; identity_truth_error: mean |x - x_truth|;
      truth_error_ratio: their ratio (0 perfect, 1 no better than doing nothing).
    With labels on x (and y) and a class judge: label_preservation: share of G(x) (and F(y))
      that clf classifies as their source's label.
    Returns (figures, G(x), F(y)); the translations are on the CPU, for further metrics.
    """
    if x_truth is not None and x.shape != x_truth.shape:
        raise ValueError("x and x_truth must describe the same images")
    with _eval_mode(G, F):
        g_x = _batched(G, module_device(G), x)
        f_g_x = _batched(F, module_device(F), g_x)
        f_y = _batched(F, module_device(F), y)
        g_f_y = _batched(G, module_device(G), f_y)
    x, y = x.cpu(), y.cpu()
    # Means in float64: summing ~1e5 pixel errors in float32 loses the digits that
    # separate close checkpoints.
    cycle = (f_g_x - x).abs().double().mean() + (g_f_y - y).abs().double().mean()
    out = {"cycle_error": float(cycle)}
    dg = distances(y, g_x, clf, seed)
    df = distances(x, f_y, clf, seed)
    out.update({f"{k}_g": v for k, v in dg.items()})
    out.update({f"{k}_f": v for k, v in df.items()})
    out["fd_translation"] = (dg["fd"] + df["fd"]) / 2
    if x_truth is not None:
        x_truth = x_truth.cpu()
        truth = (g_x - x_truth).abs().double().mean()
        identity = (x - x_truth).abs().double().mean()
        if identity == 0:
            raise ValueError("x equals x_truth: identity_truth_error is 0, the ratio is undefined")
        out.update(
            truth_error=float(truth),
            identity_truth_error=float(identity),
            truth_error_ratio=float(truth / identity),
        )
    if x_labels is not None:
        out["label_preservation"] = class_accuracy(g_x, x_labels, clf)
        if y_labels is not None:
            out["label_preservation_f"] = class_accuracy(f_y, y_labels, clf)
    return out, g_x, f_y

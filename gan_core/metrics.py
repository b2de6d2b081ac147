"""Evaluation metrics: Fréchet distance, class checks, CycleGAN translation errors.

All functions are pure: they read their arguments, run the models under ``torch.no_grad``
in batches, and return plain Python floats/ints. The classifier is expected in eval mode
(``DigitClassifier`` has no mode-dependent layers); CycleGAN's generators are switched to
eval for the measurement and restored afterwards. Statistics use float64 so that the
Fréchet distance between near-identical sets is not swamped by float32 rounding.

The feature space is :class:`gan_core.classifier.DigitClassifier` (``clf.features``), a
network this project trains itself; numbers are comparable only between runs that use the
same classifier (same image_size and seed).
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
    x_truth: torch.Tensor,
    x_labels: torch.Tensor,
    clf: nn.Module,
) -> dict:
    """CycleGAN translation quality against the known ground truth T (x_truth = T(x)).

    G: X -> Y and F: Y -> X. Returns
      cycle_error: mean |F(G(x)) - x| + mean |G(F(y)) - y| (L_cyc, per pixel);
      truth_error: mean |G(x) - x_truth|;
      identity_truth_error: mean |x - x_truth|, the error of doing nothing;
      truth_error_ratio: truth_error / identity_truth_error (0 perfect, 1 no better than
        identity; above 1 worse);
      label_preservation: share of G(x) that clf classifies as x_labels.
    """
    if x.shape != x_truth.shape or x.shape[0] != x_labels.shape[0]:
        raise ValueError("x, x_truth and x_labels must describe the same images")
    with _eval_mode(G, F):
        g_x = _batched(G, module_device(G), x)
        f_g_x = _batched(F, module_device(F), g_x)
        f_y = _batched(F, module_device(F), y)
        g_f_y = _batched(G, module_device(G), f_y)
    x, y, x_truth = x.cpu(), y.cpu(), x_truth.cpu()
    # Means in float64: summing ~1e5 pixel errors in float32 loses the digits that
    # separate close checkpoints.
    cycle = (f_g_x - x).abs().double().mean() + (g_f_y - y).abs().double().mean()
    truth = (g_x - x_truth).abs().double().mean()
    identity = (x - x_truth).abs().double().mean()
    if identity == 0:
        raise ValueError("x equals x_truth: identity_truth_error is 0, the ratio is undefined")
    return {
        "cycle_error": float(cycle),
        "truth_error": float(truth),
        "identity_truth_error": float(identity),
        "truth_error_ratio": float(truth / identity),
        "label_preservation": class_accuracy(g_x, x_labels, clf),
    }

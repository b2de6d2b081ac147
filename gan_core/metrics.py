"""Evaluation metrics: Fréchet distance, class checks, CycleGAN translation errors.

All functions are pure: they read their arguments, run the models under ``torch.no_grad``
in batches, and return plain Python floats/ints. The classifier is expected in eval mode
(``DigitClassifier`` has no mode-dependent layers); CycleGAN's generators are switched to
eval for the measurement and restored afterwards. Statistics use float64 so that the
Fréchet distance between near-identical sets is not swamped by float32 rounding.

Beside the distances between whole sets, figures that a collapsed generator cannot pass:
precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020) from
k-nearest-neighbour balls, the intra-class Fréchet distance and per-class coverage for
conditional samples, and a memorisation ratio (distance to the nearest training image).

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


def features(clf: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """clf's features [N, D] of images, batched, on the CPU."""
    return _features(clf, images)


def feature_distances(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    """Fréchet distance (fd) and kernel distance (kd, kd_std) between two feature sets."""
    mu_r, sigma_r = feature_statistics(real)
    mu_f, sigma_f = feature_statistics(fake)
    kd, kd_std = kernel_distance(real, fake, seed=seed)
    return {"fd": frechet_distance(mu_r, sigma_r, mu_f, sigma_f), "kd": kd, "kd_std": kd_std}


def distances(real: torch.Tensor, fake: torch.Tensor, clf: nn.Module, seed: int = 0) -> dict:
    """Fréchet distance (fd) and kernel distance (kd, kd_std) in clf's feature space."""
    return feature_distances(_features(clf, real), _features(clf, fake), seed)


# --- collapse and memorisation: figures that one image per mode cannot pass -----------------

# k of the k-nearest-neighbour balls, as Naeem et al. 2020 recommend (and Kynkäänniemi et
# al. 2019 use k = 3..5): smaller k makes the balls hug single points, larger k lets a few
# samples cover everything.
NEIGHBOURS = 5
# At most this many points a side enter a neighbour computation: the cost is quadratic, and
# a few thousand already pin the figures to within about a percent.
MAX_NEIGHBOUR_POINTS = 2000


def _subsample(points: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    if points.shape[0] <= limit:
        return points
    return points[torch.randperm(points.shape[0], generator=generator)[:limit]]


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The direct difference formula, not the matmul expansion: the expansion leaves
    # distances of ~1e-7 between identical points, and a copied image must be at 0.
    return torch.cdist(
        a.to(torch.float64), b.to(torch.float64), compute_mode="donot_use_mm_for_euclid_dist"
    )


def knn_radii(points: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (float64). Fewer than k + 1
    points: the farthest other point's distance, so small classes still get a ball."""
    n = points.shape[0]
    if n < 2:
        raise ValueError(f"k-NN radii need at least 2 points, got {n}")
    d = _pairwise(points, points)
    # Column 0 of each sorted row is the point itself (distance 0).
    return d.sort(dim=1).values[:, min(k, n - 1)]


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = NEIGHBOURS
) -> tuple[float, float]:
    """Improved precision and recall of Kynkäänniemi et al. 2019, on feature sets [N, D].

    Each set's manifold is the union of balls around its points reaching their k-th
    nearest neighbour. precision: share of fake points inside the real manifold (fidelity);
    recall: share of real points inside the fake manifold (diversity). Samples collapsed
    onto a few points have balls of radius 0, so their recall is about 0."""
    d = _pairwise(real, fake)
    precision = (d <= knn_radii(real, k)[:, None]).any(dim=0).double().mean()
    recall = (d <= knn_radii(fake, k)[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def density_coverage(
    real: torch.Tensor, fake: torch.Tensor, k: int = NEIGHBOURS
) -> tuple[float, float]:
    """Density and coverage of Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics
    for Generative Models"), on feature sets [N, D].

    Only real points get balls (to their k-th nearest real neighbour), so outliers among the
    samples cannot inflate the figures. density: mean number of real balls holding a fake
    point, over k (about 1 when the sets match; above 1 when samples crowd dense regions).
    coverage: share of real points whose ball holds at least one fake point (about
    1 - 2^-k = 0.97 for a second real set of the same size; near k / N for one point)."""
    d = _pairwise(real, fake)
    inside = d <= knn_radii(real, k)[:, None]
    density = inside.double().sum() / (k * fake.shape[0])
    coverage = inside.any(dim=1).double().mean()
    return float(density), float(coverage)


def fidelity_diversity(
    real: torch.Tensor, fake: torch.Tensor, k: int = NEIGHBOURS, seed: int = 0
) -> dict:
    """precision, recall (Kynkäänniemi et al.), density, coverage (Naeem et al.) of fake
    features against real ones, each side subsampled (seeded) to MAX_NEIGHBOUR_POINTS."""
    g = torch.Generator().manual_seed(seed)
    r = _subsample(real, MAX_NEIGHBOUR_POINTS, g)
    f = _subsample(fake, MAX_NEIGHBOUR_POINTS, g)
    precision, recall = precision_recall(r, f, k)
    density, coverage = density_coverage(r, f, k)
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def _by_class(
    real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(class, its real features, its fake features) for every class with at least 2 of each.

    Classes with fewer real images are left out, not guessed at: no spread can be measured
    from one image."""
    real_labels, fake_labels = real_labels.cpu(), fake_labels.cpu()
    for c in torch.unique(real_labels).tolist():
        r, f = real[real_labels == c], fake[fake_labels == c]
        if r.shape[0] >= 2 and f.shape[0] >= 2:
            yield int(c), r, f


def intra_class_frechet(
    real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor
) -> dict[int, float]:
    """Intra-class Fréchet distance (as in Miyato & Koyama 2018's intra-FID): per class c,
    the Fréchet distance between the features of real images of c and of samples made for c.

    A cGAN that draws one image per label has zero spread per class, so the real class's
    whole spread, Tr(S_c), stays in its distance: class accuracy cannot see this, this can.

    Small classes: with n < D images the covariance is singular and the estimate is biased
    upwards (the bias shrinks as 1/n), but it stays finite (the square root is taken over
    PSD eigenvalues). Figures are comparable between models evaluated on the same held-out
    images with the same number of samples per class, which is how evaluation compares
    them; they are not comparable across datasets or sample counts."""
    return {
        c: frechet_distance(*feature_statistics(r), *feature_statistics(f))
        for c, r, f in _by_class(real, real_labels, fake, fake_labels)
    }


def class_coverage(
    real: torch.Tensor,
    real_labels: torch.Tensor,
    fake: torch.Tensor,
    fake_labels: torch.Tensor,
    k: int = NEIGHBOURS,
) -> dict[int, float]:
    """Naeem et al.'s coverage per class: the share of real images of class c whose k-NN
    ball (among real images of c) holds a sample made for c. A class with at most k real
    images uses its farthest neighbour's distance as the radius (see knn_radii)."""
    return {
        c: density_coverage(r, f, k)[1]
        for c, r, f in _by_class(real, real_labels, fake, fake_labels)
    }


def nearest_distance(points: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Distance from each point to its nearest reference point (float64), in chunks so a large
    reference set does not need one [N, M] matrix."""
    return torch.cat(
        [
            _pairwise(points[i : i + 256], reference).min(dim=1).values
            for i in range(0, len(points), 256)
        ]
    )


def memorisation_ratio(
    fake: torch.Tensor, heldout: torch.Tensor, train: torch.Tensor, seed: int = 0
) -> float:
    """Median distance from a sample to its nearest training image, over the same for
    held-out real images (features [N, D]). About 1: samples are as far from the training set
    as unseen real images are; near 0: samples are (near-)copies of training images. Samples
    and held-out images are subsampled (seeded) to MAX_NEIGHBOUR_POINTS; every training
    image given is searched (the caller bounds how many)."""
    g = torch.Generator().manual_seed(seed)
    f = nearest_distance(_subsample(fake, MAX_NEIGHBOUR_POINTS, g), train).median()
    h = nearest_distance(_subsample(heldout, MAX_NEIGHBOUR_POINTS, g), train).median()
    if h == 0:
        raise ValueError("held-out images duplicate training images: the ratio is undefined")
    return float(f / h)


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
        to held-out x; fd_translation: their mean (the primary metric without truth);
      precision_g, recall_g, density_g, coverage_g (and _f): :func:`fidelity_diversity` of
        the translations against the target domain; coverage_translation and
        recall_translation: the means of G's and F's (a translation that maps every input
        to one image covers almost nothing of its target domain).
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
    fx, fy = _features(clf, x), _features(clf, y)
    fgx, ffy = _features(clf, g_x), _features(clf, f_y)
    dg = {**feature_distances(fy, fgx, seed), **fidelity_diversity(fy, fgx, seed=seed)}
    df = {**feature_distances(fx, ffy, seed), **fidelity_diversity(fx, ffy, seed=seed)}
    out.update({f"{k}_g": v for k, v in dg.items()})
    out.update({f"{k}_f": v for k, v in df.items()})
    for k in ("fd", "coverage", "recall"):
        out[f"{k}_translation"] = (dg[k] + df[k]) / 2
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

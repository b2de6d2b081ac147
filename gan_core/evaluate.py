"""Evaluation and sample grids for each family, on any dataset.

Every figure is measured under fixed seeds, so two models evaluated here are compared under
identical conditions. The judge (:mod:`gan_core.judge`, trained on the dataset's own train
split) gives the feature space of the Fréchet (``fd``) and kernel (``kd``) distances and,
when the data carries labels, the class-based figures. With ``eval.inception`` the standard
FID and KID (Inception-v3 features, :mod:`gan_core.inception`) are added.

:func:`primary_metric` names the family's headline figure for what the data supports; search,
promotion and reports all use it:

- gan: ``fid`` with eval.inception, else ``fd`` (lower is better);
- cgan: ``intra_fd``, the intra-class Fréchet distance (lower), behind a class-accuracy gate
  (:func:`gate_failure`): a cGAN whose samples do not carry their label fails whatever its
  distance;
- cyclegan: ``truth_error_ratio`` where ground truth exists (built-in pairs), else ``fid``
  of the translations with eval.inception, else ``fd_translation`` (lower).

Why not class accuracy for the cGAN: a generator that draws one image per label, the same
for every z, is classified right every time and scores 1.00. The intra-class distance keeps
the real class's spread in its figure, so that collapse scores far worse than real images.

Diversity figures beside the headline (:mod:`gan_core.metrics`): ``coverage`` and
``recall`` (plus ``precision`` and ``density``) of samples against held-out images, for every
family; the cGAN also gets ``class_coverage`` (coverage within each class, averaged), and
CycleGAN ``coverage_translation`` / ``recall_translation``. ``memorisation_ratio`` is added
when the training images are passed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gan_core import metrics
from gan_core.config import GanConfig
from gan_core.data import ImageSet, UnpairedSet, in_memory
from gan_core.judge import Judge
from gan_core.train import plain

# The most class rows a cGAN sample grid shows (one row per class); more are cut, and said so.
GRID_MAX_CLASSES = 10
# Per-class figures (intra_fd_<c>) are reported up to this many classes; beyond, only their
# mean and worst class, so a 100-class set does not flood the tracking server.
PER_CLASS_MAX = 10
# The cGAN gate: class accuracy must reach at least this share of the way from chance (1/K)
# to the judge's own accuracy on held-out real images. Halfway fails a generator that
# ignores its label (about chance) with margin, while a short run that has learnt the
# labels passes (measured on the digits: 0.65 after 400 steps, 0.96 after 700).
CLASS_ACCURACY_GATE = 0.5
# The most training images memorisation_ratio compares samples with, evenly spaced: bounds
# its cost on a large snapshot. Beyond it, a copy of a row left out is not found as a copy,
# so on larger sets the ratio understates memorisation.
MEMORISATION_TRAIN_ROWS = 8000


def primary_metric(cfg: GanConfig, has_truth: bool = False) -> tuple[str, str]:
    """(metric name, 'min' | 'max') for a config and whether its data has ground truth."""
    if cfg.family == "cgan":
        return "intra_fd", "min"
    if cfg.family == "cyclegan":
        if has_truth:
            return "truth_error_ratio", "min"
        return ("fid_translation" if cfg.eval.inception else "fd_translation"), "min"
    return ("fid" if cfg.eval.inception else "fd"), "min"


def class_accuracy_floor(num_classes: int, judge_accuracy: float) -> float:
    """The least class accuracy a cGAN passes the gate with (see CLASS_ACCURACY_GATE). A judge
    whose held-out accuracy was not measured (NaN) is taken as perfect: the stricter floor."""
    chance = 1.0 / num_classes
    ceiling = judge_accuracy if math.isfinite(judge_accuracy) else 1.0
    return chance + CLASS_ACCURACY_GATE * (ceiling - chance)


def gate_failure(
    figures: dict[str, float], metric: str | None = None, prefix: str = ""
) -> str | None:
    """Why figures fail the gate that comes before any ranking, in one line; None if they
    pass. The gate: the headline ``metric`` (if named) is a finite number, and a cGAN's
    class accuracy reaches its floor (figures without a floor have no class gate).
    ``prefix``: the figures' name prefix (``val_`` in a search's trial results)."""
    if metric is not None and not math.isfinite(figures.get(prefix + metric, math.nan)):
        return f"{metric} is not a finite number"
    accuracy = figures.get(prefix + "class_accuracy")
    floor = figures.get(prefix + "class_accuracy_floor")
    if accuracy is None or floor is None or accuracy >= floor:
        return None
    return (
        f"class_accuracy {accuracy:.3g} is below the gate {floor:.3g} (halfway from chance to "
        "the judge's own held-out accuracy): the samples do not carry their labels"
    )


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def sample(
    cfg: GanConfig, G: nn.Module, n: int, seed: int = 0, labels: Tensor | None = None
) -> Tensor:
    """n samples from G(z) (or G(z, y) for the cGAN), z drawn from a seeded CPU generator so
    the same seed gives the same z on any device. Returns [n, C, S, S] on CPU."""
    G = plain(G)
    was_training = G.training
    G.eval()
    try:
        dev = _device(G)
        z = torch.randn(n, cfg.model.z_dim, generator=torch.Generator().manual_seed(seed)).to(dev)
        if cfg.family == "cgan":
            if labels is None:
                labels = torch.arange(n) % cfg.model.num_classes
            out = torch.cat(
                [G(z[i : i + 512], labels[i : i + 512].to(dev)) for i in range(0, n, 512)]
            )
        else:
            out = torch.cat([G(z[i : i + 512]) for i in range(0, n, 512)])
        return out.float().cpu()
    finally:
        G.train(was_training)


def evaluate(
    cfg: GanConfig,
    models: dict[str, nn.Module],
    heldout: ImageSet | UnpairedSet,
    judge: Judge,
    seed: int = 0,
    inception: nn.Module | None = None,
    train: ImageSet | None = None,
) -> dict[str, float]:
    """The family's figures on held-out data (see the module notes); ``primary_metric``
    names the headline one. ``inception``: the FID feature extractor (eval.inception).
    ``train``: the training images (gan, cgan), for ``memorisation_ratio``."""
    if cfg.eval.inception and inception is None:
        raise ValueError("eval.inception is on but no Inception feature extractor was given")
    clf = judge.net
    if cfg.family == "cyclegan":
        if not isinstance(heldout, UnpairedSet):
            raise ValueError("CycleGAN is evaluated on two held-out domains")
        G, F = plain(models["G"]), plain(models["F"])
        labelled = judge.labelled and heldout.x.labels is not None
        out, g_x, f_y = metrics.cyclegan_metrics(
            G,
            F,
            heldout.x.images,
            heldout.y.images,
            clf,
            heldout.x_truth,
            heldout.x.labels if labelled else None,
            heldout.y.labels if labelled else None,
            seed,
        )
        if inception is not None:
            from gan_core.inception import fid_kid

            fg = fid_kid(heldout.y.images, g_x, inception)
            ff = fid_kid(heldout.x.images, f_y, inception)
            out.update({f"{k}_g": v for k, v in fg.items()})
            out.update({f"{k}_f": v for k, v in ff.items()})
            out["fid_translation"] = (fg["fid"] + ff["fid"]) / 2
        return out
    if not isinstance(heldout, ImageSet):
        raise ValueError(f"{cfg.family} is evaluated on one held-out set of images")
    labels = None
    n = cfg.eval.samples
    if cfg.family == "cgan":
        # At least two samples a class: a spread needs two points.
        n = max(n, 2 * cfg.model.num_classes)
        labels = torch.arange(n) % cfg.model.num_classes
    fake = sample(cfg, models["G"], n, seed, labels)
    return judge_samples(cfg, fake, labels, heldout, judge, seed, inception, train)


def judge_samples(
    cfg: GanConfig,
    fake: Tensor,
    labels: Tensor | None,
    heldout: ImageSet,
    judge: Judge,
    seed: int = 0,
    inception: nn.Module | None = None,
    train: ImageSet | None = None,
) -> dict[str, float]:
    """A gan's or cgan's figures for given samples (``labels``: the cGAN's conditioning
    labels), whatever made them: :func:`evaluate` passes its generator's, tests pass
    collapsed, copied or real images to check that the figures tell them apart."""
    clf = judge.net
    real_f, fake_f = metrics.features(clf, heldout.images), metrics.features(clf, fake)
    out = metrics.feature_distances(real_f, fake_f, seed)
    out.update(metrics.fidelity_diversity(real_f, fake_f, seed=seed))
    if judge.labelled:
        out.update(metrics.mode_coverage(fake, clf, judge.num_classes))
    if cfg.family == "cgan":
        if labels is None:
            raise ValueError("a cGAN's samples are judged with the labels they were made for")
        out.update(_class_figures(cfg, judge, fake, labels, real_f, fake_f, heldout))
    if train is not None:
        # Evenly spaced rows (every class of a class-ordered split), read from disk if stored.
        rows = in_memory(train, MEMORISATION_TRAIN_ROWS)
        train_f = metrics.features(clf, rows.images)
        out["memorisation_ratio"] = metrics.memorisation_ratio(fake_f, real_f, train_f, seed)
    if inception is not None:
        from gan_core.inception import fid_kid

        out.update(fid_kid(heldout.images, fake, inception))
    return out


def _class_figures(
    cfg: GanConfig,
    judge: Judge,
    fake: Tensor,
    labels: Tensor,
    real_f: Tensor,
    fake_f: Tensor,
    heldout: ImageSet,
) -> dict[str, float]:
    """The cGAN's per-class figures: intra_fd (mean over the held-out classes; per class up
    to PER_CLASS_MAX classes, and the worst), class_coverage (mean, and the worst class),
    and with a class judge class_accuracy and the gate's class_accuracy_floor."""
    out: dict[str, float] = {}
    if heldout.labels is not None:
        fd = metrics.intra_class_frechet(real_f, heldout.labels, fake_f, labels)
        cov = metrics.class_coverage(real_f, heldout.labels, fake_f, labels)
        # No class with two held-out images: NaN, which the gate refuses, not a made-up 0.
        out["intra_fd"] = sum(fd.values()) / len(fd) if fd else math.nan
        out["intra_fd_max"] = max(fd.values(), default=math.nan)
        out["class_coverage"] = sum(cov.values()) / len(cov) if cov else math.nan
        out["class_coverage_min"] = min(cov.values(), default=math.nan)
        if cfg.model.num_classes <= PER_CLASS_MAX:
            out.update({f"intra_fd_{c}": v for c, v in fd.items()})
    if judge.labelled:
        out["class_accuracy"] = metrics.class_accuracy(fake, labels, judge.net)
        out["class_accuracy_floor"] = class_accuracy_floor(
            cfg.model.num_classes, judge.heldout_accuracy
        )
    return out


@torch.no_grad()
def sample_grid(
    cfg: GanConfig, models: dict[str, nn.Module], heldout: ImageSet | UnpairedSet, seed: int = 0
) -> tuple[Tensor, int, str]:
    """Images for a picture a person can read, the number per row, and a caption.

    gan: 8x8 samples; cgan: one row per class (the first GRID_MAX_CLASSES classes), ten
    samples each; cyclegan: rows of held-out x, G(x), the true T(x) where known, then
    held-out y, F(y)."""
    if cfg.family == "gan":
        return sample(cfg, models["G"], 64, seed), 8, "64 samples G(z)"
    if cfg.family == "cgan":
        k = min(cfg.model.num_classes, GRID_MAX_CLASSES)
        labels = torch.arange(k).repeat_interleave(10)
        cut = "" if k == cfg.model.num_classes else f" (first {k} of {cfg.model.num_classes})"
        return sample(cfg, models["G"], 10 * k, seed, labels), 10, f"one row per class{cut}"
    if not isinstance(heldout, UnpairedSet):
        raise ValueError("CycleGAN's grid needs two held-out domains")
    G, F = plain(models["G"]), plain(models["F"])
    flags = (G.training, F.training)
    G.eval()
    F.eval()
    try:
        dev = _device(G)
        m = min(10, len(heldout.x), len(heldout.y))
        x, y = heldout.x.images[:m].to(dev), heldout.y.images[:m].to(dev)
        rows, names = [x, G(x)], ["x", "G(x)"]
        if heldout.x_truth is not None:
            rows.append(heldout.x_truth[:m].to(dev))
            names.append("T(x)")
        rows += [y, F(y)]
        names += ["y", "F(y)"]
        return torch.cat(rows).float().cpu(), m, "rows: " + ", ".join(names)
    finally:
        G.train(flags[0])
        F.train(flags[1])

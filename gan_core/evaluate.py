"""Evaluation and sample grids for each family, on any dataset.

Every figure is measured under fixed seeds, so two models evaluated here are compared under
identical conditions. The judge (:mod:`gan_core.judge`, trained on the dataset's own train
split) gives the feature space of the Fréchet (``fd``) and kernel (``kd``) distances and,
when the data carries labels, the class-based figures. With ``eval.inception`` the standard
FID and KID (Inception-v3 features, :mod:`gan_core.inception`) are added.

:func:`primary_metric` names the family's headline figure for what the data supports; search,
promotion and reports all use it:

- gan: ``fid`` with eval.inception, else ``fd`` (lower is better);
- cgan: ``class_accuracy``: samples of label y that the judge classifies as y (higher);
- cyclegan: ``truth_error_ratio`` where ground truth exists (built-in pairs), else ``fid``
  of the translations with eval.inception, else ``fd_translation`` (lower).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gan_core import metrics
from gan_core.config import GanConfig
from gan_core.data import ImageSet, UnpairedSet
from gan_core.judge import Judge
from gan_core.train import plain

# The most class rows a cGAN sample grid shows (one row per class); more are cut, and said so.
GRID_MAX_CLASSES = 10


def primary_metric(cfg: GanConfig, has_truth: bool = False) -> tuple[str, str]:
    """(metric name, 'min' | 'max') for a config and whether its data has ground truth."""
    if cfg.family == "cgan":
        return "class_accuracy", "max"
    if cfg.family == "cyclegan":
        if has_truth:
            return "truth_error_ratio", "min"
        return ("fid_translation" if cfg.eval.inception else "fd_translation"), "min"
    return ("fid" if cfg.eval.inception else "fd"), "min"


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
) -> dict[str, float]:
    """The family's figures on held-out data (see the module notes); ``primary_metric``
    names the headline one. ``inception``: the FID feature extractor (eval.inception)."""
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
    n = cfg.eval.samples
    labels = torch.arange(n) % cfg.model.num_classes if cfg.family == "cgan" else None
    fake = sample(cfg, models["G"], n, seed, labels)
    out = metrics.distances(heldout.images, fake, clf, seed)
    if judge.labelled:
        out.update(metrics.mode_coverage(fake, clf, judge.num_classes))
        if cfg.family == "cgan":
            out["class_accuracy"] = metrics.class_accuracy(fake, labels, clf)
    if inception is not None:
        from gan_core.inception import fid_kid

        out.update(fid_kid(heldout.images, fake, inception))
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

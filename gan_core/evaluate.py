"""End-of-run evaluation and sample grids for each family, on held-out data.

Every figure is measured under fixed seeds, so two models evaluated here are compared
under identical conditions. ``PRIMARY_METRIC`` names each family's headline quality
figure and whether lower or higher is better (used by search and promotion).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gan_core import metrics
from gan_core.config import GanConfig
from gan_core.data import NUM_DIGIT_CLASSES, ImageSet, UnpairedSet
from gan_core.train import plain

PRIMARY_METRIC: dict[str, tuple[str, str]] = {
    "gan": ("fd", "min"),
    "cgan": ("class_accuracy", "max"),
    "cyclegan": ("truth_error_ratio", "min"),
}


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
    clf: nn.Module,
    n: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """The family's quality figures on held-out data (see PRIMARY_METRIC)."""
    if cfg.family == "cyclegan":
        assert isinstance(heldout, UnpairedSet) and heldout.x_truth is not None
        G, F = plain(models["G"]), plain(models["F"])
        out = metrics.cyclegan_metrics(
            G, F, heldout.x.images, heldout.y.images, heldout.x_truth, heldout.x.labels, clf
        )
        return out
    assert isinstance(heldout, ImageSet)
    labels = torch.arange(n) % NUM_DIGIT_CLASSES
    fake = sample(cfg, models["G"], n, seed, labels if cfg.family == "cgan" else None)
    out = {"fd": metrics.frechet_distance_images(heldout.images, fake, clf)}
    out.update(metrics.mode_coverage(fake, clf))
    if cfg.family == "cgan":
        out["class_accuracy"] = metrics.class_accuracy(fake, labels, clf)
    # Reference point: the same distance between the held-out set and the training-set-like
    # noise floor is not available here, so report the real data's own coverage for scale.
    return out


@torch.no_grad()
def sample_grid(
    cfg: GanConfig, models: dict[str, nn.Module], heldout: ImageSet | UnpairedSet, seed: int = 0
) -> tuple[Tensor, int]:
    """Images for a picture a person can read, and the number per row.

    gan: 8x8 samples; cgan: one row per label 0..9, ten samples each; cyclegan: rows of
    held-out x, G(x), the true T(x), then held-out y, F(y)."""
    if cfg.family == "gan":
        return sample(cfg, models["G"], 64, seed), 8
    if cfg.family == "cgan":
        labels = torch.arange(10).repeat_interleave(10)
        return sample(cfg, models["G"], 100, seed, labels), 10
    assert isinstance(heldout, UnpairedSet)
    G, F = plain(models["G"]), plain(models["F"])
    flags = (G.training, F.training)
    G.eval()
    F.eval()
    try:
        dev = _device(G)
        x, y = heldout.x.images[:10].to(dev), heldout.y.images[:10].to(dev)
        rows = [x, G(x), heldout.x_truth[:10].to(dev), y, F(y)]
        return torch.cat(rows).float().cpu(), 10
    finally:
        G.train(flags[0])
        F.train(flags[1])

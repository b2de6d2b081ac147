"""The quality benchmark's own pieces: datasets it draws, the plain DCGAN anchor, and the
judge-free figures (thumbnail Fréchet distance, memorisation).

Datasets are drawn, not downloaded, and are the same for a given seed on any machine:

- ``shapes``: 32x32 RGB circles, squares and triangles (labels 0, 1, 2), each image with its
  own foreground and background colour (at least 0.5 apart in RGB, so the shape is always
  visible), size and position. Rows are stored class-interleaved (label = row % 3), so the
  first 3k rows hold k images of every class and a subset is a prefix.
- ``colours``: CycleGAN's unpaired pair. Domain X draws the shapes in a "day" scheme
  (light background, warm red-to-yellow foreground); domain Y in a "night" scheme: the
  background inverted and the foreground's hue turned half way round the colour wheel.
  The same geometry is drawn in both schemes, so T(x) is known for every held-out x;
  the X and Y training images come from disjoint geometry, as an unpaired set must.

Shapes are rendered at 4x the side and box-filtered down (anti-aliased edges), then stored
as 8-bit values read as [-1, 1] floats, as an ingested snapshot would be.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from gan_core.data import ImageSet, MinibatchSampler, UnpairedSet, to_unit
from gan_core.metrics import feature_statistics, frechet_distance

SHAPES = ("circle", "square", "triangle")
_SUPERSAMPLE = 4
_MIN_CONTRAST = 0.5
# Distinct streams per split (and per domain), so enlarging one split never changes another.
_STREAM = {"train": 1, "val": 2, "test": 3, "train-y": 4, "test-y": 5}


def _geometry(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    labels = np.arange(n) % len(SHAPES)
    # Half-extent in pixels: from a fifth to nearly half the side leaves room to move.
    r = rng.uniform(0.16, 0.34, n) * size
    # Triangles reach further up than their centre: the margin keeps every shape whole.
    ext = np.where(labels == 2, 1.3 * r, r) + 1.0
    cx = rng.uniform(ext, size - ext)
    cy = rng.uniform(ext, size - ext)
    return {"labels": labels, "r": r, "cx": cx, "cy": cy}


def _coverage(geo: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Share of each pixel the shape covers, [n, size, size] in [0, 1]."""
    s = size * _SUPERSAMPLE
    coords = (np.arange(s) + 0.5) / _SUPERSAMPLE
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    out = np.empty((len(geo["labels"]), size, size), dtype=np.float32)
    for i, (label, r, cx, cy) in enumerate(
        zip(geo["labels"], geo["r"], geo["cx"], geo["cy"], strict=True)
    ):
        dx, dy = xx - cx, yy - cy
        if label == 0:
            mask = dx * dx + dy * dy <= r * r
        elif label == 1:
            half = 0.85 * r  # about the circle's area
            mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        else:
            # Upward equilateral triangle, circumradius 1.3 r, centroid at (cx, cy).
            big = 1.3 * r
            k = math.sqrt(3)
            mask = (dy <= big / 2) & (k * dx - dy <= big) & (-k * dx - dy <= big)
        out[i] = mask.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    return out


def _contrasting_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    fg, bg = rng.random((n, 3)), rng.random((n, 3))
    while True:
        low = np.linalg.norm(fg - bg, axis=1) < _MIN_CONTRAST
        if not low.any():
            return fg, bg
        fg[low], bg[low] = rng.random((low.sum(), 3)), rng.random((low.sum(), 3))


def _paint(cover: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> torch.Tensor:
    m = cover[:, None]
    rgb = bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m
    return to_unit(torch.from_numpy(np.round(rgb * 255).astype(np.uint8)))


def make_shapes(split: str, per_class: int, seed: int = 0, size: int = 32) -> ImageSet:
    """Labelled shapes, per_class images of each class, float32 [-1, 1] [n, 3, size, size]."""
    rng = np.random.default_rng([seed, _STREAM[split]])
    n = per_class * len(SHAPES)
    geo = _geometry(rng, n, size)
    fg, bg = _contrasting_colours(rng, n)
    return ImageSet(_paint(_coverage(geo, size), fg, bg), torch.from_numpy(geo["labels"]))


def subset(data: ImageSet, fraction: float) -> ImageSet:
    """The first round(fraction x n) rows per class: stratified, and nested (10% in 25%)."""
    k = len(SHAPES) * max(1, round(fraction * len(data) / len(SHAPES)))
    return ImageSet(data.images[:k], data.labels[:k])


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0])[None] + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _scheme_colours(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "hue": rng.uniform(0.0, 1 / 6, n),  # red to yellow
        "sat": rng.uniform(0.7, 1.0, n),
        "val": rng.uniform(0.45, 0.85, n),
        "bg": rng.uniform(0.7, 1.0, (n, 3)),
    }


def _render_scheme(cover: np.ndarray, c: dict[str, np.ndarray], night: bool) -> torch.Tensor:
    hue = (c["hue"] + 0.5) % 1.0 if night else c["hue"]
    fg = _hsv_to_rgb(hue, c["sat"], c["val"])
    bg = 1.0 - c["bg"] if night else c["bg"]
    return _paint(cover, fg, bg)


def _scheme_set(split: str, per_class: int, seed: int, size: int, night: bool) -> ImageSet:
    rng = np.random.default_rng([seed, _STREAM[split]])
    n = per_class * len(SHAPES)
    geo = _geometry(rng, n, size)
    images = _render_scheme(_coverage(geo, size), _scheme_colours(rng, n), night)
    return ImageSet(images, torch.from_numpy(geo["labels"]))


def make_colours(split: str, per_class: int, seed: int = 0, size: int = 32) -> UnpairedSet:
    """The unpaired day/night pair, with x_truth = the night drawing of each day x."""
    rng = np.random.default_rng([seed, _STREAM[split]])
    n = per_class * len(SHAPES)
    geo = _geometry(rng, n, size)
    colours = _scheme_colours(rng, n)
    cover = _coverage(geo, size)
    labels = torch.from_numpy(geo["labels"])
    x = ImageSet(_render_scheme(cover, colours, night=False), labels)
    y = _scheme_set(f"{split}-y", per_class, seed, size, night=True)
    return UnpairedSet(x, y, _render_scheme(cover, colours, night=True))


# --- judge-free figures -----------------------------------------------------------------

THUMB_SIDE = 8


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """Images average-pooled to 8x8 and flattened: [n, C * 64] float64 (192 for RGB)."""
    x = images.detach().float().cpu()
    return nnf.adaptive_avg_pool2d(x, THUMB_SIDE).flatten(1).double()


def thumb_fd(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between two image sets in 8x8 colour-thumbnail space. No learned
    features, so no training choice can fit the measure instead of the data."""
    mu_r, s_r = feature_statistics(thumbnails(real))
    mu_f, s_f = feature_statistics(thumbnails(fake))
    return frechet_distance(mu_r, s_r, mu_f, s_f)


def intra_thumb_fd(
    real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor
) -> float:
    """Mean over classes of the thumbnail Fréchet distance within each class: a generator
    that paints the right colours but the wrong shape for a label is caught here."""
    classes = sorted(set(real_labels.tolist()))
    return float(
        np.mean(
            [thumb_fd(real[real_labels == c], fake[fake_labels == c]) for c in classes],
        )
    )


def _mean_nearest(query: torch.Tensor, bank: torch.Tensor, chunk: int = 256) -> float:
    q = query.detach().float().cpu().flatten(1)
    b = bank.detach().float().cpu().flatten(1)
    nearest = [torch.cdist(q[i : i + chunk], b).min(dim=1).values for i in range(0, len(q), chunk)]
    return float(torch.cat(nearest).double().mean())


def memorisation(train: torch.Tensor, heldout: torch.Tensor, fake: torch.Tensor) -> float:
    """Mean pixel L2 distance from each sample to its nearest training image, over the same
    for held-out real images: about 1 for a generator that makes new images as far from
    the training set as fresh data is, well below 1 for one that copies training images."""
    return _mean_nearest(fake, train) / _mean_nearest(heldout, train)


# --- the anchor: a plain DCGAN, as the tutorials write it -------------------------------


class AnchorG(nn.Module):
    """Radford et al.'s generator: (z, one-hot y) as a 1x1 map, a 4x4 transposed conv to
    4x4, then stride-2 transposed convs halving the channels up to the side, BN + ReLU
    between, tanh out. forward(z, y) with integer labels, as gan_core's sample() calls it."""

    def __init__(self, z_dim: int, ngf: int, num_classes: int = 0, channels: int = 3, size=32):
        super().__init__()
        self.num_classes = num_classes
        n_up = int(math.log2(size // 4))
        c = ngf * 2 ** (n_up - 1)
        layers = [nn.ConvTranspose2d(z_dim + num_classes, c, 4, 1, 0, bias=False)]
        layers += [nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False)]
            layers += [nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            z = torch.cat([z, nnf.one_hot(y, self.num_classes).to(z.dtype)], dim=1)
        return self.net(z[:, :, None, None])


class AnchorD(nn.Module):
    """Strided 4x4 convs doubling the channels down to 4x4, BN on all but the first,
    LeakyReLU 0.2, a 4x4 conv to one logit; the label enters as one-hot planes."""

    def __init__(self, ndf: int, num_classes: int = 0, channels: int = 3, size=32):
        super().__init__()
        self.num_classes = num_classes
        n_down = int(math.log2(size // 4))
        layers = [nn.Conv2d(channels + num_classes, ndf, 4, 2, 1, bias=False)]
        layers += [nn.LeakyReLU(0.2, True)]
        c = ndf
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False)]
            layers += [nn.BatchNorm2d(c * 2), nn.LeakyReLU(0.2, True)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            planes = nnf.one_hot(y, self.num_classes).to(x.dtype)[:, :, None, None]
            x = torch.cat([x, planes.expand(-1, -1, *x.shape[2:])], dim=1)
        return self.net(x).flatten()


def _dcgan_init(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Anchor:
    """The anchor's training state: G, D, their Adam (2e-4, betas 0.5/0.999), BCE, and the
    minibatch sampler and noise seeded as gan_core seeds them, so it sees the same data
    order. One iteration: D on a real and a fake minibatch, then G on the same fakes."""

    def __init__(
        self,
        data: ImageSet,
        z_dim: int,
        ngf: int,
        batch: int,
        seed: int,
        cond: bool,
        device: str = "cpu",
    ):
        self.data, self.z_dim, self.batch = data, z_dim, batch
        self.device = torch.device(device)
        k = int(data.labels.max()) + 1 if cond else 0
        channels, size = data.images.shape[1], data.images.shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.G = AnchorG(z_dim, ngf, k, channels, size)
            self.D = AnchorD(ngf, k, channels, size)
            self.G.apply(_dcgan_init)
            self.D.apply(_dcgan_init)
        self.G.to(self.device)
        self.D.to(self.device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), 2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), 2e-4, betas=(0.5, 0.999))
        self.sampler = MinibatchSampler(len(data), batch, seed * 1_000_003 + 1)
        self.noise = torch.Generator().manual_seed(seed * 7919)
        self.cond = cond
        self.step = 0

    def train(self, until: int) -> dict[str, float]:
        bce = nnf.binary_cross_entropy_with_logits
        self.G.train()
        self.D.train()
        out: dict[str, torch.Tensor] = {}
        while self.step < until:
            idx = self.sampler.next_indices()
            real = to_unit(self.data.images[idx]).to(self.device)
            y = self.data.labels[idx].to(self.device) if self.cond else None
            # z drawn on the CPU, as gan_core draws it: the same noise on any device.
            z = torch.randn(len(idx), self.z_dim, generator=self.noise).to(self.device)
            fake = self.G(z, y)
            real_logits, fake_logits = self.D(real, y), self.D(fake.detach(), y)
            loss_d = bce(real_logits, torch.ones_like(real_logits)) + bce(
                fake_logits, torch.zeros_like(fake_logits)
            )
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            g_logits = self.D(fake, y)
            loss_g = bce(g_logits, torch.ones_like(g_logits))
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            self.opt_g.step()
            self.step += 1
            out = {"loss_D": loss_d.detach(), "loss_G": loss_g.detach()}
        # Read once per call, not per step: a per-step .item() would sync a GPU every step.
        return {k: v.item() for k, v in out.items()}

"""D's augmentation: DiffAugment's ops (Zhao et al. 2020) with ADA's adaptive probability
(Karras et al. 2020).

Every image D sees, real or fake, in D's update and in G's, goes through the same family of
random transformations, so D cannot tell real from fake by them and G does not learn them
(they do not "leak" while p stays well below 1 for ops that are not invertible; ADA keeps
it where D stops overfitting). The ops are differentiable in the image: G's gradient flows
through them. Each op is applied to each image with probability p.

Costs and syncs: every random number is drawn on the CPU from the trainer's generator
(checkpointed, so a resumed run augments exactly as the uninterrupted one) and copied to the
device without a sync; p lives on the device, so neither applying nor adapting it ever
waits for the device. Images are [N, C, S, S] in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

# DiffAugment's constants: translation by up to 1/8 of the side, cutout of half the side.
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5
# Uniforms drawn per image per op: the gate (applied when < p), then the op's own draws.
_DRAWS = {"color": 4, "translation": 3, "cutout": 3}


def draw(ops: tuple[str, ...], n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """The uniforms for n images, whatever p is, so the random stream does not depend on p."""
    return {op: torch.rand(n, _DRAWS[op], generator=generator) for op in ops}


def _color(x: Tensor, r: Tensor, on: Tensor) -> Tensor:
    # DiffAugment's brightness (+U(-½, ½)), saturation (×U(0, 2) about the pixel's channel
    # mean) and contrast (×U(½, 1½) about the image mean); an image not selected gets the
    # identity factors.
    x = x + (r[:, 1] - 0.5).view(-1, 1, 1, 1) * on
    s = 1 + (r[:, 2] * 2 - 1).view(-1, 1, 1, 1) * on
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * s + mean
    c = 1 + (r[:, 3] - 0.5).view(-1, 1, 1, 1) * on
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def _translation(x: Tensor, r: Tensor, on: Tensor) -> Tensor:
    # Whole-pixel shifts in [-s, s] with zero padding, done as a nearest-neighbour resample at
    # exact pixel centres: exact, differentiable in x, and one kernel for the whole batch.
    n, _, h, w = x.shape
    s = int(min(h, w) * TRANSLATION_RATIO + 0.5)
    shift = (torch.floor(r[:, 1:3] * (2 * s + 1)) - s) * on.view(-1, 1)  # [n, 2] (dx, dy)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * shift[:, 0] / w
    theta[:, 1, 2] = -2 * shift[:, 1] / h
    grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
    return nnf.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _cutout(x: Tensor, r: Tensor, on: Tensor) -> Tensor:
    # A square of half the side, centred anywhere (clipped at the border), set to 0 (grey).
    _, _, h, w = x.shape
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    cy = torch.floor(r[:, 1] * (h + 1 - ch % 2)) - ch // 2
    cx = torch.floor(r[:, 2] * (w + 1 - cw % 2)) - cw // 2
    ys = torch.arange(h, device=x.device, dtype=x.dtype)
    xs = torch.arange(w, device=x.device, dtype=x.dtype)
    in_y = (ys >= cy[:, None]) & (ys < cy[:, None] + ch)  # [n, h]
    in_x = (xs >= cx[:, None]) & (xs < cx[:, None] + cw)  # [n, w]
    hole = (in_y[:, :, None] & in_x[:, None, :]).to(x.dtype) * on.view(-1, 1, 1)
    return x * (1 - hole[:, None])


OPS = {"color": _color, "translation": _translation, "cutout": _cutout}


def apply(x: Tensor, draws: dict[str, Tensor], p: Tensor | float) -> Tensor:
    """x augmented with the given draws: op by op, each image selected with probability p."""
    for op, r in draws.items():
        r = r.to(x.device, dtype=x.dtype, non_blocking=True)
        on = (r[:, 0] < p).to(x.dtype).view(-1, 1, 1, 1)
        x = OPS[op](x, r, on)
    return x


class Augmenter:
    """The trainer's augmentation state: ops, p (a device scalar) and ADA's controller.

    ADA: r_t = E[sign(D(x_real) - boundary)] over the last ``interval`` D updates; p moves by
    ±(m·interval)/ada_images towards keeping r_t at the target (D overconfident on the reals,
    r_t high: more augmentation). ``reduce`` (set at the edge under data parallelism) sums a
    tensor over ranks so every replica moves p alike."""

    def __init__(self, cfg, batch_size: int, boundary: float, device: torch.device, seed: int):
        a = cfg
        self.ops: tuple[str, ...] = a.ops
        self.ada, self.target, self.interval = a.ada, a.ada_target, a.ada_interval
        self.step_size = batch_size * a.ada_interval / a.ada_images
        self.boundary = boundary
        self.p = torch.tensor(0.0 if a.ada else a.p, device=device)
        self.generator = torch.Generator().manual_seed(seed)
        self._signs = torch.zeros(2, device=device)  # [sum of signs, count]
        self._updates = 0
        self.last_rt = torch.zeros((), device=device)  # the latest r_t, for the logs
        self.reduce = None

    @property
    def enabled(self) -> bool:
        return bool(self.ops)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.ops:
            return x
        return apply(x, draw(self.ops, x.shape[0], self.generator), self.p)

    def observe(self, real_scores: Tensor) -> None:
        """After a D update: accumulate sign(D(x_real)) and adapt p every ``interval``."""
        if not (self.ops and self.ada):
            return
        s = torch.sign(real_scores.detach().float() - self.boundary)
        self._signs += torch.stack([s.sum(), torch.tensor(float(s.numel()), device=s.device)])
        self._updates += 1
        if self._updates % self.interval:
            return
        signs = self._signs if self.reduce is None else self.reduce(self._signs.clone())
        rt = signs[0] / signs[1].clamp(min=1)
        self.p.copy_((self.p + torch.sign(rt - self.target) * self.step_size).clamp(0, 1))
        self.last_rt = rt
        self._signs.zero_()

    def state_dict(self) -> dict:
        """p is the same on every rank; the rest (``rank_state``) is each rank's own."""
        return {"p": self.p.detach().cpu(), "rt": self.last_rt.detach().cpu()}

    def rank_state(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "signs": self._signs.detach().cpu(),
            "updates": self._updates,
        }

    def load_state_dict(self, state: dict, rank_state: dict | None) -> None:
        self.p.copy_(state["p"])
        self.last_rt.copy_(state["rt"])
        if rank_state is not None:
            self.generator.set_state(rank_state["generator"])
            self._signs.copy_(rank_state["signs"])
            self._updates = int(rank_state["updates"])

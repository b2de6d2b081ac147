"""The loop's minibatches: the real-image augmentation of the papers (``data.augment``)
and the :class:`Feeder`, which draws minibatches in the samplers' order and reads the next
one ahead on a thread while the device works."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from gan_core.data import ImageSet, UnpairedSet, to_unit
from gan_core.state import Batch, TrainState, channels_last

# CycleGAN's jitter: images are enlarged to 286 px and randomly cropped back to 256 (Zhu et al.,
# appendix); the same ratio at any side.
JITTER_RATIO = 286 / 256


def draw_augment(m: int, size: int, mode: str, generator: torch.Generator) -> dict:
    """The random draws of :func:`augment` for m images of side size, in its order (crop
    offsets, then flips), so they can be drawn ahead of the pixels they apply to."""
    if mode == "none":
        return {}
    out: dict = {}
    if mode == "jitter_flip":
        big = max(size + 1, round(size * JITTER_RATIO))
        out["big"] = big
        out["offsets"] = torch.randint(0, big - size + 1, (m, 2), generator=generator).tolist()
    out["flip"] = torch.rand(m, generator=generator) < 0.5
    return out


def apply_augment(images: Tensor, mode: str, params: dict) -> Tensor:
    """:func:`augment` with its draws given (no randomness here)."""
    if mode == "none":
        return images
    size = images.shape[-1]
    if mode == "jitter_flip":
        big = params["big"]
        enlarged = torch.nn.functional.interpolate(
            images, size=(big, big), mode="bilinear", align_corners=False
        )
        images = torch.stack(
            [
                enlarged[i, :, t : t + size, u : u + size]
                for i, (t, u) in enumerate(params["offsets"])
            ]
        )
    m = images.shape[0]
    flip = params["flip"].to(images.device)
    return torch.where(flip.view(m, 1, 1, 1), images.flip(-1), images)


def augment(images: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """The papers' training-time augmentation of a real minibatch [m, C, S, S].

    'flip': each image mirrored left-right with probability 1/2; 'jitter_flip': enlarged by
    286/256 (bilinear), cropped back to S at a random offset per image, then flipped.
    Random draws come from ``generator`` (a sampler's, on the CPU), so they are part of the
    checkpointed stream and a resumed run augments exactly as the uninterrupted one."""
    params = draw_augment(images.shape[0], images.shape[-1], mode, generator)
    return apply_augment(images, mode, params)


def sources_of(data: ImageSet | UnpairedSet) -> dict[str, ImageSet]:
    """The sets minibatches are drawn from, by sampler key ("x" carries the labels)."""
    if isinstance(data, UnpairedSet):
        return {"x": data.x, "y": data.y}
    return {"x": data}


def to_device_layout(images: Tensor, state: TrainState) -> Tensor:
    if channels_last(state.cfg, state.device):
        return images.contiguous(memory_format=torch.channels_last)
    return images


class Feeder:
    """The loop's minibatches, in exactly the order the samplers draw them.

    Every random draw (indices, then the augmentation's crops and flips, per sampler) happens
    on the calling thread in the same order as drawing one minibatch at a time, so the
    stream is the same with or without reading ahead. When rows are stored on the host
    (:class:`StoredRows`), the next minibatch's rows are read on a background thread (into
    pinned memory for CUDA) while the device works on the current one; only the minibatch
    moves to the device, where it becomes [-1, 1] (:func:`to_unit`) and is augmented.

    ``next(ahead=False)`` leaves nothing drawn ahead: the loop asks for that before a log
    point, where callbacks may checkpoint, so saved sampler states are exactly those of the
    minibatches consumed and a resumed run draws what the uninterrupted one would have."""

    def __init__(self, state: TrainState, data: ImageSet | UnpairedSet):
        self.state = state
        self.sources = sources_of(data)
        self.stored = any(src.stored for src in self.sources.values())
        self.pin = self.stored and state.device.type == "cuda"
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[dict, Future] | None = None
        self.wait_s = 0.0
        """Time next() spent blocked on a read ahead (the device waiting on data)."""

    def _draw(self) -> dict:
        cfg = self.state.cfg
        draws = {}
        for key, src in self.sources.items():
            sampler = self.state.samplers[key]
            idx = sampler.next_indices()
            params = draw_augment(
                len(idx), src.images.shape[-1], cfg.data.augment, sampler.generator
            )
            draws[key] = (idx, params)
        return draws

    def _read(self, draws: dict) -> dict:
        out = {}
        for key, (idx, _) in draws.items():
            src = self.sources[key]
            if src.stored:
                rows = src.images.take(idx)
                if self.pin:
                    rows = rows.pin_memory()
            else:
                rows = src.images[idx.to(src.images.device)]
            labels = None if src.labels is None else src.labels[idx.to(src.labels.device)]
            out[key] = (rows, labels)
        return out

    def next(self, ahead: bool = True) -> Batch:
        if self._pending is not None:
            draws, future = self._pending
            self._pending = None
            t0 = time.perf_counter()
            raw = future.result()
            self.wait_s += time.perf_counter() - t0
        else:
            draws = self._draw()
            raw = self._read(draws)
        if ahead and self.stored:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="ganflow-feeder")
            following = self._draw()
            self._pending = (following, self._pool.submit(self._read, following))
        return self._finish(draws, raw)

    def _finish(self, draws: dict, raw: dict) -> Batch:
        state, mode = self.state, self.state.cfg.data.augment
        images = {}
        for key, (rows, _) in raw.items():
            x = to_unit(rows.to(state.device, non_blocking=self.pin))
            images[key] = to_device_layout(apply_augment(x, mode, draws[key][1]), state)
        labels = raw["x"][1]
        if labels is not None:
            labels = labels.to(state.device, non_blocking=self.pin)
        return Batch(images["x"], labels, images.get("y"))

    def close(self) -> None:
        """Stop reading ahead. A pending read is dropped but its draws are not undone: only
        a loop that failed leaves one (train() never does at a log point or at its end)."""
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

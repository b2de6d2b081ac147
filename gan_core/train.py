"""One training loop for every family: Algorithm 1 of Goodfellow et al. (2014).

    for each training iteration:
        repeat k times:                     # k = cfg.train.d_steps
            sample m noise samples and a fresh minibatch of m examples
            update D by ascending its stochastic gradient of V
        sample m fresh noise samples
        update G once (D frozen: its weights get no gradients)

A family (GAN, cGAN, CycleGAN) plugs in through ``FAMILIES``: it says how to draw a
minibatch and what one D update and one G update are. Everything random draws from
generators held in ``TrainState`` (the data samplers, the noise generator, the image
pools), so a checkpoint restores the exact stream and a resumed run reproduces the
uninterrupted one. Checkpoints hold only tensors and primitives and load with
``weights_only=True``: nothing is unpickled.

Code-to-paper names: G, F (CycleGAN's Y -> X generator), D, D_X, D_Y; k = d_steps;
m = batch_size; λ = lambda_cyc.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from gan_core import losses
from gan_core.config import GanConfig
from gan_core.data import ImageSet, MinibatchSampler, UnpairedSet, to_unit
from gan_core.models import build_models
from gan_core.overrides import from_flat_dict

Metrics = dict[str, Tensor]

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def plain(module: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel-style wrapper and a ``torch.compile``
    wrapper (``_orig_mod``), in any nesting, without importing either.

    G's update calls D through this: D is frozen there, so its gradients must not be
    all-reduced, and a DDP forward whose backward never reaches its parameters would leave
    the reducer waiting. Checkpoints and state dicts go through it too, so their keys are
    the plain module's (no ``module.`` or ``_orig_mod.`` prefixes) whatever the wrapping."""
    while True:
        # Not `a or b`: that asks the module's truth value, and a compiled wrapper of a module
        # without __len__ raises on it.
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _channels_last(cfg: GanConfig, device: torch.device) -> bool:
    """Whether the networks and the real batches use the NHWC layout: the convolutional
    families on CUDA, where cuDNN's fastest (tensor-core) convolution kernels are NHWC and an
    NCHW tensor is transposed around every convolution. Not on CPU (no measured gain there),
    never for the MLPs (their D flattens its input with a view, which needs NCHW)."""
    return device.type == "cuda" and (cfg.family == "cyclegan" or cfg.model.arch == "conv")


def _to_device_layout(images: Tensor, state: TrainState) -> Tensor:
    if _channels_last(state.cfg, state.device):
        return images.contiguous(memory_format=torch.channels_last)
    return images


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """D's parameters are not differentiated during G's update (saves D's weight gradients)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al.): D sees a mix of current
    and past fakes. Per image: while the pool fills, store and return it; after that, with
    probability ½ return a stored image and store the new one in its place."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.images: Tensor | None = None
        self.count = 0

    def query(self, images: Tensor) -> Tensor:
        if self.size == 0:
            return images
        if self.images is None:
            self.images = images.new_zeros((self.size, *images.shape[1:]))
        n = images.shape[0]
        # Decisions come from a CPU generator: no device sync, and they checkpoint cleanly.
        coins = torch.rand(n, generator=self.generator).tolist()
        slots = torch.randint(0, self.size, (n,), generator=self.generator).tolist()
        out = images.clone()
        for i in range(n):
            if self.count < self.size:
                self.images[self.count] = images[i]
                self.count += 1
            elif coins[i] > 0.5:
                j = slots[i]
                out[i] = self.images[j]
                self.images[j] = images[i]
        return out

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state(), "count": self.count}
        if self.images is not None:
            state["images"] = self.images
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.count = int(state["count"])
        self.images = state.get("images")


@dataclass
class Batch:
    """A minibatch of m rows. x: images (domain X for CycleGAN); labels: y for the cGAN;
    y: domain-Y images for CycleGAN."""

    x: Tensor
    labels: Tensor | None = None
    y: Tensor | None = None


@dataclass
class TrainState:
    cfg: GanConfig
    models: dict[str, nn.Module]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    samplers: dict[str, MinibatchSampler]
    noise: torch.Generator
    device: torch.device
    pools: dict[str, ImagePool] = field(default_factory=dict)
    step: int = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        # bf16 autocast of forward passes only; losses are computed on .float() outputs.
        enabled = autocast_enabled(self.cfg.train.precision, self.device.type)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def z(self, m: int) -> Tensor:
        return torch.randn(m, self.cfg.model.z_dim, generator=self.noise, device=self.device)


# --- families ---------------------------------------------------------------------------

# No generator forward is shared between D's and G's updates. Each of the k D updates draws
# fresh z and a fresh data minibatch (Algorithm 1), so no two of them see the same fakes; and
# G's update needs D *after* its k-th step, on fresh z, with a graph through G: the k-th D
# update's fakes were made under no_grad for other z, so reusing them would change the
# algorithm, not just its cost. What is exact and kept: D's update builds no graph through G.


class Family:
    """What a GAN variant plugs into the loop. Subclasses override the four hooks."""

    name: str = ""
    generators: tuple[str, ...] = ("G",)
    discriminators: tuple[str, ...] = ("D",)
    g_uses_data = False
    """Whether G's update needs a data minibatch (labels for the cGAN, real x, y for CycleGAN)."""

    def samplers(
        self, cfg: GanConfig, data, rank: int, world_size: int
    ) -> dict[str, MinibatchSampler]:
        seed = cfg.train.seed * 1_000_003 + 1
        return {"x": MinibatchSampler(len(data), cfg.train.batch_size, seed, rank, world_size)}

    def sources(self, data) -> dict[str, ImageSet]:
        """The sets minibatches are drawn from, by sampler key ("x" carries the labels)."""
        return {"x": data}

    def next_batch(self, state: TrainState, data) -> Batch:
        """One fresh minibatch, read now (the loop's :class:`Feeder` reads ahead)."""
        return Feeder(state, data).next(ahead=False)

    def d_step(self, state: TrainState, batch: Batch) -> Metrics:
        raise NotImplementedError

    def g_step(self, state: TrainState, batch: Batch | None) -> Metrics:
        raise NotImplementedError


class GanFamily(Family):
    """Goodfellow et al. (2014): G(z), D(x)."""

    name = "gan"

    def _labels(self, batch: Batch | None) -> Tensor | None:
        return None

    def d_step(self, state: TrainState, batch: Batch) -> Metrics:
        G, D = state.models["G"], state.models["D"]
        y = self._labels(batch)
        with torch.no_grad(), state.autocast():  # no graph through G in D's update
            fake = (
                G(state.z(batch.x.shape[0]), y) if y is not None else G(state.z(batch.x.shape[0]))
            )
        with state.autocast():
            real_logits = D(batch.x, y) if y is not None else D(batch.x)
            fake_logits = D(fake, y) if y is not None else D(fake)
        loss = losses.discriminator_loss(state.cfg.loss.gan_loss)(
            real_logits.float(), fake_logits.float()
        )
        state.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        state.opt_d.step()
        return {
            "loss_D": loss.detach(),
            "D_real": losses.d_probability(real_logits),
            "D_fake": losses.d_probability(fake_logits),
        }

    def g_step(self, state: TrainState, batch: Batch | None) -> Metrics:
        G, D = state.models["G"], plain(state.models["D"])
        y = self._labels(batch)
        m = state.cfg.train.batch_size
        with frozen(D), state.autocast():
            fake = G(state.z(m), y) if y is not None else G(state.z(m))
            fake_logits = D(fake, y) if y is not None else D(fake)
        loss = losses.generator_loss(state.cfg.loss.gan_loss, state.cfg.loss.g_loss)(
            fake_logits.float()
        )
        state.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        state.opt_g.step()
        return {"loss_G": loss.detach()}


class CganFamily(GanFamily):
    """Mirza & Osindero (2014): G(z, y), D(x, y), y ~ p_data(y) drawn with the minibatch."""

    name = "cgan"
    g_uses_data = True  # G's labels are the labels of a fresh data minibatch: y ~ p_data(y)

    def _labels(self, batch: Batch | None) -> Tensor | None:
        if batch is None or batch.labels is None:
            raise ValueError("the cgan family needs a labelled dataset")
        return batch.labels


class CycleGanFamily(Family):
    """Zhu et al. (2017): G: X -> Y, F: Y -> X, D_Y judges Y, D_X judges X."""

    name = "cyclegan"
    generators = ("G", "F")
    discriminators = ("D_X", "D_Y")
    g_uses_data = True

    def samplers(
        self, cfg: GanConfig, data: UnpairedSet, rank: int, world_size: int
    ) -> dict[str, MinibatchSampler]:
        seed = cfg.train.seed * 1_000_003
        m = cfg.train.batch_size
        return {
            "x": MinibatchSampler(len(data.x), m, seed + 1, rank, world_size),
            "y": MinibatchSampler(len(data.y), m, seed + 2, rank, world_size),
        }

    def sources(self, data: UnpairedSet) -> dict[str, ImageSet]:
        return {"x": data.x, "y": data.y}

    def d_step(self, state: TrainState, batch: Batch) -> Metrics:
        mo = state.models
        with torch.no_grad(), state.autocast():
            fake_y, fake_x = mo["G"](batch.x), mo["F"](batch.y)
        fake_y = state.pools["Y"].query(fake_y.float())
        fake_x = state.pools["X"].query(fake_x.float())
        d_loss = losses.discriminator_loss(state.cfg.loss.gan_loss)
        with state.autocast():
            scores = [mo["D_Y"](batch.y), mo["D_Y"](fake_y), mo["D_X"](batch.x), mo["D_X"](fake_x)]
        loss_d_y = d_loss(scores[0].float(), scores[1].float())
        loss_d_x = d_loss(scores[2].float(), scores[3].float())
        state.opt_d.zero_grad(set_to_none=True)
        (loss_d_x + loss_d_y).backward()
        state.opt_d.step()
        return {"loss_D_X": loss_d_x.detach(), "loss_D_Y": loss_d_y.detach()}

    def g_step(self, state: TrainState, batch: Batch | None) -> Metrics:
        assert batch is not None and batch.y is not None
        G, F = state.models["G"], state.models["F"]
        D_X, D_Y = plain(state.models["D_X"]), plain(state.models["D_Y"])
        lc = state.cfg.loss
        g_loss = losses.generator_loss(lc.gan_loss, lc.g_loss)
        x, y = batch.x, batch.y
        with frozen(D_X, D_Y), state.autocast():
            fake_y, fake_x = G(x), F(y)
            cycled_x, cycled_y = F(fake_y), G(fake_x)
            adv_g = g_loss(D_Y(fake_y).float())  # L_GAN(G, D_Y, X, Y), G's side
            adv_f = g_loss(D_X(fake_x).float())  # L_GAN(F, D_X, Y, X), F's side
            cyc = losses.cycle_consistency_loss(x, cycled_x.float(), y, cycled_y.float())
            total = adv_g + adv_f + lc.lambda_cyc * cyc
            metrics = {"loss_G": adv_g.detach(), "loss_F": adv_f.detach(), "loss_cyc": cyc.detach()}
            if lc.lambda_id > 0:
                idt = losses.identity_loss(x, F(x).float(), y, G(y).float())
                total = total + lc.lambda_cyc * lc.lambda_id * idt
                metrics["loss_idt"] = idt.detach()
        state.opt_g.zero_grad(set_to_none=True)
        total.backward()
        state.opt_g.step()
        metrics["loss_G_total"] = total.detach()
        return metrics


FAMILIES: dict[str, Family] = {f.name: f for f in (GanFamily(), CganFamily(), CycleGanFamily())}


# --- state, loop, checkpoints -----------------------------------------------------------


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
        self.sources = FAMILIES[state.cfg.family].sources(data)
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
            images[key] = _to_device_layout(apply_augment(x, mode, draws[key][1]), state)
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


def _lr_lambda(steps: int, decay_start: float) -> Callable[[int], float]:
    start = int(decay_start * steps)

    def factor(step: int) -> float:
        # Constant, then linear to 0 at the last step (CycleGAN's "linear" policy).
        return 1.0 - max(0, step - start) / max(1, steps - start)

    return factor


def init_state(
    cfg: GanConfig,
    data: ImageSet | UnpairedSet,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainState:
    """Fresh models, optimisers and RNG streams for cfg. ``wrap`` (e.g. a DDP wrapper)
    is applied to each network separately at the edge; models are built identically on
    every rank (same seed), so wrapped replicas start equal."""
    device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
    family = FAMILIES[cfg.family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        models = {k: v.to(device) for k, v in build_models(cfg).items()}
    if _channels_last(cfg, device):
        models = {k: v.to(memory_format=torch.channels_last) for k, v in models.items()}
    if cfg.train.compile:
        # Compiled before the DDP wrap, so plain() (what G's update calls D through, and what
        # state dicts are read from) sees through both. The wrapper shares the parameters, so
        # the optimisers below hold the same tensors. Compilation itself is lazy (first call).
        models = {k: torch.compile(v) for k, v in models.items()}
    if wrap is not None:
        models = {k: wrap(v) for k, v in models.items()}
    o = cfg.optim
    g_params = itertools.chain(*(models[k].parameters() for k in family.generators))
    d_params = itertools.chain(*(models[k].parameters() for k in family.discriminators))
    # The fused kernel updates every parameter in one pass: the default per-parameter CPU
    # path made Adam ~20% of the paper-sized MLP's iteration (measured: 14-17 -> 17-20 it/s;
    # conv and CycleGAN, where convolutions dominate, unchanged).
    fused = device.type in ("cpu", "cuda")
    opt_g = torch.optim.Adam(g_params, lr=o.lr_g, betas=(o.beta1, o.beta2), fused=fused)
    opt_d = torch.optim.Adam(d_params, lr=o.lr_d, betas=(o.beta1, o.beta2), fused=fused)
    factor = _lr_lambda(cfg.train.steps, o.decay_start)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (opt_g, opt_d)]
    noise = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + rank)
    pools = {}
    if cfg.family == "cyclegan":
        pools = {
            "X": ImagePool(cfg.train.pool_size, cfg.train.seed * 31 + 2 * rank + 1),
            "Y": ImagePool(cfg.train.pool_size, cfg.train.seed * 31 + 2 * rank + 2),
        }
    samplers = family.samplers(cfg, data, rank, world_size)
    return TrainState(cfg, models, opt_g, opt_d, schedulers, samplers, noise, device, pools)


def autocast_enabled(precision: str, device_type: str) -> bool:
    """bf16 autocast for train.precision: always for 'bf16', never for 'fp32', and for
    'auto' (nothing set) on CUDA only."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def accumulate_metrics(sums: dict[str, Tensor], counts: dict[str, int], metrics: Metrics) -> None:
    """Running sums of the step metrics, on the device (no host sync), always in fp32.

    Under bf16 autocast the monitored D(x) / D(G(z)) probabilities come out in bf16, and a
    bf16 running sum stops growing once its spacing exceeds the addend (at 256, adding 0.5
    does nothing): a long log interval would report a mean far too small."""
    for k, v in metrics.items():
        v = v.detach().float()
        sums[k] = sums[k] + v if k in sums else v.clone()
        counts[k] = counts.get(k, 0) + 1


def train(
    state: TrainState,
    data: ImageSet | UnpairedSet,
    callbacks: Iterable[Callable[[TrainState, dict[str, float]], None]] = (),
    until: int | None = None,
) -> TrainState:
    """Run Algorithm 1 from state.step to cfg.train.steps (or ``until``).

    Every log_every iterations the running means of the step metrics are synced to the
    host in one transfer and passed to each callback with the learning rate; between
    those points nothing forces a device sync."""
    cfg = state.cfg
    family = FAMILIES[cfg.family]
    end = cfg.train.steps if until is None else min(until, cfg.train.steps)
    for net in state.models.values():
        net.train()
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(metrics: Metrics) -> None:
        accumulate_metrics(sums, counts, metrics)

    # Minibatches per iteration: k for D, one more when G's update reads data.
    per_iteration = cfg.train.d_steps + (1 if family.g_uses_data else 0)
    feeder = Feeder(state, data)
    try:
        while state.step < end:
            after = state.step + 1
            # Nothing is drawn past a log point: callbacks there may checkpoint the samplers.
            last = after % cfg.train.log_every == 0 or after == end
            for j in range(cfg.train.d_steps):
                ahead = not (last and j == per_iteration - 1)
                accumulate(family.d_step(state, feeder.next(ahead)))
            accumulate(family.g_step(state, feeder.next(not last) if family.g_uses_data else None))
            for sched in state.schedulers:
                sched.step()
            state.step += 1
            if state.step % cfg.train.log_every == 0 or state.step == end:
                keys = list(sums)
                values = torch.stack(
                    [sums[k].float() / counts[k] for k in keys]
                ).tolist()  # the one host sync
                report = dict(zip(keys, values))
                report["lr_g"] = state.opt_g.param_groups[0]["lr"]
                if feeder.stored:
                    report["data_wait_s"] = feeder.wait_s
                    feeder.wait_s = 0.0
                sums.clear()
                counts.clear()
                for cb in callbacks:
                    cb(state, report)
    finally:
        feeder.close()
    return state


def state_dict(state: TrainState) -> dict:
    """Everything needed to resume exactly, as tensors and primitives only."""
    return {
        "step": state.step,
        "config": state.cfg.to_flat_dict(),
        "models": {k: plain(v).state_dict() for k, v in state.models.items()},
        "opt_g": state.opt_g.state_dict(),
        "opt_d": state.opt_d.state_dict(),
        "schedulers": [s.state_dict() for s in state.schedulers],
        "samplers": {k: s.state_dict() for k, s in state.samplers.items()},
        "noise": state.noise.get_state(),
        "pools": {k: p.state_dict() for k, p in state.pools.items()},
    }


def load_state_dict(state: TrainState, sd: dict) -> TrainState:
    for k, net in state.models.items():
        plain(net).load_state_dict(sd["models"][k])
    state.opt_g.load_state_dict(sd["opt_g"])
    state.opt_d.load_state_dict(sd["opt_d"])
    for sched, s in zip(state.schedulers, sd["schedulers"]):
        sched.load_state_dict(s)
    for k, s in sd["samplers"].items():
        state.samplers[k].load_state_dict(s)
    state.noise.set_state(sd["noise"])
    for k, p in sd["pools"].items():
        if "images" in p:
            p = {**p, "images": p["images"].to(state.device)}
        state.pools[k].load_state_dict(p)
    state.step = int(sd["step"])
    return state


def save_checkpoint(state: TrainState, path: str | os.PathLike) -> Path:
    """Atomic: written to a temporary file, then renamed, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state_dict(state), tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """weights_only=True: tensors and primitives only, never arbitrary pickled objects."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(
    path: str | os.PathLike,
    data: ImageSet | UnpairedSet,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap=None,
) -> TrainState:
    """Rebuild the state a checkpoint was saved from (its config is stored inside it)."""
    sd = read_checkpoint(path)
    cfg = from_flat_dict(sd["config"])
    state = init_state(cfg, data, device, rank, world_size, wrap)
    return load_state_dict(state, sd)

"""One training loop for every family: Algorithm 1 of Goodfellow et al. (2014).

    for each training iteration:
        repeat k times:                     # k = cfg.train.d_steps
            sample m noise samples and a fresh minibatch of m examples
            update D by ascending its stochastic gradient of V
        sample m fresh noise samples
        update G once (D frozen: its weights get no gradients)
        update the moving average of G's weights (train.ema_half_life)

A family (GAN, cGAN, CycleGAN, :mod:`gan_core.families`) says how to draw a minibatch and
what one D update and one G update are. Everything random draws from generators held in
``TrainState`` (the data samplers, the noise generator, the image pools, D's augmentation),
so a checkpoint restores the exact stream and a resumed run reproduces the uninterrupted
one. Checkpoints hold only tensors and primitives and load with ``weights_only=True``:
nothing is unpickled.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from gan_core import ema, losses
from gan_core.config import GanConfig
from gan_core.data import ImageSet, UnpairedSet
from gan_core.diffaug import Augmenter
from gan_core.families import FAMILIES, ImagePool
from gan_core.feed import Feeder, apply_augment, augment, draw_augment
from gan_core.models import build_models
from gan_core.overrides import from_flat_dict
from gan_core.state import (
    Batch,
    Metrics,
    TrainState,
    autocast_enabled,
    channels_last,
    emulated_bf16_warning,
    frozen,
    plain,
    resolve_device,
)

# Re-exported: the loop's public surface, one import for its callers.
__all__ = [
    "FAMILIES",
    "Batch",
    "Feeder",
    "TrainState",
    "apply_augment",
    "augment",
    "autocast_enabled",
    "draw_augment",
    "emulated_bf16_warning",
    "eval_models",
    "frozen",
    "init_state",
    "load_checkpoint",
    "plain",
    "read_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "state_dict",
    "train",
    "warm_start",
]

# state_dict keys that are each rank's own random streams (the rest is the same on every
# rank and rank 0 alone writes it).
PER_RANK_KEYS = ("samplers", "noise", "pools", "augment_rng")


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
    if channels_last(cfg, device):
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
    augmenter = Augmenter(
        cfg.augment,
        cfg.train.batch_size * world_size,
        losses.decision_boundary(cfg.loss.gan_loss),
        device,
        seed=cfg.train.seed * 104_729 + rank,
    )
    averages = {}
    if cfg.train.ema_half_life > 0:
        averages = {k: ema.make_average(plain(models[k])) for k in family.generators}
    return TrainState(
        cfg,
        models,
        opt_g,
        opt_d,
        schedulers,
        samplers,
        noise,
        device,
        augmenter,
        pools,
        averages,
        world_size,
    )


# Batches of m = 64 that the averages' batch-norm statistics are recomputed from.
STANDING_BATCHES = 16


def recalibrate(cfg: GanConfig, net: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """An averaged generator's batch-norm statistics recomputed for its weights (see
    :func:`gan_core.ema.standing_statistics`), from fixed noise (and labels cycling through
    the classes): deterministic. Generators without batch norm are returned as they are."""
    if cfg.family == "cyclegan" or not ema.has_batchnorm(net):
        return net
    g = torch.Generator().manual_seed(cfg.train.seed * 977 + 1)
    m, k = 64, cfg.model.num_classes if cfg.family == "cgan" else 0
    batches = (
        (torch.randn(m, cfg.model.z_dim, generator=g).to(device),)
        + ((torch.arange(m, device=device) % k,) if k else ())
        for _ in range(STANDING_BATCHES)
    )
    ema.standing_statistics(net, batches)
    return net


def eval_models(state: TrainState) -> dict[str, nn.Module]:
    """The plain networks to evaluate, sample from and register: the moving averages of the
    generators when train.ema_half_life > 0 (their batch-norm statistics recomputed:
    :func:`recalibrate`), else the live ones; the discriminators as they are. Shared with
    training, not copies: copy before changing them."""
    for avg in state.ema.values():
        recalibrate(state.cfg, avg, state.device)
    return {k: state.ema.get(k, plain(v)) for k, v in state.models.items()}


def _update_averages(state: TrainState) -> None:
    t, family = state.cfg.train, FAMILIES[state.cfg.family]
    if not state.ema:
        return
    images = t.batch_size * state.world_size
    beta = ema.decay(t.ema_half_life, t.ema_rampup, state.step * images, images)
    for k in family.generators:
        ema.update(state.ema[k], plain(state.models[k]), beta)


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
                state.d_updates += 1
            accumulate(family.g_step(state, feeder.next(not last) if family.g_uses_data else None))
            for sched in state.schedulers:
                sched.step()
            state.step += 1
            _update_averages(state)
            if state.step % cfg.train.log_every == 0 or state.step == end:
                keys = list(sums)
                means = [sums[k].float() / counts[k] for k in keys]
                if state.augment.enabled:
                    keys += ["augment_p", "ada_rt"]
                    means += [state.augment.p.float(), state.augment.last_rt.float()]
                values = torch.stack(means).tolist()  # the one host sync
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
        "ema": {k: avg.state_dict() for k, avg in state.ema.items()},
        "augment": state.augment.state_dict(),
        "augment_rng": state.augment.rank_state(),
        "d_updates": state.d_updates,
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
    # Checkpoints from before EMA and D's augmentation existed have neither: a resumed run
    # starts its average from the current G and p from its configured start.
    for k, avg in state.ema.items():
        avg.load_state_dict(
            sd["ema"][k] if k in sd.get("ema", {}) else plain(state.models[k]).state_dict()
        )
    if "augment" in sd:
        state.augment.load_state_dict(sd["augment"], sd.get("augment_rng"))
    state.step = int(sd["step"])
    state.d_updates = int(sd.get("d_updates", state.step * state.cfg.train.d_steps))
    return state


def set_hyperparameters(state: TrainState, cfg: GanConfig) -> TrainState:
    """Make ``cfg``'s loss/optim numbers and k the ones the loop uses from the next step on
    (PBT's explore, after :func:`load_state_dict` of the donor's state). The loop reads λ, the
    loss weights and k from ``state.cfg`` at every step; the learning rates live in the
    optimisers' param groups and the schedulers' ``base_lrs`` (the donor's, once loaded), so
    both are set: the new base rate times the schedule's factor at this step."""
    state.cfg = cfg
    o = cfg.optim
    pairs = ((state.opt_g, state.schedulers[0], o.lr_g), (state.opt_d, state.schedulers[1], o.lr_d))
    for opt, sched, lr in pairs:
        factor = sched.lr_lambdas[0](sched.last_epoch)
        sched.base_lrs = [lr] * len(opt.param_groups)
        for g in opt.param_groups:
            g["initial_lr"] = lr
            g["lr"] = lr * factor
            g["betas"] = (o.beta1, o.beta2)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    return state


def warm_start(state: TrainState, sd: dict) -> TrainState:
    """Start a fresh run from another run's networks: G and D, the optimisers' moments, the
    moving averages and, with ADA, the augmentation strength p come from ``sd`` (a
    checkpoint's state dict); the step, the learning rate schedule and the data, noise and
    augmentation draws stay this run's own, so fine-tuning on new data runs its own
    ``train.steps`` at its own learning rates. Shapes must match (a load_state_dict error
    names the first that does not)."""
    for k, net in state.models.items():
        plain(net).load_state_dict(sd["models"][k])
    for opt, key in ((state.opt_g, "opt_g"), (state.opt_d, "opt_d")):
        # Adam's per-parameter moments only: the saved param_groups carry the old run's
        # (possibly decayed) learning rates, which must not replace this run's.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(sd[key])
        for g, own in zip(opt.param_groups, groups):
            g.update(own)
    saved = sd.get("ema") or {}
    for k, avg in state.ema.items():
        avg.load_state_dict(saved.get(k) or plain(state.models[k]).state_dict())
    if state.cfg.augment.ada and "augment" in sd:
        # D was trained against reals augmented at the champion's p (ADA drives it near 1 on
        # small sets); p from its start again would change what D sees at once.
        state.augment.load_state_dict(sd["augment"], None)
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

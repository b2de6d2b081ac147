"""What one training run holds (:class:`TrainState`) and the small helpers every part of
the loop shares: the device, the unwrapped module, freezing D, bf16 autocast, the layout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gan_core.config import GanConfig
from gan_core.diffaug import Augmenter

Metrics = dict[str, Tensor]


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


def channels_last(cfg: GanConfig, device: torch.device) -> bool:
    """Whether the networks and the real batches use the NHWC layout: the convolutional
    families on CUDA, where cuDNN's fastest (tensor-core) convolution kernels are NHWC and an
    NCHW tensor is transposed around every convolution. Not on CPU (no measured gain there),
    never for the MLPs (their D flattens its input with a view, which needs NCHW)."""
    return device.type == "cuda" and (cfg.family == "cyclegan" or cfg.model.arch == "conv")


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


def autocast_enabled(precision: str, device_type: str) -> bool:
    """bf16 autocast for train.precision: always for 'bf16', never for 'fp32', and for
    'auto' (nothing set) on CUDA only."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def emulated_bf16_warning(precision: str, device_type: str) -> str | None:
    """One line for a run that asked for bf16 on a CPU that only emulates it (no AVX512-BF16
    or AMX), else None. There bf16 autocast is far slower than fp32 (the cGAN preset's steps:
    10x, measured on an AVX2 machine), which a user would otherwise only see as a slow run."""
    if device_type != "cpu" or not autocast_enabled(precision, device_type):
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no native path either
        native = False
    if native:
        return None
    return (
        f"train.precision=bf16 on a CPU without native bf16 "
        f"({torch.backends.cpu.get_cpu_capability()}): autocast is emulated (10x slower than fp32 "
        "measured on an AVX2 CPU); set train.precision=fp32 (or auto) for CPU runs"
    )


@dataclass
class Batch:
    """A minibatch of m rows. x: images (domain X for CycleGAN); labels: y for the cGAN;
    y: domain-Y images for CycleGAN."""

    x: Tensor
    labels: Tensor | None = None
    y: Tensor | None = None


@dataclass
class TrainState:
    """Networks, optimisers and every random stream of a run. ``ema``: the moving averages
    of the generators (empty when train.ema_half_life is 0); ``augment``: D's augmentation;
    ``world_size``: data-parallel replicas (the EMA counts images over all of them)."""

    cfg: GanConfig
    models: dict[str, nn.Module]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    samplers: dict
    noise: torch.Generator
    device: torch.device
    augment: Augmenter
    pools: dict = field(default_factory=dict)
    ema: dict[str, nn.Module] = field(default_factory=dict)
    world_size: int = 1
    step: int = 0
    d_updates: int = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        # bf16 autocast of forward passes only; losses are computed on .float() outputs.
        enabled = autocast_enabled(self.cfg.train.precision, self.device.type)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def z(self, m: int) -> Tensor:
        return torch.randn(m, self.cfg.model.z_dim, generator=self.noise, device=self.device)

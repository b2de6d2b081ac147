"""Training throughput and hardware utilisation of the one training loop.

``benchmark(cfg)`` times whole iterations of :func:`gan_core.train.train` (k D updates +
one G update, data sampling, optimiser steps and LR schedulers included), counts the
FLOPs of one iteration with ``torch.utils.flop_counter.FlopCounterMode`` and divides the
achieved rate by this machine's measured fp32 matmul rate (``measure_peak_flops``).

What the FLOP count covers: matmuls and convolutions (forward, and the backward ones
autograd actually runs), as FlopCounterMode counts them. Elementwise work (activations,
norms, losses, Adam) is not counted, so ``utilisation`` is the fraction of the matmul peak
spent on useful matmul/conv work; everything else shows up as lost utilisation. The peak
is fp32 even under ``train.precision='bf16'``.

Where the time goes (measured on the 2-core dev CPU, one intra-op thread, another job
running beside, so +-20%; step shares by timing ``d_step``/``g_step``/``opt.step``, op
shares from torch.profiler self time). MLP GAN, default preset (m = 64, 16x16, hidden
256): 3.9 ms per iteration, D step 50% / G step 47%, Adam 18% (on the default
per-parameter CPU path; training now uses the fused Adam), matmuls 52% of op time across
~1,050 aten ops;
cutting m to 2 only brings it to ~2.7 ms, so well over half is fixed per-op cost
(Python, dispatcher, autograd bookkeeping, ~2.5 us an op) and utilisation stays ~45%.
Paper MLP GAN (28x28, hidden 1200): 61 ms, D 58% / G 41%, matmuls 73%, but Adam was 20%:
4.9 M parameters of memory-bound elementwise work the FLOP count does not see;
utilisation ~60%. The fused Adam (one kernel for all parameters) took it from 14-17 to
17-20 iterations/s in alternating runs; MLP GAN +0-25% (noisy), conv and CycleGAN unchanged. Conv GAN/cGAN: 33-36 ms, G step ~60% (G's transposed convolutions are
~8x D's FLOPs and only the G step runs their backward), convolutions 74%, Adam 4%;
utilisation 77-87%. CycleGAN: 89 ms, G step 78% (six generator passes with backward,
identity loss included), convolutions 72% among ~7,500 ops an iteration (instance norms,
reflection pads, the image pool); utilisation ~52%.

Threads matter more than anything above on a shared machine: with two intra-op threads
while another process holds a core, small ops wait on a descheduled sibling and whole
configs ran 4-40x slower (cGAN MLP: 4.4 against 188 iterations/s), while a peak measured
during such a stall comes out low and puts utilisation above 1. Pass ``num_threads=1`` there.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from gan_core.config import GanConfig
from gan_core.data import load_builtin
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import TrainState, init_state, resolve_device, train

RESULT_KEYS = (
    "family",
    "arch",
    "batch_size",
    "image_size",
    "d_steps",
    "steps_per_s",
    "samples_per_s",
    "flops_per_step",
    "achieved_flops_per_s",
    "peak_flops_per_s",
    "utilisation",
)


@contextlib.contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it). On a shared CPU,
    more threads than free cores make every small op wait for a descheduled sibling."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: the clock must not be read before they finish.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(
    n: int = 1024,
    repeats: int = 5,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """This machine's matmul rate in FLOP/s for ``dtype``: the best of ``repeats`` timings of
    one n x n @ n x n matmul (2 n^3 FLOPs), after a warm-up that pays for allocation and
    thread-pool start-up. Best-of, not mean: other processes only ever slow it down."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def count_flops_per_step(state: TrainState, data) -> int:
    """FLOPs of one training iteration (k D updates + one G update) as FlopCounterMode
    counts them. Runs on a deep copy, so ``state`` (weights, optimiser moments, RNG
    streams, step) is left exactly as it was; the copy costs one extra set of weights."""
    probe = copy.deepcopy(state)
    # A finished state would run zero iterations; FLOPs do not depend on the step.
    probe.step = min(probe.step, probe.cfg.train.steps - 1)
    counter = FlopCounterMode(display=False)
    with counter, warnings.catch_warnings():
        # The copied optimisers lose the LR scheduler's step-tracking wrapper, so the
        # scheduler warns about call order; the order in train() is correct.
        warnings.filterwarnings("ignore", message=r".*optimizer\.step\(\)` has been overridden")
        train(probe, data, until=probe.step + 1)
    return int(counter.get_total_flops())


def _samples_per_step(cfg: GanConfig) -> int:
    # Each of the k D updates and the G update draws m fresh fakes from every generator
    # direction (G, and F for CycleGAN, counted once per direction as one "sample").
    return cfg.train.batch_size * (cfg.train.d_steps + 1)


def benchmark(
    cfg: GanConfig,
    data=None,
    warmup: int = 5,
    iters: int = 50,
    device: torch.device | str | None = None,
    *,
    peak_flops_per_s: float | None = None,
    num_threads: int | None = None,
) -> dict:
    """Time ``iters`` training iterations of ``cfg`` after ``warmup`` untimed ones.

    Returns a dict with exactly the keys in ``RESULT_KEYS``:

    - ``steps_per_s``: training iterations (k D updates + 1 G update) per second.
    - ``samples_per_s``: generated samples per second, ``steps_per_s * m * (k + 1)``:
      every D update and the G update each generate a fresh minibatch of m fakes (for
      CycleGAN, m translations in each direction count as m samples).
    - ``flops_per_step``: FLOPs of one iteration (see :func:`count_flops_per_step`).
    - ``achieved_flops_per_s`` = ``flops_per_step * steps_per_s``.
    - ``peak_flops_per_s``: the measured fp32 matmul rate (measured here unless given).
    - ``utilisation`` = achieved / peak.

    ``data`` defaults to ``load_builtin(cfg.data.dataset, cfg.data.image_size)``. The
    caller's cfg is not changed (configs are frozen); the run uses fresh state from
    ``init_state`` with ``log_every`` raised so the loop syncs to the host only once, at
    the end of each ``train`` call. ``num_threads`` sets torch's intra-op threads for the
    run (and for the peak, if measured here) and restores them after.
    """
    with _intra_op_threads(num_threads):
        return _benchmark(cfg, data, warmup, iters, device, peak_flops_per_s)


def _benchmark(
    cfg: GanConfig, data, warmup: int, iters: int, device, peak_flops_per_s: float | None
) -> dict:
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
    run_cfg = apply_overrides(cfg, {"train.steps": warmup + iters, "train.log_every": 10**9})
    if data is None:
        data = load_builtin(cfg.data.dataset, cfg.data.image_size)
    data = data.to(device)
    state = init_state(run_cfg, data, device)

    if cfg.train.compile:
        # Same arithmetic either way; counted uncompiled, since the counter's dispatch mode
        # and compiled graphs do not mix, and a deep copy of a compiled module is not one.
        plain_cfg = apply_overrides(run_cfg, {"train.compile": False})
        flops = count_flops_per_step(init_state(plain_cfg, data, device), data)
    else:
        flops = count_flops_per_step(state, data)
    if peak_flops_per_s is None:
        peak_flops_per_s = measure_peak_flops(device=device)

    train(state, data, until=warmup)
    _sync(device)
    t0 = time.perf_counter()
    train(state, data, until=warmup + iters)
    _sync(device)
    elapsed = time.perf_counter() - t0

    steps_per_s = iters / elapsed
    achieved = flops * steps_per_s
    return {
        "family": cfg.family,
        "arch": cfg.model.arch,
        "batch_size": cfg.train.batch_size,
        "image_size": cfg.data.image_size,
        "d_steps": cfg.train.d_steps,
        "steps_per_s": steps_per_s,
        "samples_per_s": steps_per_s * _samples_per_step(cfg),
        "flops_per_step": flops,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak_flops_per_s,
        "utilisation": achieved / peak_flops_per_s,
    }


def default_suite() -> list[GanConfig]:
    """Each family at its default architecture, the paper-sized MLP GAN, and the conv
    variants of the GAN and cGAN."""
    return [
        preset("gan"),
        preset("gan", "paper"),
        apply_overrides(preset("gan"), {"model.arch": "conv"}),
        preset("cgan"),
        apply_overrides(preset("cgan"), {"model.arch": "conv"}),
        preset("cyclegan"),
    ]


def run_suite(
    configs: Sequence[GanConfig] | None = None,
    warmup: int = 5,
    iters: int = 30,
    device: torch.device | str | None = None,
    progress: Callable[[dict], None] | None = None,
    num_threads: int | None = None,
) -> list[dict]:
    """Benchmark each config (default: ``default_suite()``); the peak is measured once,
    so every row's utilisation is relative to the same number. ``progress`` is called with
    each result as it is produced. ``num_threads`` as in :func:`benchmark` (the peak is
    measured under the same setting)."""
    configs = default_suite() if configs is None else list(configs)
    results: list[dict] = []
    peaks: dict[torch.device, float] = {}
    with _intra_op_threads(num_threads):
        for cfg in configs:
            dev = torch.device(device) if device is not None else resolve_device(cfg.train.device)
            if dev not in peaks:
                # More repeats than the default: every row is divided by this one number,
                # and on a shared machine a best-of-5 can miss the uncontended rate.
                peaks[dev] = measure_peak_flops(repeats=20, device=dev)
            result = benchmark(
                cfg, warmup=warmup, iters=iters, device=dev, peak_flops_per_s=peaks[dev]
            )
            results.append(result)
            if progress is not None:
                progress(result)
    return results


def format_table(results: Sequence[dict]) -> str:
    """Results as a fixed-width text table, one row per config."""
    header = [
        "family",
        "arch",
        "m",
        "size",
        "k",
        "steps/s",
        "samples/s",
        "MFLOP/step",
        "GFLOP/s",
        "peak GFLOP/s",
        "util",
    ]
    rows = [
        [
            r["family"],
            r["arch"],
            str(r["batch_size"]),
            str(r["image_size"]),
            str(r["d_steps"]),
            f"{r['steps_per_s']:.1f}",
            f"{r['samples_per_s']:.0f}",
            f"{r['flops_per_step'] / 1e6:.1f}",
            f"{r['achieved_flops_per_s'] / 1e9:.2f}",
            f"{r['peak_flops_per_s'] / 1e9:.1f}",
            f"{r['utilisation']:.1%}",
        ]
        for r in results
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


# --- the precision / compile suite: `ganflow bench [--device cuda] [--quick]` -------------

SUITE_KEYS = (
    "name",
    "device",
    "precision",
    "compile",
    *RESULT_KEYS,
    "peak_dtype",
    "mfu",
)


def synthetic_data(cfg: GanConfig, n: int = 256, seed: int = 0):
    """Random images (and labels) of cfg's shape: throughput does not depend on pixel values,
    and the papers' datasets (MNIST, LSUN, horse2zebra) are downloads this must not need."""
    from gan_core.data import ImageSet, UnpairedSet

    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    n = max(n, cfg.train.batch_size)

    def images() -> torch.Tensor:
        return torch.rand(n, d.channels, d.image_size, d.image_size, generator=g) * 2 - 1

    if cfg.family == "cyclegan":
        return UnpairedSet(ImageSet(images()), ImageSet(images()))
    classes = max(cfg.model.num_classes, 1)
    labels = torch.randint(0, classes, (n,), generator=g) if cfg.family == "cgan" else None
    return ImageSet(images(), labels)


def paper_configs(quick: bool = False) -> list[tuple[str, GanConfig]]:
    """The issue's configs: the paper MLP GAN (28 px, hidden 1200, m = 64), DCGAN at 64 px
    (m = 128, Radford et al.), CycleGAN at 256 px (batch 1 as in the paper, and 8).

    ``quick`` (CPU smoke runs): the same families at sizes a 2-core CPU gets through in
    seconds: DCGAN at 32 px m = 16, CycleGAN's 64 px architecture (6 ResNet blocks) at m = 1
    and 2. The paper MLP stays full size (~60 ms an iteration on CPU)."""
    if quick:
        return [
            ("mlp-gan-28", preset("gan", "paper")),
            ("dcgan-32", apply_overrides(preset("gan", image_size=32), {"train.batch_size": 16})),
            ("cyclegan-64-b1", preset("cyclegan", image_size=64)),
            (
                "cyclegan-64-b2",
                apply_overrides(preset("cyclegan", image_size=64), {"train.batch_size": 2}),
            ),
        ]
    return [
        ("mlp-gan-28", preset("gan", "paper")),
        ("dcgan-64", apply_overrides(preset("gan", image_size=64), {"train.batch_size": 128})),
        ("cyclegan-256-b1", preset("cyclegan", image_size=256)),
        (
            "cyclegan-256-b8",
            apply_overrides(preset("cyclegan", image_size=256), {"train.batch_size": 8}),
        ),
    ]


def measure_device_peak(device: torch.device | str) -> tuple[float, str]:
    """The denominator of MFU: the bf16 matmul peak on CUDA (8192^3, where tensor cores
    saturate). On CPU the better of the fp32 and bf16 rates at bench's usual 1024^3: CPUs
    with AMX / AVX512-BF16 run bf16 faster than fp32 (bf16 rows measured above 100% of the
    fp32 peak on the dev box), others emulate it slower, so neither alone bounds both rows."""
    device = torch.device(device)
    if device.type == "cuda":
        return measure_peak_flops(n=8192, repeats=10, device=device, dtype=torch.bfloat16), "bf16"
    fp32 = measure_peak_flops(repeats=20, device=device)
    # A small bf16 probe first: emulated bf16 runs near 1% of the fp32 rate on AVX2-only
    # CPUs (measured: 1.0 vs 91 GFLOP/s), where 20 full-size repeats alone took 45 s.
    if measure_peak_flops(n=256, repeats=2, device=device, dtype=torch.bfloat16) < fp32 / 2:
        return fp32, "fp32"
    bf16 = measure_peak_flops(repeats=20, device=device, dtype=torch.bfloat16)
    return (bf16, "bf16") if bf16 > fp32 else (fp32, "fp32")


def run_precision_suite(
    device: torch.device | str = "cpu",
    quick: bool = False,
    precisions: Sequence[str] = ("fp32", "bf16"),
    compile_modes: Sequence[bool] | None = None,
    warmup: int | None = None,
    iters: int | None = None,
    num_threads: int | None = None,
    progress: Callable[[dict], None] | None = None,
    configs: Sequence[tuple[str, GanConfig]] | None = None,
) -> list[dict]:
    """Each config of :func:`paper_configs` x precision x compile, on ``device``: one row
    each with ``SUITE_KEYS`` (samples/s, FLOPs per step, achieved FLOP/s, ``mfu`` against
    :func:`measure_device_peak`). ``compile_modes`` defaults to both on CUDA and off on CPU
    (inductor's CPU compile takes longer than a whole quick run). Warm-up defaults to 10
    iterations with compile (the first calls compile, and G's frozen-D pass recompiles
    once) and 3 without; ``iters`` to 20, or 3 in ``quick`` mode."""
    device = torch.device(device)
    if compile_modes is None:
        compile_modes = (False, True) if device.type == "cuda" else (False,)
    configs = paper_configs(quick) if configs is None else list(configs)
    iters = iters if iters is not None else (3 if quick else 20)
    rows: list[dict] = []
    with _intra_op_threads(num_threads):
        peak, peak_dtype = measure_device_peak(device)
        for name, base in configs:
            data = synthetic_data(base, n=64 if quick else 256)
            for compiled in compile_modes:
                for precision in precisions:
                    cfg = apply_overrides(
                        base,
                        {
                            "train.precision": precision,
                            "train.compile": compiled,
                            "train.device": device.type,
                        },
                    )
                    w = warmup if warmup is not None else (10 if compiled else (1 if quick else 3))
                    if device.type == "cuda":
                        torch._dynamo.reset()  # each row compiles its own graphs, cleanly
                    r = benchmark(
                        cfg, data, warmup=w, iters=iters, device=device, peak_flops_per_s=peak
                    )
                    row = {
                        "name": name,
                        "device": device.type,
                        "precision": precision,
                        "compile": compiled,
                        **r,
                        "peak_dtype": peak_dtype,
                        "mfu": r["utilisation"],
                    }
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    return rows


def format_precision_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """The suite's rows as a fixed-width text table, or a Markdown table."""
    header = ["config", "m", "prec", "compile", "samples/s", "GFLOP/step", "TFLOP/s", "MFU"]
    body = [
        [
            r["name"],
            str(r["batch_size"]),
            r["precision"],
            "yes" if r["compile"] else "no",
            f"{r['samples_per_s']:.1f}",
            f"{r['flops_per_step'] / 1e9:.3f}",
            f"{r['achieved_flops_per_s'] / 1e12:.4f}",
            f"{r['mfu']:.1%}",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *body])

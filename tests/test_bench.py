"""The benchmark: its result shape, its FLOP count against layer-size arithmetic, and that
measuring never disturbs the caller's training state or config."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import gan_core.families as families_mod
import gan_core.train as train_mod
from gan_core import bench
from gan_core.data import load_builtin
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import init_state, state_dict


def _mlp_gan_iteration_flops(cfg, d_weight_grads_in_g_step: bool = False) -> int:
    """One iteration of the MLP GAN from layer sizes.

    A linear layer in -> out on m rows costs 2*m*in*out forward (FlopCounterMode counts
    matmuls only), and in backward 2*m*in*out for its weight gradient plus 2*m*in*out for
    its input gradient, each only when autograd needs it:
    - D step: G runs forward only (no_grad). D runs forward and full backward on the real
      and the fake minibatch, except the input gradient of its first layer (neither x nor
      the no-grad fake requires grad).
    - G step: G forward, D forward, then backward through D for input gradients only (D is
      frozen: no weight gradients), then G's weight gradients and input gradients except
      for its first layer (z needs none).
    """
    m, k = cfg.train.batch_size, cfg.train.d_steps
    pixels = cfg.data.channels * cfg.data.image_size**2
    g_sizes = [cfg.model.z_dim] + [cfg.model.hidden] * cfg.model.mlp_layers + [pixels]
    d_sizes = [pixels] + [cfg.model.hidden] * cfg.model.mlp_layers + [1]
    lg = sum(a * b for a, b in zip(g_sizes, g_sizes[1:]))  # sum of in*out over G's layers
    ld = sum(a * b for a, b in zip(d_sizes, d_sizes[1:]))
    g_first, d_first = g_sizes[0] * g_sizes[1], d_sizes[0] * d_sizes[1]

    d_step = lg + 2 * (
        ld + ld + (ld - d_first)
    )  # G fwd; per D pass: fwd + weight grads + input grads
    g_step = (
        lg + ld + ld + lg + (lg - g_first)
    )  # G fwd, D fwd, D input grads, G weight + input grads
    if d_weight_grads_in_g_step:
        g_step += ld
    return 2 * m * (k * d_step + g_step)


@pytest.fixture(autouse=True)
def _one_thread():
    # The ops here are tiny; with two intra-op threads on a shared 2-core box they wait on
    # each other's descheduled sibling and run up to 50x slower (measured). Restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits16():
    return load_builtin("builtin:digits", 16)


@pytest.mark.parametrize("k", [1, 2])
def test_mlp_gan_flops_match_layer_arithmetic(digits16, k):
    cfg = apply_overrides(preset("gan", "tiny"), {"train.d_steps": k})
    state = init_state(cfg, digits16, "cpu")
    assert bench.count_flops_per_step(state, digits16) == _mlp_gan_iteration_flops(cfg)


def test_flop_count_sees_d_weight_grads_in_g_step(digits16, monkeypatch):
    # If D were not frozen in G's update, its weight gradients would be computed and thrown
    # away; the counter must see that (so the test above guards against it).
    monkeypatch.setattr(families_mod, "frozen", lambda *modules: contextlib.nullcontext())
    cfg = preset("gan", "tiny")
    state = init_state(cfg, digits16, "cpu")
    got = bench.count_flops_per_step(state, digits16)
    assert got == _mlp_gan_iteration_flops(cfg, d_weight_grads_in_g_step=True)
    assert got > _mlp_gan_iteration_flops(cfg)


def test_count_flops_leaves_state_untouched(digits16):
    cfg = preset("gan", "tiny")
    state = init_state(cfg, digits16, "cpu")
    train_mod.train(state, digits16, until=2)  # non-trivial optimiser moments and streams
    before = state_dict(state)
    bench.count_flops_per_step(state, digits16)
    after = state_dict(state)
    assert state.step == 2 and after.pop("config") == before.pop("config")
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_peak_flops_is_a_plausible_rate():
    peak = bench.measure_peak_flops(n=256, repeats=3)
    assert math.isfinite(peak) and 1e8 < peak < 1e15


@pytest.mark.parametrize(
    ("rates", "want", "full_bf16"),
    [
        # bf16 emulated (AVX2 only): the small probe decides, no full-size bf16 measurement.
        ({"fp32": 9e10, "bf16_probe": 1e9, "bf16": 1e9}, (9e10, "fp32"), False),
        # native bf16 (AMX, AVX-512 BF16): measured at full size, the faster rate wins.
        ({"fp32": 9e10, "bf16_probe": 1e11, "bf16": 2e11}, (2e11, "bf16"), True),
        ({"fp32": 9e10, "bf16_probe": 8e10, "bf16": 7e10}, (9e10, "fp32"), True),
    ],
)
def test_cpu_peak_probes_bf16_before_measuring_it(monkeypatch, rates, want, full_bf16):
    calls = []

    def fake_peak(n=1024, repeats=5, device="cpu", dtype=torch.float32):
        calls.append((n, dtype))
        if dtype == torch.float32:
            return rates["fp32"]
        return rates["bf16_probe"] if n < 1024 else rates["bf16"]

    monkeypatch.setattr(bench, "measure_peak_flops", fake_peak)
    assert bench.measure_device_peak("cpu") == want
    assert ((1024, torch.bfloat16) in calls) == full_bf16
    assert calls[1] == (256, torch.bfloat16)  # the probe, right after fp32


@pytest.mark.parametrize("family", ["gan", "cgan", "cyclegan"])
def test_benchmark_result_shape(family):
    cfg = preset(family, "tiny")
    flat_before = cfg.to_flat_dict()
    rng_before = torch.random.get_rng_state()
    r = bench.benchmark(cfg, warmup=1, iters=3, device="cpu", peak_flops_per_s=1e10)
    assert set(r) == set(bench.RESULT_KEYS)
    assert (r["family"], r["arch"]) == (family, cfg.model.arch)
    assert (r["batch_size"], r["image_size"], r["d_steps"]) == (8, 16, 1)
    for key in (
        "steps_per_s",
        "samples_per_s",
        "flops_per_step",
        "achieved_flops_per_s",
        "peak_flops_per_s",
        "utilisation",
    ):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert isinstance(r["flops_per_step"], int)
    assert r["samples_per_s"] == pytest.approx(r["steps_per_s"] * 8 * 2)
    assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] * r["steps_per_s"])
    assert r["utilisation"] == pytest.approx(r["achieved_flops_per_s"] / 1e10)
    # The caller's config and the global RNG stream are untouched.
    assert cfg.to_flat_dict() == flat_before
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_run_suite_measures_peak_once(monkeypatch):
    calls = []

    def fake_peak(**kwargs):
        calls.append(kwargs)
        return 2e10

    monkeypatch.setattr(bench, "measure_peak_flops", fake_peak)
    configs = [
        preset("gan", "tiny"),
        apply_overrides(preset("gan", "tiny"), {"model.arch": "conv"}),
    ]
    seen = []
    results = bench.run_suite(configs, warmup=0, iters=2, device="cpu", progress=seen.append)
    assert len(calls) == 1
    assert seen == results and [r["arch"] for r in results] == ["mlp", "conv"]
    assert all(r["peak_flops_per_s"] == 2e10 for r in results)
    assert "mlp" in bench.format_table(results)


def test_default_suite_covers_families_and_archs():
    suite = bench.default_suite()
    kinds = {(c.family, c.model.arch, c.data.image_size) for c in suite}
    assert kinds == {
        ("gan", "mlp", 16),
        ("gan", "mlp", 28),
        ("gan", "conv", 16),
        ("cgan", "mlp", 16),
        ("cgan", "conv", 16),
        ("cyclegan", "resnet", 16),
    }
    paper = next(c for c in suite if c.data.image_size == 28)
    assert (paper.model.hidden, paper.train.batch_size) == (1200, 64)


def test_precision_suite_quick_cpu_rows():
    # One tiny config through the suite's machinery (the quick configs themselves take ~20 s:
    # `ganflow bench --quick`, and the gpu-check dry test, run them).
    configs = [("gan-tiny", preset("gan", "tiny")), ("cyclegan-tiny", preset("cyclegan", "tiny"))]
    rows = bench.run_precision_suite("cpu", quick=True, configs=configs, iters=2)
    assert [(r["name"], r["precision"], r["compile"]) for r in rows] == [
        ("gan-tiny", "fp32", False),
        ("gan-tiny", "bf16", False),
        ("cyclegan-tiny", "fp32", False),
        ("cyclegan-tiny", "bf16", False),
    ]
    for r in rows:
        assert set(r) == set(bench.SUITE_KEYS)
        assert r["device"] == "cpu" and r["peak_dtype"] in ("fp32", "bf16")
        for key in ("samples_per_s", "flops_per_step", "achieved_flops_per_s", "mfu"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / r["peak_flops_per_s"])
    # Same arithmetic in either precision: FLOPs per step do not depend on the dtype.
    assert rows[0]["flops_per_step"] == rows[1]["flops_per_step"]
    table = bench.format_precision_table(rows, markdown=True)
    assert table.count("\n") == 1 + len(rows) and "| gan-tiny | 8 | bf16 | no |" in table


def test_paper_configs_sizes():
    full = dict(bench.paper_configs())
    assert (full["dcgan-64"].model.arch, full["dcgan-64"].data.image_size) == ("conv", 64)
    assert full["dcgan-64"].train.batch_size == 128
    assert full["mlp-gan-28"].model.hidden == 1200
    b1, b8 = full["cyclegan-256-b1"], full["cyclegan-256-b8"]
    assert (b1.data.image_size, b1.train.batch_size, b8.train.batch_size) == (256, 1, 8)
    assert b1.model.n_res_blocks == 9
    quick = dict(bench.paper_configs(quick=True))
    assert max(c.data.image_size for c in quick.values()) <= 64


def test_compiled_state_dicts_use_plain_keys(digits16):
    # torch.compile wraps each network (lazily: nothing compiles until the first call, which
    # this test never makes); checkpoints must still hold the plain module's keys, so a
    # compiled run's checkpoint loads into an uncompiled state and back.
    cfg = apply_overrides(preset("gan", "tiny"), {"train.compile": True})
    state = init_state(cfg, digits16, "cpu")
    assert all(hasattr(m, "_orig_mod") for m in state.models.values())
    plain_state = init_state(preset("gan", "tiny"), digits16, "cpu")
    sd = state_dict(state)
    assert sd["models"].keys() == state_dict(plain_state)["models"].keys()
    for k, weights in sd["models"].items():
        assert weights.keys() == plain_state.models[k].state_dict().keys()
    train_mod.load_state_dict(plain_state, sd)
    # plain() sees through DDP-style wrappers around compiled modules too.
    wrapper = torch.nn.Module()
    wrapper.module = state.models["D"]
    assert train_mod.plain(wrapper) is state.models["D"]._orig_mod


def test_compile_switch_is_a_bool():
    from gan_core.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="train.compile"):
        TrainConfig(compile=1)
    assert apply_overrides(preset("gan", "tiny"), ["train.compile=true"]).train.compile is True

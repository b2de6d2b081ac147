"""Mixed precision that does what it says: the user's train.precision from any source is
kept, 'auto' is bf16 on CUDA only, monitored statistics are summed in fp32, and the bf16 path
(bf16 autocast runs on CPU too) trains finitely, close to fp32, with fp32 state and exact
resume. Also: fractional GPUs with NCCL are refused, SyncBatchNorm is applied when asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gan_core.data import load_builtin
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import (
    accumulate_metrics,
    autocast_enabled,
    init_state,
    load_state_dict,
    state_dict,
    train,
)


def test_auto_is_bf16_on_cuda_only_and_a_set_value_is_kept():
    assert autocast_enabled("auto", "cuda") and not autocast_enabled("auto", "cpu")
    assert not autocast_enabled("fp32", "cuda")  # the old driver switched this to bf16
    assert autocast_enabled("bf16", "cpu") and autocast_enabled("bf16", "cuda")
    assert preset("gan").train.precision == "auto"


def test_precision_from_a_config_file_is_kept(tmp_path):
    """`train: {precision: fp32}` in --config used to be rewritten to bf16 on GPUs (only
    --set was looked at); now nothing downstream rewrites it."""
    from flows.orchestration.inputs import config_and_snapshot
    from flows.train.spec import TrainRequest

    f = tmp_path / "c.yaml"
    f.write_text("train:\n  precision: fp32\n")
    cfg, _ = config_and_snapshot("gan", str(f), [])
    assert cfg.train.precision == "fp32"
    assert "auto_bf16" not in TrainRequest.__dataclass_fields__


def test_bf16_statistics_are_summed_in_fp32():
    """4,000 bf16 values of 0.5: a bf16 running sum stalls at 256 (its spacing there is 2),
    which reported a mean of 0.064 instead of 0.5."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for _ in range(4000):
        accumulate_metrics(sums, counts, {"D_real": torch.tensor(0.5, dtype=torch.bfloat16)})
    assert sums["D_real"].dtype == torch.float32
    assert (sums["D_real"] / counts["D_real"]).item() == pytest.approx(0.5, abs=1e-6)


@pytest.fixture(scope="module")
def digits():
    return load_builtin("builtin:digits", 16, "train")


def _run(cfg, data, steps=None):
    history = []
    with torch.random.fork_rng(devices=[]):
        state = init_state(cfg, data, "cpu")
        train(state, data, callbacks=[lambda s, m: history.append(m)], until=steps)
    return state, history


@pytest.mark.parametrize("family", ["gan", "cgan"])
def test_bf16_trains_close_to_fp32_with_fp32_state(family, digits):
    base = apply_overrides(
        preset(family, "tiny"), {"train.steps": 60, "train.log_every": 20, "train.seed": 3}
    )
    fp32, h32 = _run(apply_overrides(base, {"train.precision": "fp32"}), digits)
    bf16, h16 = _run(apply_overrides(base, {"train.precision": "bf16"}), digits)
    for a, b in zip(h32, h16):
        for k in ("loss_D", "loss_G"):
            assert torch.isfinite(torch.tensor(b[k]))
            assert abs(a[k] - b[k]) < 0.1 * max(1.0, abs(a[k])), (k, a[k], b[k])
    for net in bf16.models.values():  # autocast computes in bf16, the weights stay fp32
        assert all(p.dtype == torch.float32 for p in net.parameters())


def test_bf16_resume_is_exact(digits):
    cfg = apply_overrides(
        preset("gan", "tiny"),
        {"train.steps": 20, "train.log_every": 5, "train.precision": "bf16"},
    )
    whole, h_whole = _run(cfg, digits)
    half, _ = _run(cfg, digits, steps=10)
    sd = state_dict(half)
    with torch.random.fork_rng(devices=[]):
        resumed = load_state_dict(init_state(cfg, digits, "cpu"), sd)
        h_rest = []
        train(resumed, digits, callbacks=[lambda s, m: h_rest.append(m)])
    assert h_rest == h_whole[2:]  # iterations 15 and 20, bit for bit


def test_fractional_gpus_with_several_workers_are_refused():
    from flows.train.spec import ClusterSpec, TrainError

    with pytest.raises(TrainError, match="two NCCL ranks on one GPU"):
        ClusterSpec(workers=2, gpus_per_worker=0.5).check()
    ClusterSpec(workers=1, gpus_per_worker=0.5).check()  # one rank, no peer: fine
    ClusterSpec(workers=2, gpus_per_worker=1).check()


def test_sync_batchnorm_when_asked():
    from flows.train.worker import sync_batchnorm

    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert isinstance(sync_batchnorm(net, True)[1], nn.SyncBatchNorm)
    plain = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert type(sync_batchnorm(plain, False)[1]) is nn.BatchNorm1d
    assert preset("gan").model.sync_batchnorm is True


def test_bf16_on_a_cpu_that_emulates_it_is_named(tmp_path, capsys):
    """bf16 asked for on a CPU without native bf16 (AVX2 machines: ~10x slower than fp32) is
    one warning line at the start of the run; fp32, auto, CUDA and native CPUs get none."""
    from flows.train.local import train_and_evaluate
    from gan_core.train import emulated_bf16_warning

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    line = emulated_bf16_warning("bf16", "cpu")
    assert (line is None) == native
    if line is not None:
        assert (
            "set train.precision=fp32" in line and torch.backends.cpu.get_cpu_capability() in line
        )
    for precision, device in [("fp32", "cpu"), ("auto", "cpu"), ("bf16", "cuda"), ("auto", "cuda")]:
        assert emulated_bf16_warning(precision, device) is None
    for precision in ("bf16", "fp32"):
        cfg = apply_overrides(
            preset("gan", "tiny"),
            {"train.steps": 2, "train.log_every": 1, "train.precision": precision, "eval.every": 2},
        )
        train_and_evaluate(cfg, tmp_path / precision)
        shown = [ln for ln in capsys.readouterr().err.splitlines() if "without native bf16" in ln]
        assert len(shown) == (1 if precision == "bf16" and not native else 0), shown

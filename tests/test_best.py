"""The best step on val, not the last: the tracker's choice (min or max, NaN never best, ties
keep the earlier step), its round trip through a checkpoint folder, when evaluations are
due, and what a registry stage reads from a checkpoint (the best generator). No Ray."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flows.train.best import BestSoFar, evaluation_due, judged_generators
from flows.train.checkpoints import BEST_FILE, read_best, trained_generators, write_checkpoint
from gan_core.data import load_builtin
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import init_state, read_checkpoint, train


def _net(value: float) -> dict[str, nn.Module]:
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(value)
        net.bias.fill_(value)
    return {"G": net}


def _offer_all(best: BestSoFar, values: list[float]) -> None:
    for step, v in enumerate(values, start=1):
        best.offer(step * 10, {best.metric: v, "other": 2 * v}, _net(step))


@pytest.mark.parametrize(
    "mode, values, step",
    [
        ("min", [5.0, 3.0, 4.0, 3.5], 20),
        ("max", [0.2, 0.9, 0.95, 0.1], 30),
        ("min", [float("nan"), 7.0, float("nan")], 20),  # NaN is never best
        ("max", [0.5, 0.5, 0.4], 10),  # a tie keeps the earlier step
        ("min", [float("inf"), 9.0], 20),
    ],
)
def test_picks_the_best_by_the_metric_direction(mode, values, step):
    best = BestSoFar("fd", mode)
    _offer_all(best, values)
    assert best.step == step
    assert best.value == values[step // 10 - 1]
    assert best.figures == {"fd": best.value, "other": 2 * best.value}
    # The weights of the step that won, copied (a later offer does not change them).
    assert torch.all(best.weights["G"]["weight"] == step // 10)


def test_a_step_failing_the_class_gate_is_never_best():
    """A cGAN step whose samples do not carry their labels (class accuracy below the gate
    promotion and search enforce) is not chosen, however low its intra-class distance."""
    best = BestSoFar("intra_fd", "min")
    floor = {"class_accuracy_floor": 0.5}
    best.offer(10, {"intra_fd": 9.0, "class_accuracy": 0.9, **floor}, _net(1))
    assert not best.offer(20, {"intra_fd": 1.0, "class_accuracy": 0.2, **floor}, _net(2))
    assert best.offer(30, {"intra_fd": 5.0, "class_accuracy": 0.6, **floor}, _net(3))
    assert best.step == 30


def test_nothing_finite_is_no_best():
    best = BestSoFar("fd", "min")
    _offer_all(best, [float("nan"), float("nan")])
    assert not best.found and best.weights == {}
    best.offer(5, {"other": 1.0}, _net(1))  # the primary figure missing: not comparable
    assert not best.found


def test_weights_are_a_copy_not_the_live_network():
    nets = _net(1.0)
    best = BestSoFar("fd", "min")
    best.offer(1, {"fd": 1.0}, nets)
    with torch.no_grad():
        nets["G"].weight.fill_(9.0)
    assert torch.all(best.weights["G"]["weight"] == 1.0)
    target = _net(0.0)
    best.load_into(target)
    assert torch.all(target["G"].weight == 1.0)


def test_state_dict_round_trip_through_a_weights_only_file(tmp_path):
    best = BestSoFar("class_accuracy", "max")
    _offer_all(best, [0.1, 0.7, 0.3])
    torch.save(best.state_dict(), tmp_path / "best.pt")
    again = BestSoFar("class_accuracy", "max")
    assert again.load_state_dict(read_checkpoint(tmp_path / "best.pt"))  # weights_only=True
    assert (again.step, again.value, again.figures) == (best.step, best.value, best.figures)
    torch.testing.assert_close(again.weights, best.weights, rtol=0, atol=0)
    # It goes on choosing as the original would: a worse step is not taken, a better one is.
    assert not again.offer(40, {"class_accuracy": 0.6}, _net(4))
    assert again.offer(50, {"class_accuracy": 0.8}, _net(5)) and again.step == 50


def test_a_tracker_for_another_metric_is_not_restored():
    saved = BestSoFar("class_accuracy", "max")
    _offer_all(saved, [0.5])
    other = BestSoFar("fd", "min")  # e.g. the family's primary metric changed between attempts
    assert not other.load_state_dict(saved.state_dict())
    assert not other.found


def test_evaluation_is_due_at_the_first_log_point_past_each_multiple():
    def due(every, log_every, end):
        points = [s for s in range(log_every, end + 1, log_every)] + [end]
        return sorted({s for s in points if evaluation_due(s, every, log_every, end)})

    assert due(0, 5, 100) == []  # at the end only
    assert due(20, 5, 100) == [20, 40, 60, 80]  # never the last step: the end evaluates anyway
    assert due(4, 1, 16) == [4, 8, 12]
    assert due(30, 20, 100) == [40, 60]  # 30 -> 40, 60 -> 60; 90 -> 100, the end
    assert due(7, 5, 20) == [10, 15]  # 7 -> 10, 14 -> 15; 21 > end
    assert due(500, 5, 100) == []


@pytest.mark.parametrize("family", ["gan", "cyclegan"])
def test_checkpoint_folder_keeps_the_best_and_the_registry_reads_it(family, tmp_path):
    """Rank 0 writes best.pt beside state.pt; read back, it restores the same tracker, and
    trained_generators (what load_trained reads) gives the best step's generator(s), not
    the last step's."""
    cfg = apply_overrides(preset(family, "tiny"), {"train.steps": 4, "train.log_every": 2})
    data = load_builtin(cfg.data.dataset, cfg.data.image_size)
    state = init_state(cfg, data, "cpu")
    best = BestSoFar("fd", "min")
    train(state, data, until=2)
    at_two = judged_generators(state)
    best.offer(2, {"fd": 1.0}, at_two)
    train(state, data)
    best.offer(4, {"fd": 2.0}, judged_generators(state))  # worse: step 2 stays
    write_checkpoint(state, tmp_path, 0, 1, best)
    assert (tmp_path / BEST_FILE).exists()
    again = BestSoFar("fd", "min")
    assert again.load_state_dict(read_best(tmp_path)) and again.step == 2

    got_cfg, models, step = trained_generators(tmp_path)
    assert got_cfg.family == family and step == 2
    assert set(models) == set(at_two)
    for k, net in models.items():
        assert not net.training
        torch.testing.assert_close(net.state_dict(), at_two[k].state_dict(), rtol=0, atol=0)
    last = judged_generators(state)["G"].state_dict()
    assert any(not torch.equal(last[n], t) for n, t in models["G"].state_dict().items())


@pytest.mark.parametrize("half_life", [0, 50])
def test_checkpoint_without_a_best_gives_the_judged_generator(half_life, tmp_path):
    """Before any val evaluation (or a checkpoint from before best.pt existed) the registry
    still gets what evaluation would judge: the EMA copy when kept, else the live G."""
    cfg = apply_overrides(
        preset("gan", "tiny"),
        {"train.steps": 3, "train.log_every": 1, "train.ema_half_life": half_life},
    )
    data = load_builtin(cfg.data.dataset, cfg.data.image_size)
    state = init_state(cfg, data, "cpu")
    train(state, data)
    write_checkpoint(state, tmp_path, 0, 1, BestSoFar("fd", "min"))  # empty: no best.pt
    assert read_best(tmp_path) is None
    _, models, step = trained_generators(tmp_path)
    assert step is None
    want = copy.deepcopy(judged_generators(state))
    torch.testing.assert_close(models["G"].state_dict(), want["G"].state_dict(), rtol=0, atol=0)
    live = state.models["G"].state_dict()
    same_as_live = all(torch.equal(t, live[n]) for n, t in models["G"].state_dict().items())
    assert same_as_live == (half_life == 0)  # with EMA on, never the raw last-step weights


def test_local_job_keeps_the_best_step_on_val(tmp_path):
    """`ganflow local`: the result, best.pt and the grid are the best val step's."""
    import json

    from flows.train.local import train_and_evaluate

    cfg = apply_overrides(
        preset("gan", "tiny"),
        {
            "train.steps": 16,
            "train.batch_size": 16,
            "train.log_every": 2,
            "eval.every": 4,
            "optim.lr_g": 0.05,
            "optim.lr_d": 0.05,
        },
    )
    out = train_and_evaluate(cfg, tmp_path / "run", progress=False)
    curve = {
        int(k): v
        for k, v in json.loads((tmp_path / "run" / "val_curve.json").read_text())["by_step"].items()
    }
    print("val fd:", curve)
    assert sorted(curve) == [4, 8, 12, 16]
    best = min(curve, key=lambda s: (curve[s], s))
    assert out.metrics["best_step"] == best and out.metrics["val_fd"] == curve[best]
    assert read_checkpoint(tmp_path / "run" / "best.pt")["step"] == best
    assert (tmp_path / "run" / "samples.png").exists()

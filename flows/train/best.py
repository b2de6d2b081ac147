"""The best generator of a run so far, by the family's primary metric on the validation split.

Training does not end at its best: a GAN's figures drift (D keeps winning), so the step to
register is the one whose generator measured best on val, not the last one. The tracker
holds a CPU copy of that generator's weights, its step and its val figures, as tensors and
primitives only, so it goes into a checkpoint (``weights_only=True``) and a resumed run picks
the same step as an uninterrupted one. No Ray or MLflow here.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn


def evaluation_due(step: int, every: int, log_every: int, end: int) -> bool:
    """Whether the log point at ``step`` evaluates: the first log point at or past each
    multiple of ``every`` (callbacks run at log points only, so an interval that is not a
    multiple of log_every still evaluates about as often). Never the last iteration: the
    end evaluates anyway. Decided from the step alone, so a resumed run evaluates at the same
    iterations as an uninterrupted one."""
    if not every or step == end:
        return False
    return step // every > max(step - log_every, 0) // every


def judged_generators(state) -> dict[str, nn.Module]:
    """CPU copies of the generator(s) evaluation judges (``gan_core.train.eval_models``: the
    EMA copies when the config keeps them): the judge lives on the CPU, and the run's own
    networks are never touched."""
    from flows.package import generator_keys
    from gan_core.train import eval_models, plain

    nets = eval_models(state)
    return {k: copy.deepcopy(plain(nets[k])).cpu() for k in generator_keys(state.cfg.family)}


class BestSoFar:
    """The best step offered so far for ``metric`` ('min' or 'max' is better). Figures that
    fail gan_core's gate never are (a NaN, infinite or missing figure; a cGAN whose samples
    do not carry their labels), as promotion and search refuse them; on a tie the earlier
    step stays, so the choice does not depend on how often a run was evaluated after
    reaching its best."""

    def __init__(self, metric: str, mode: str):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.step: int | None = None
        self.value = float("nan")
        self.figures: dict[str, float] = {}
        self.weights: dict[str, dict[str, Tensor]] = {}

    @property
    def found(self) -> bool:
        return self.step is not None

    def better(self, figures: dict[str, float]) -> bool:
        from gan_core.evaluate import gate_failure

        if gate_failure(figures, self.metric) is not None:
            return False
        value = float(figures[self.metric])
        if not self.found:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def offer(self, step: int, figures: dict[str, float], models: dict[str, nn.Module]) -> bool:
        """Keep step (figures: its val figures, by name without prefix) and a CPU copy of
        the models' weights when its figures are better. Returns whether they were."""
        if not self.better(figures):
            return False
        self.step, self.value = int(step), float(figures[self.metric])
        self.figures = {k: float(v) for k, v in figures.items()}
        self.weights = {
            name: {k: t.detach().cpu().clone() for k, t in net.state_dict().items()}
            for name, net in models.items()
        }
        return True

    def load_into(self, models: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """models (same architecture, e.g. CPU copies of the run's networks) with the best
        weights loaded, for the networks the tracker holds."""
        for name, sd in self.weights.items():
            models[name].load_state_dict(sd)
        return models

    def state_dict(self) -> dict:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "step": self.step,
            "value": self.value,
            "figures": dict(self.figures),
            "weights": self.weights,
        }

    def load_state_dict(self, sd: dict) -> bool:
        """Restore a saved tracker. A tracker saved for another metric or direction (code that
        changed the family's primary metric between a run's attempts) is not comparable and
        is ignored: returns False, and the tracker starts empty."""
        if sd.get("metric") != self.metric or sd.get("mode") != self.mode:
            return False
        step = sd.get("step")
        self.step = None if step is None else int(step)
        self.value = float(sd["value"])
        self.figures = {k: float(v) for k, v in sd["figures"].items()}
        self.weights = {k: dict(v) for k, v in sd["weights"].items()}
        return True

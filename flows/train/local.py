"""The main job on embedded defaults: train each family on the built-in data, evaluate it on
held-out digits, and write what a person looks at (sample grid, loss curves, metrics).

This is the single-process path; distributed training, tracking and orchestration wrap the
same gan_core loop at the edges. As on Ray, the generator kept is the best step's on the val
split (every ``eval.every`` iterations and the last), as evaluation sees it (the EMA copy
when the config keeps one): its test figures are the result, its samples the grid, and its
weights ``best.pt``; ``checkpoint.pt`` is the full last-step state (to resume from).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flows.settings import cache_dir, runs_dir
from flows.train.best import BestSoFar, evaluation_due, judged_generators
from gan_core.config import GanConfig
from gan_core.data import load_builtin
from gan_core.evaluate import evaluate, primary_metric, sample_grid
from gan_core.judge import load_or_train_judge
from gan_core.train import emulated_bf16_warning, init_state, save_checkpoint, train
from gan_core.viz import save_grid


@dataclass
class FamilyResult:
    family: str
    steps: int
    seconds: float
    metrics: dict[str, float]
    primary: str
    out_dir: str


def _progress(family: str, total: int, stream=None):
    """Progress lines to ``stream``, or to sys.stderr as it is at each line (bound at import,
    a default kept a stream that a caller had since closed: pytest's capture, a redirect)."""
    start = time.perf_counter()

    def cb(state, m: dict[str, float]) -> None:
        rate = state.step / max(time.perf_counter() - start, 1e-9)
        losses = " ".join(f"{k}={v:.3f}" for k, v in m.items() if k.startswith("loss"))
        eta = (total - state.step) / max(rate, 1e-9)
        print(
            f"[{family}] step {state.step}/{total} {losses} ({rate:.0f} it/s, eta {eta:.0f}s)",
            file=stream or sys.stderr,
            flush=True,
        )

    return cb


def plot_losses(history: list[tuple[int, dict[str, float]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = [k for k in history[0][1] if k.startswith("loss")] if history else []
    for k in keys:
        ax.plot([s for s, _ in history], [m[k] for _, m in history], label=k)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def train_and_evaluate(cfg: GanConfig, out_dir: Path, progress: bool = True) -> FamilyResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_builtin(cfg.data.dataset, cfg.data.image_size, "train")
    val = load_builtin(cfg.data.dataset, cfg.data.image_size, "val")
    heldout = load_builtin(cfg.data.dataset, cfg.data.image_size, "test")
    judge = load_or_train_judge(
        f"{cfg.data.dataset}-{cfg.data.image_size}px", data, cache_dir(), heldout=heldout
    )
    primary, mode = primary_metric(cfg, getattr(heldout, "x_truth", None) is not None)
    best = BestSoFar(primary, mode)
    curve: dict[int, float] = {}

    def validate(s) -> None:
        generators = judged_generators(s)
        figures = evaluate(cfg, generators, val, judge)
        curve[s.step] = figures.get(primary, float("nan"))
        best.offer(s.step, figures, generators)

    state = init_state(cfg, data)
    slow = emulated_bf16_warning(cfg.train.precision, state.device.type)
    if slow and progress:
        print(f"[{cfg.family}] warning: {slow}", file=sys.stderr, flush=True)
    history: list[tuple[int, dict[str, float]]] = []
    end, log_every = cfg.train.steps, cfg.train.log_every

    def periodic(s, _metrics) -> None:
        if evaluation_due(s.step, cfg.eval.every, log_every, end):
            validate(s)

    callbacks = [lambda s, m: history.append((s.step, m)), periodic]
    if progress:
        callbacks.append(_progress(cfg.family, cfg.train.steps))
    t0 = time.perf_counter()
    train(state, data, callbacks=callbacks)
    seconds = time.perf_counter() - t0
    validate(state)  # the last step is a candidate too
    generators = judged_generators(state)
    if best.found:
        best.load_into(generators)
    metrics = evaluate(cfg, generators, heldout, judge)
    metrics["judge_heldout_accuracy"] = judge.heldout_accuracy
    # Without a step that passed the gate, the last one is what there is.
    metrics["best_step"] = best.step if best.found else state.step
    metrics.update({f"val_{k}": v for k, v in best.figures.items()})
    images, nrow, _ = sample_grid(cfg, generators, heldout)
    save_grid(images, out_dir / "samples.png", nrow=nrow, scale=4)
    plot_losses(history, out_dir / "losses.png", f"{cfg.family}: losses")
    save_checkpoint(state, out_dir / "checkpoint.pt")
    if best.found:
        torch.save(best.state_dict(), out_dir / "best.pt")
    (out_dir / "config.json").write_text(json.dumps(cfg.to_flat_dict(), indent=2))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "val_curve.json").write_text(
        json.dumps({"metric": f"val_{primary}", "mode": mode, "by_step": curve}, indent=2)
    )
    return FamilyResult(cfg.family, cfg.train.steps, seconds, metrics, primary, str(out_dir))


def run_all(configs: list[GanConfig], progress: bool = True) -> list[FamilyResult]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return [
        train_and_evaluate(cfg, runs_dir() / f"{stamp}-{cfg.family}", progress) for cfg in configs
    ]

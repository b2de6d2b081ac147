"""What ganflow's training choices buy in sample quality: `python -m flows.bench.quality`.

Sized for one GPU or a patient CPU: each gan/cgan run is 6,000 steps at ngf 32, batch 64
(10-13 minutes of one CPU core; D's augmentation needs that long to pay, see the presets),
so the full default plan takes hours on 2 cores and minutes on a GPU (``--device cuda``);
``--quick`` is one to two minutes. Everything is drawn here
(:mod:`flows.bench.quality_data`), nothing is downloaded:

- ``shapes``, ``shapes-25``, ``shapes-10``: the conditional GAN on 32x32 RGB circles,
  squares and triangles (random colours, sizes and positions), 200 training images per
  class, and the same set cut to 25% and 10% (nested, stratified). ``shapes-gan``: the
  unconditional GAN on the full set (labels only for evaluation).
- ``colours``: CycleGAN on an unpaired day/night colour-scheme pair whose truth T(x) is
  known for every held-out x.

Rows: ``anchor`` is a plain DCGAN written in :mod:`flows.bench.quality_data` (the tutorials'
recipe: Radford et al.'s layout, one-hot labels, BCE, Adam 2e-4 / 0.5) with the same width,
batch, data order and evaluation as ganflow's runs; for CycleGAN it is ganflow's CycleGAN
with every stabiliser off (the paper's recipe). ``defaults`` is what gan_core's presets give
for 32 px; the GAN rows after it undo one choice each (``no-aug``, ``fixed-p``, ``no-ema``,
``no-sn``, ``concat``, a loss swapped, R1 on or off); ``old`` is the configuration before
the modern defaults (wide G, no spectral norm, concatenated labels, no augmentation, no
EMA, minimax, no R1). CycleGAN's rows add one of the GANs' stabilisers each (``sn`` and
``augment``; ``ema`` and ``r1`` on request). A row whose config equals the defaults is
skipped, and said so.

Figures on held-out test images, under identical conditions for every run (training seed,
evaluation seed and sample count; one judge per image source, trained once on its full
train split, so the subsets are judged alike): gan_core's evaluate() in the judge's
features (``fd``, ``intra_fd``, coverage, class accuracy, its memorisation ratio), and
judge-free figures that no training choice can fit: Fréchet distance between 8x8 colour
thumbnails (192-dim vectors), overall (``fd_thumb``) and within each class
(``intra_fd_thumb``), and ``memo_px``: the mean pixel distance from a sample to its nearest
training image over the same for held-out real images (about 1: new images; well below 1:
copies). Budgets: every run gets ``--steps`` (equal steps); an ``@time`` row gets the
defaults' steps times the ratio of its speed to theirs, measured in alternating short probes
just before it (so a shared machine's load does not pick the budget), or ``--seconds`` of
its own measured speed.

Writes ``results.md``, ``results.json`` (every figure and every config) and a sample grid
per run (``grids/<dataset>/<run>.png``, one row per class) to ``--out`` after every run, so
an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

from flows.bench import quality_data as qd
from flows.bench.quality_plan import (
    COLOURS_PER_CLASS,
    DATASETS,
    EVAL_SEED,
    SHAPES_PER_CLASS,
    VARIANTS,
    Bench,
    base_config,
    load_source,
    make_bench,
    make_judge,
    names,
    plan_runs,
)
from flows.bench.quality_report import fmt, summary, table, write_report
from flows.train.best import BestSoFar
from gan_core.config import GanConfig
from gan_core.data import UnpairedSet
from gan_core.evaluate import evaluate, primary_metric, sample, sample_grid
from gan_core.judge import Judge
from gan_core.overrides import apply_overrides
from gan_core.state import plain
from gan_core.train import eval_models, init_state, train
from gan_core.viz import save_grid

# --- one run ------------------------------------------------------------------------------


def _tracker(cfg: GanConfig, b: Bench) -> BestSoFar | None:
    """What a ganflow run registers: the step whose G measured best on the val split
    (flows.train.best, the same choice and gate), among the log points. None without a val
    split (the unpaired colours)."""
    if b.val is None:
        return None
    return BestSoFar(*primary_metric(cfg, b.facts.has_truth))


def _offer(best: BestSoFar | None, cfg: GanConfig, b: Bench, step: int, models: dict) -> None:
    """Judge the models on val and keep them if best so far (outside the timed training:
    the equal-time budgets compare the recipes' training speed)."""
    if best is None:
        return
    figures = evaluate(cfg, models, b.val, b.judge, EVAL_SEED)
    best.offer(step, figures, {k: plain(v) for k, v in models.items() if k in ("G", "F")})


def _train_ganflow(cfg: GanConfig, b: Bench, progress) -> dict:
    state = init_state(cfg, b.train, cfg.train.device)
    last: dict = {}
    best = _tracker(cfg, b)

    def keep(_state, report: dict) -> None:
        last.clear()
        last.update(report)

    spent = 0.0
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        train(state, b.train, callbacks=[keep], until=state.step + cfg.train.log_every)
        spent += time.perf_counter() - t0
        progress(state.step, cfg.train.steps, spent, last)
        _offer(best, cfg, b, state.step, eval_models(state))
    # ADA's p where it adapts: a short run may end with augmentation barely switched on.
    aug_p = float(state.augment.p) if cfg.augment.policy != "none" else None
    return {
        "models": eval_models(state),
        "steps": state.step,
        "seconds": spent,
        "last": last,
        "aug_p": aug_p,
        "best": best,
    }


def _train_anchor(cfg: GanConfig, b: Bench, progress) -> dict:
    m, t = cfg.model, cfg.train
    anchor = qd.Anchor(
        b.train, m.z_dim, m.ngf, t.batch_size, t.seed, cfg.family == "cgan", t.device
    )
    spent, last, best = 0.0, {}, _tracker(cfg, b)
    while anchor.step < t.steps:
        t0 = time.perf_counter()
        last = anchor.train(min(anchor.step + t.log_every, t.steps))
        spent += time.perf_counter() - t0
        progress(anchor.step, t.steps, spent, last)
        _offer(best, cfg, b, anchor.step, {"G": anchor.G})
    models = {"G": anchor.G}
    return {"models": models, "steps": anchor.step, "seconds": spent, "last": last, "best": best}


def _translations(models: dict, test: UnpairedSet) -> tuple[torch.Tensor, torch.Tensor]:
    G, F = models["G"], models["F"]
    dev = next(G.parameters()).device
    was = G.training, F.training
    G.eval()
    F.eval()
    try:
        with torch.no_grad():
            return G(test.x.images.to(dev)).cpu(), F(test.y.images.to(dev)).cpu()
    finally:
        G.train(was[0])
        F.train(was[1])


def measure(cfg: GanConfig, models: dict, b: Bench) -> dict:
    """Every figure of one trained run, on the held-out test split."""
    if cfg.family == "cyclegan":
        out: dict = {"judge": evaluate(cfg, models, b.test, b.judge, EVAL_SEED)}
        g_x, f_y = _translations(models, b.test)
        x, y = b.test.x, b.test.y
        out["fd_thumb"] = (qd.thumb_fd(y.images, g_x) + qd.thumb_fd(x.images, f_y)) / 2
        out["intra_fd_thumb"] = (
            qd.intra_thumb_fd(y.images, y.labels, g_x, x.labels)
            + qd.intra_thumb_fd(x.images, x.labels, f_y, y.labels)
        ) / 2
        return out
    out = {"judge": evaluate(cfg, models, b.test, b.judge, EVAL_SEED, train=b.train)}
    # The same z and labels evaluate() drew, so both kinds of figure judge the same images.
    n = cfg.eval.samples
    labels = None
    if cfg.family == "cgan":
        n = max(n, 2 * cfg.model.num_classes)
        labels = torch.arange(n) % cfg.model.num_classes
    fake = sample(cfg, models["G"], n, EVAL_SEED, labels)
    out["fd_thumb"] = qd.thumb_fd(b.test.images, fake)
    if labels is not None:
        out["intra_fd_thumb"] = qd.intra_thumb_fd(b.test.images, b.test.labels, fake, labels)
    out["memorisation"] = qd.memorisation(b.train.images, b.test.images, fake)
    return out


def run_one(b: Bench, variant: str, cfg: GanConfig, budget: str, out: Path, log) -> list[dict]:
    """One training run's rows: its last step, and (with a val split) the step that measured
    best on val when that is another one, judged on test like the last. The best-step row is
    what ganflow registers; for the plain DCGAN it is the same choice made for it, so the
    recipes compare both as trained and as selected."""

    def progress(step: int, total: int, spent: float, last: dict) -> None:
        losses = " ".join(f"{k} {v:.3g}" for k, v in last.items() if k.startswith("loss_"))
        log(f"    step {step}/{total}  {spent:.0f} s  {step / max(spent, 1e-9):.1f} it/s  {losses}")

    anchor = variant == "anchor" and b.family != "cyclegan"
    trained = (_train_anchor if anchor else _train_ganflow)(cfg, b, progress)
    tag = variant if budget == "steps" else f"{variant}@time"
    config = cfg.to_flat_dict()
    if anchor:
        # Of the config only the sizes, seed and evaluation apply: the rest is the anchor's.
        config = {"anchor": "flows.bench.quality_data.Anchor (plain DCGAN)", **config}
    common = {
        "variant": variant,
        "budget": budget,
        "seed": cfg.train.seed,
        "seconds": trained["seconds"],
        "steps_per_s": trained["steps"] / max(trained["seconds"], 1e-9),
        "last_log": trained["last"],
        "aug_p": trained.get("aug_p"),
        "config": config,
    }

    def row(name: str, models: dict, step: int, extra: dict) -> dict:
        grid = out / "grids" / b.name / f"{name}-seed{cfg.train.seed}.png"
        images, nrow, caption = sample_grid(cfg, models, b.test, EVAL_SEED)
        save_grid(images.clamp(-1, 1), grid, nrow=nrow, scale=3)
        figures = measure(cfg, models, b)
        shown = {"grid": str(grid.relative_to(out)), "grid_caption": caption}
        return {"run": name, "steps": step, "figures": figures, **shown, **extra}

    rows = [row(tag, trained["models"], trained["steps"], common)]
    best: BestSoFar | None = trained["best"]
    if best is not None and best.found and best.step != trained["steps"]:
        nets = {k: copy.deepcopy(plain(trained["models"][k])) for k in best.weights}
        picked = {"best_of": trained["steps"], "val": best.figures}
        rows.append(row(f"{tag} best", best.load_into(nets), best.step, {**common, **picked}))
    return rows


def probe_rate(b: Bench, variant: str, cfg: GanConfig, steps: int = 10) -> float:
    """Steps per second of a config, from a few steps after a warm-up one."""
    short = apply_overrides(cfg, {"train.steps": steps + 1, "train.log_every": 1})
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(*_):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer = _train_anchor if variant == "anchor" and b.family != "cyclegan" else _train_ganflow
    trainer(short, b, lambda *a: tick())
    return steps / max(sum(times[1:]), 1e-9)


def relative_rate(
    b: Bench, variant: str, cfg: GanConfig, ref: GanConfig, rounds: int = 3
) -> tuple[float, float]:
    """(steps/s of ``variant`` over the defaults', the defaults' steps/s), probed in turns.

    The equal-time budget is a ratio of two speeds. Measured back to back, in alternating
    short probes with the median of each, it holds on a shared machine whose load drifts
    over a run: a plain clock budget gave one row the time another job left free."""
    mine, theirs = [], []
    for _ in range(rounds):
        theirs.append(probe_rate(b, "defaults", ref))
        mine.append(probe_rate(b, variant, cfg))
    mine.sort()
    theirs.sort()
    return mine[rounds // 2] / theirs[rounds // 2], theirs[rounds // 2]


# --- the command --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flows.bench.quality", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", default="bench-quality-out", help="folder for tables and grids")
    p.add_argument("--datasets", help=f"comma list of {', '.join(DATASETS)} (default: all)")
    p.add_argument(
        "--variants",
        help=f"comma list of {', '.join(VARIANTS)} for every dataset (default: a plan per "
        "dataset; rows that do not apply to a family are skipped)",
    )
    p.add_argument("--steps", type=int, default=6000, help="steps of each gan/cgan run")
    p.add_argument("--cycle-steps", type=int, default=200, help="steps of each CycleGAN run")
    p.add_argument(
        "--budget",
        choices=("steps", "time", "both"),
        default="both",
        help="equal steps for every row, equal wall time for every row, or both: equal "
        "steps plus equal-time rows for --time-variants",
    )
    p.add_argument(
        "--time-variants",
        help="equal-time rows under --budget both (default: anchor and old on shapes)",
    )
    p.add_argument("--seconds", type=float, help="equal-time budget (default: the defaults' steps)")
    p.add_argument("--ngf", type=int, default=32, help="ngf = ndf of the gan/cgan runs")
    p.add_argument("--batch", type=int, default=64, help="minibatch of the gan/cgan runs")
    p.add_argument("--samples", type=int, default=900, help="generated samples per evaluation")
    p.add_argument("--seeds", default="0", help="training seeds, comma list")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--device",
        default="cpu",
        help="where every run trains (cpu, cuda, cuda:1): on one GPU the full table with "
        "several seeds and longer runs takes minutes (`make gpu-quality`)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (a minute or two): shapes-10 and colours, anchor and defaults, "
        "40 steps (CycleGAN 10), 150 samples",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.datasets = args.datasets or "shapes-10,colours"
        args.variants = args.variants or "anchor,defaults"
        args.steps = min(args.steps, 40)
        args.cycle_steps = min(args.cycle_steps, 10)
        args.samples = min(args.samples, 150)
        args.time_variants = args.time_variants or "anchor"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    datasets = names(args.datasets, DATASETS, "dataset") or list(DATASETS)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {msg}", flush=True)

    result: dict = {
        "settings": {
            **vars(args),
            "seeds": seeds,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "eval_seed": EVAL_SEED,
            "per_class": {"shapes": SHAPES_PER_CLASS, "colours": COLOURS_PER_CLASS},
        },
        "datasets": {},
    }
    sources: dict[str, tuple[dict, Judge]] = {}
    for name in datasets:
        family, source, _ = DATASETS[name]
        if source not in sources:
            splits = load_source(source)
            log(f"{source}: training the judge on its train split")
            judge = make_judge(splits)
            log(f"{source}: judge accuracy on test {judge.heldout_accuracy:.3f}")
            sources[source] = (splits, judge)
        b = make_bench(name, *sources[source])
        n_train = len(b.train.x) + len(b.train.y) if family == "cyclegan" else len(b.train)
        entry: dict = {
            "family": family,
            "train_images": n_train,
            "judge_accuracy": b.judge.heldout_accuracy,
            "runs": [],
            "skipped": {},
        }
        result["datasets"][name] = entry
        steps = args.cycle_steps if family == "cyclegan" else args.steps
        for seed in seeds:
            runs = plan_runs(
                name, family, base_config(b, args, steps, seed), args, entry["skipped"]
            )
            ref = next((cfg for v, cfg, _ in runs if v == "defaults"), None)
            ref_steps = steps
            for i, (v, cfg, budget) in enumerate(runs):
                ratio = None
                if budget == "time":
                    if args.seconds is not None:
                        planned = max(1, round(args.seconds * probe_rate(b, v, cfg)))
                    else:
                        # The defaults' steps scaled by the speed ratio measured just now, so
                        # the row is reproducible and its budget blind to the machine's load.
                        ratio, _ = relative_rate(b, v, cfg, ref)
                        planned = max(1, round(ref_steps * ratio))
                        log(f"{name}: {v} runs at {ratio:.2f}x the defaults' steps/s")
                    cfg = apply_overrides(
                        cfg, {"train.steps": planned, "train.log_every": max(1, planned // 10)}
                    )
                log(f"{name} [{i + 1}/{len(runs)}] {v} ({budget}), seed {seed}")
                rows = run_one(b, v, cfg, budget, out, log)
                if budget == "steps" and v == "defaults":
                    ref_steps = rows[0]["steps"]
                for r in rows:
                    r["speed_ratio"] = ratio  # steps/s over the defaults' (equal-time rows)
                    f, j = r["figures"], r["figures"]["judge"]
                    shown = {
                        "fd_thumb": f.get("fd_thumb"),
                        "fd": j.get("fd"),
                        "intra_fd": j.get("intra_fd"),
                        "class_acc": j.get("class_accuracy"),
                        "truth_err_ratio": j.get("truth_error_ratio"),
                    }
                    figures = ", ".join(f"{k} {fmt(x)}" for k, x in shown.items() if x is not None)
                    log(f"  -> {r['run']}: step {r['steps']}, {r['seconds']:.0f} s: {figures}")
                    entry["runs"].append(r)
                write_report(out, result)
        print(
            f"\n{name}\n{table(family, entry['runs'])}{summary(family, entry['runs'])}", flush=True
        )
    write_report(out, result)
    log(f"done: {out / 'results.md'}")
    return result


if __name__ == "__main__":
    main()

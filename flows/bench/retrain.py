"""Warm start vs scratch on grown data: `python -m flows.bench.retrain [--family gan] [--seeds 0]`.

What the retraining pipeline does when a dataset grows (issue 21), measured without Ray or
MLflow (gan_core's loop in this process, the same warm start the workers run):

1. a folder dataset made from scikit-learn's digits (class folders of 16 px PNGs; with
   ``--data shapes``, 32 px RGB shapes in random colours, the conv preset) holding
   80% of each class is ingested, and the champion is trained on it from scratch for the
   family's default ``train.steps``; as in the pipeline, the registered generator is the
   best step on val (every ``eval.every``) and the warm start reads the last step's state;
2. the folder grows to 100% (about 25% more images; the ingest's splits are stable, so old
   files stay in their split) and is ingested again: a new snapshot;
3. the champion's figure on the new snapshot's val split is the target, as promotion would
   measure it;
4. candidates on the new snapshot, evaluated on its val split every ``--every`` steps:
   ``scratch`` (random weights, the full schedule) and ``warm`` (the champion's G, D, Adam
   moments and averages, the full schedule), and ``warm-ftN`` (warm for N steps with its own
   schedule; by default N is the pipeline's ``retrain.finetune_steps``, a quarter), and
   ``warm-best-ftN`` (the same, G from the registered best step instead of the last step:
   the alternative the pipeline did not take, see the README).

Reported per candidate: the first step (and training seconds, evaluations excluded) at
which its val figure reaches the target, its best figure by ``--equal`` steps, and its best
over its whole run. Prints a Markdown table and one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.snapshots.manifest import Manifest


def write_digits_folder(root: Path, fraction: float, size: int = 16) -> Path:
    """scikit-learn's digits as class folders of PNGs (upscaled to ``size``), the first
    ``fraction`` of each class in the data set's order: a larger fraction is a superset,
    so growing the folder adds files and never changes one already there."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    for label in range(10):
        idx = np.flatnonzero(d.target == label)
        keep = idx[: math.ceil(fraction * len(idx))]
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        for i in keep:
            path = folder / f"{i:04d}.png"
            if path.exists():
                continue
            pixels = (d.images[i] * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(path)
    return root


def write_shapes_folder(root: Path, fraction: float, per_class: int = 200) -> Path:
    """The quality benchmark's 32 px RGB shapes (circles, squares, triangles; random
    colours) as class folders of PNGs: an own RGB set nobody tuned for. As with the digits,
    the first ``fraction`` of each class, so a larger fraction is a superset."""
    import numpy as np
    import torch
    from PIL import Image

    from flows.bench.quality_data import SHAPES, make_shapes

    data = make_shapes("train", per_class)
    pixels = ((data.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(SHAPES):
        idx = np.flatnonzero(data.labels.numpy() == label)
        folder = root / name
        folder.mkdir(exist_ok=True)
        for i in idx[: math.ceil(fraction * len(idx))]:
            path = folder / f"{i:04d}.png"
            if not path.exists():
                Image.fromarray(pixels[i].permute(1, 2, 0).numpy(), "RGB").save(path)
    return root


DATASETS = {"digits": write_digits_folder, "shapes": write_shapes_folder}


def _snapshot(folder: Path) -> Manifest:
    from flows.ingest.resolve import ensure_snapshot

    return ensure_snapshot(str(folder))


class Judged:
    """A snapshot's val split and judge, and the family's primary metric on it."""

    def __init__(self, manifest: Manifest, cfg):
        from flows.settings import cache_dir, snapshot_root
        from flows.train.data_config import judge_data, load_heldout, load_judge
        from gan_core.evaluate import primary_metric

        root = snapshot_root()
        splits = load_heldout(manifest.id, root, cfg)
        self.val = splits["val"]
        self.judge = load_judge(
            manifest.id, cache_dir(), judge_data(manifest.id, root, splits["test"])
        )
        self.metric, self.mode = primary_metric(cfg, False)

    def __call__(self, cfg, generators) -> float:
        from gan_core.evaluate import evaluate

        return evaluate(cfg, generators, self.val, self.judge)[self.metric]

    def better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b


def _generators(state) -> dict:
    import copy

    from flows.tracking import generator_keys
    from gan_core.train import eval_models, plain

    nets = eval_models(state)
    return {k: copy.deepcopy(plain(nets[k])).eval() for k in generator_keys(state.cfg.family)}


def _read_champion(path: Path, cfg) -> dict:
    """A champion saved by an earlier run of this bench (--champion-cache): its last state
    dict and its best step's generators."""
    import torch

    from gan_core.models import build_models

    saved = torch.load(path, weights_only=True)
    built = build_models(cfg)
    best = {}
    for k, weights in saved["best"].items():
        built[k].load_state_dict(weights)
        best[k] = built[k].eval()
    return {"sd": saved["sd"], "best": best, "best_step": saved["best_step"]}


def run_candidate(cfg, data, judged: Judged, every: int, warm: dict | None) -> dict:
    """Train cfg on data, evaluating every ``every`` steps (and at step 0): the curve of
    (step, training seconds so far, val figure), the state at the end and the best step's
    generators (what the pipeline registers)."""
    import torch

    from gan_core.train import init_state, train, warm_start

    torch.manual_seed(cfg.train.seed)
    state = init_state(cfg, data, "cpu")
    if warm is not None:
        warm_start(state, warm)
    gens = _generators(state)
    curve = [(0, 0.0, judged(cfg, gens))]
    best = (curve[0][2], 0, gens)
    seconds = 0.0
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        train(state, data, until=state.step + every)
        seconds += time.perf_counter() - t0
        gens = _generators(state)
        curve.append((state.step, seconds, judged(cfg, gens)))
        if judged.better(curve[-1][2], best[0]):
            best = (curve[-1][2], state.step, gens)
    return {"curve": curve, "state": state, "best_step": best[1], "best": best[2]}


def summarise(name: str, curve: list, target: float, judged: Judged, equal: int) -> dict:
    reach = next(((s, t) for s, t, v in curve if not judged.better(target, v)), (None, None))
    upto = [v for s, _, v in curve if s <= equal]
    best = min if judged.mode == "min" else max
    return {
        "candidate": name,
        "steps_to_target": reach[0],
        "seconds_to_target": None if reach[1] is None else round(reach[1], 1),
        f"best_by_{equal}": best(upto),
        "best": best(v for _, _, v in curve),
        "steps": curve[-1][0],
        "train_seconds": round(curve[-1][1], 1),
    }


def bench(
    family: str,
    seed: int,
    every: int,
    work: Path,
    finetune: list[int],
    data: str = "digits",
    steps: int | None = None,
    only: list[str] | None = None,
    cache: Path | None = None,
) -> dict:
    import torch

    from flows.orchestration.lineage import RetrainConfig, finetune_config
    from flows.settings import snapshot_root
    from flows.snapshots.load import load_dataset
    from flows.train.data_config import config_for_snapshot
    from gan_core.overrides import apply_overrides
    from gan_core.train import state_dict

    torch.set_num_threads(1)
    folder = work / f"{data}-folder"
    DATASETS[data](folder, 0.8)
    old = _snapshot(folder)
    DATASETS[data](folder, 1.0)
    new = _snapshot(folder)
    over: dict = {"train.device": "cpu"}
    if steps:  # a shorter champion and scratch schedule (the eval cadence follows it)
        over |= {"train.steps": steps, "eval.every": max(1, steps // 10)}
    cfg_old = apply_overrides(config_for_snapshot(family, old), {**over, "train.seed": seed})
    cfg_new = apply_overrides(config_for_snapshot(family, new), {**over, "train.seed": seed + 100})
    data_old = load_dataset(old.id, "train", snapshot_root())
    data_new = load_dataset(new.id, "train", snapshot_root())
    judged_old, judged_new = Judged(old, cfg_old), Judged(new, cfg_new)
    print(
        f"[bench retrain] {family} seed {seed}: {len(data_old)} -> {len(data_new)} train images",
        file=sys.stderr,
        flush=True,
    )

    # The champion, and its registered generator: the best step on its own val split.
    cached = cache / f"champion-{family}-{data}-{cfg_old.train.steps}-{seed}.pt" if cache else None
    if cached is not None and cached.exists():
        champ = _read_champion(cached, cfg_old)
        champion_sd = champ["sd"]
    else:
        champ = run_candidate(cfg_old, data_old, judged_old, cfg_old.eval.every, None)
        champion_sd = state_dict(champ["state"])  # the last step's: what a warm start reads
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            best = {k: m.state_dict() for k, m in champ["best"].items()}
            torch.save({"sd": champion_sd, "best": best, "best_step": champ["best_step"]}, cached)
    best_step = champ["best_step"]
    target = judged_new(cfg_old, champ["best"])
    print(
        f"[bench retrain] champion best step {best_step}; on the new val split "
        f"{judged_new.metric} {target:.4g}",
        file=sys.stderr,
        flush=True,
    )
    equal = RetrainConfig().steps_for(cfg_new)
    finetune = finetune or [equal]
    rows = []
    candidates = [("scratch", cfg_new, None), ("warm", cfg_new, champion_sd)]
    # The registered generator (best step) in place of the last step's G: what a warm
    # start reads when the checkpoint holds best.pt (flows.train.checkpoints).
    best_sd = {
        **champion_sd,
        "models": {
            **champion_sd["models"],
            **{k: m.state_dict() for k, m in champ["best"].items()},
        },
    }
    for n in finetune:
        candidates.append((f"warm-ft{n}", finetune_config(cfg_new, n), champion_sd))
        candidates.append((f"warm-best-ft{n}", finetune_config(cfg_new, n), best_sd))
    if only:
        candidates = [c for c in candidates if c[0] in only]
    for name, cfg, warm in candidates:
        t0 = time.perf_counter()
        out = run_candidate(cfg, data_new, judged_new, every, warm)
        rows.append(summarise(name, out["curve"], target, judged_new, equal))
        rows[-1]["curve"] = [(s, round(t, 2), round(v, 4)) for s, t, v in out["curve"]]
        print(
            f"[bench retrain] {name}: {rows[-1]} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return {
        "family": family,
        "data": data,
        "seed": seed,
        "train_images": [len(data_old), len(data_new)],
        "metric": judged_new.metric,
        "mode": judged_new.mode,
        "champion_steps": cfg_old.train.steps,
        "champion_best_step": best_step,
        "target": target,
        "equal_steps": equal,
        "rows": rows,
    }


def _or(value, missing: str):
    return missing if value is None else value


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        eq = r["equal_steps"]
        lines += [
            f"{r['family']} on {r.get('data', 'digits')}, seed {r['seed']}: {r['train_images'][0]} -> {r['train_images'][1]} "
            f"train images; target = champion's {r['metric']} on the new val split "
            f"{r['target']:.4g} ({r['mode']} is better)",
            "",
            f"| candidate | steps to target | train s to target | best {r['metric']} by step {eq} | best over run | steps |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['candidate']} | {_or(row['steps_to_target'], 'not reached')} | "
                f"{_or(row['seconds_to_target'], '-')} | "
                f"{row[f'best_by_{eq}']:.4g} | {row['best']:.4g} | {row['steps']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="gan", choices=("gan", "cgan"))
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--every", type=int, default=50, help="steps between val evaluations")
    p.add_argument(
        "--finetune",
        default=None,
        help="comma-separated finetune_steps of the warm-ft candidates (default: the pipeline's)",
    )
    p.add_argument("--home", default=None, help="GANFLOW_HOME (default: a temporary folder)")
    p.add_argument(
        "--data",
        default="digits",
        choices=sorted(DATASETS),
        help="digits: 16 px grey class folders; shapes: 32 px RGB class folders (conv preset)",
    )
    p.add_argument("--steps", type=int, default=None, help="champion and scratch train.steps")
    p.add_argument("--candidates", default=None, help="comma list (default: all)")
    p.add_argument(
        "--champion-cache",
        default=None,
        metavar="DIR",
        help="keep each champion here and reuse it (same family, data, steps and seed)",
    )
    args = p.parse_args(argv)
    import os

    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp:
        os.environ["GANFLOW_HOME"] = args.home or str(Path(tmp) / "home")
        steps = [int(n) for n in args.finetune.split(",")] if args.finetune else []
        results = [
            bench(
                args.family,
                int(s),
                args.every,
                Path(tmp) / s,
                steps,
                args.data,
                args.steps,
                args.candidates.split(",") if args.candidates else None,
                Path(args.champion_cache) if args.champion_cache else None,
            )  # fmt: skip
            for s in args.seeds.split(",")
        ]
    print(table(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

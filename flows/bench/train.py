"""Ray Train overhead and scaling: `python -m flows.bench.train [--steps N] [--family F]`.

Three measurements of the same config (the family's default preset, fp32, 1 thread per
process):

- ``plain``: gan_core's loop in this process, no Ray (the reference; run first and last,
  and ``vs plain`` divides by their mean).
- ``ray-1``: the same loop as a 1-worker Ray Train job (DDP wrapper off at one worker).
- ``ray-2``: 2 workers with DDP (gloo on CPU), the same per-worker batch, so twice the
  global batch per iteration: samples/s is the scaling figure.

steps/s is measured inside the loop (training only; checkpoints are reported once, at the
end); ``wall_s`` is the whole job, worker start-up and teardown included. Tracking is off,
so MLflow costs nothing here. Prints a table, and one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from flows.ingest.resolve import ensure_snapshot


def bench_plain(cfg) -> dict:
    import torch

    from flows.settings import snapshot_root
    from flows.snapshots.load import load_dataset
    from gan_core.train import init_state, train

    torch.set_num_threads(1)
    manifest = ensure_snapshot(cfg.data.dataset, snapshot_root(), cfg.data.image_size)
    data = load_dataset(manifest.id, "train", snapshot_root())
    state = init_state(cfg, data, "cpu")
    warm = min(20, cfg.train.steps // 10)
    train(state, data, until=warm)
    t0 = time.perf_counter()
    train(state, data)
    seconds = time.perf_counter() - t0
    steps = cfg.train.steps - warm
    return {
        "mode": "plain",
        "workers": 1,
        "steps_per_s": steps / seconds,
        "samples_per_s": steps / seconds * cfg.train.batch_size,
        "wall_s": seconds,
    }


def bench_ray(cfg, workers: int, cpus_per_worker: float) -> dict:
    from flows.settings import snapshot_root
    from flows.train.driver import run_training
    from flows.train.spec import ClusterSpec, TrainRequest

    manifest = ensure_snapshot(cfg.data.dataset, snapshot_root(), cfg.data.image_size)
    t0 = time.perf_counter()
    out = run_training(
        TrainRequest(
            cfg=cfg,
            manifest=manifest,
            cluster=ClusterSpec(workers=workers, cpus_per_worker=cpus_per_worker),
            tracking=False,
            checkpoint_every=cfg.train.steps,
        )
    )
    wall = time.perf_counter() - t0
    m = out.metrics
    return {
        "mode": f"ray-{workers}",
        "workers": workers,
        "steps_per_s": m["train_steps_per_s"],
        "samples_per_s": m["train_steps_per_s"] * cfg.train.batch_size * workers,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench.train", description=__doc__)
    p.add_argument("--family", default="gan")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--cpus-per-worker", type=float, default=0.9)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from gan_core.overrides import apply_overrides
    from gan_core.presets import preset

    cfg = apply_overrides(
        preset(args.family, "default"),
        {"train.steps": args.steps, "train.log_every": max(1, args.steps // 10)},
    )
    # plain runs first and last: on a shared machine the spread between them is the noise.
    rows = [bench_plain(cfg)]
    for workers in (1, 2):
        rows.append(bench_ray(cfg, workers, args.cpus_per_worker))
    rows.append(bench_plain(cfg))
    base = (rows[0]["steps_per_s"] + rows[-1]["steps_per_s"]) / 2
    print(f"{cfg.family} m={cfg.train.batch_size}/worker, {args.steps} steps, 1 thread/process")
    print(f"{'mode':8} {'steps/s':>9} {'vs plain':>9} {'samples/s':>10} {'wall s':>8}")
    for r in rows:
        r["vs_plain"] = r["steps_per_s"] / base
        print(
            f"{r['mode']:8} {r['steps_per_s']:9.1f} {r['vs_plain']:9.2f} "
            f"{r['samples_per_s']:10.0f} {r['wall_s']:8.1f}"
        )
    print(json.dumps({"family": cfg.family, "steps": args.steps, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

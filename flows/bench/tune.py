"""Benchmark of the search (`python -m flows.bench.tune`): trials per hour on this machine at
the default tiny budget, and the share of trial wall time spent outside training
(scheduling, Ray Train worker start and teardown, evaluation, tracking).

The training share is measured, not guessed: the same trial config is trained with
gan_core's plain loop in this process, and trials x that time is compared with the
search's wall time x its concurrency. Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import time

import torch


def main(family: str = "cyclegan", steps: int = 40, samples: int = 1) -> dict:
    from flows.ingest.resolve import ensure_snapshot
    from flows.tune.search import SearchRequest, run_search
    from flows.tune.space import default_space, validate_space
    from gan_core.data import load_builtin
    from gan_core.overrides import apply_overrides
    from gan_core.presets import preset
    from gan_core.train import init_state, train

    base = apply_overrides(
        preset(family), {"train.steps": steps, "train.log_every": max(1, steps // 4)}
    )
    space = validate_space(default_space(family), base)
    manifest = ensure_snapshot(base.data.dataset, image_size=base.data.image_size)
    t0 = time.perf_counter()
    result = run_search(
        SearchRequest(family, manifest, base, space, samples=samples, scheduler="fifo"),
        progress=False,
    )
    wall = time.perf_counter() - t0
    n = len(result.trials)
    torch.set_num_threads(1)
    data = load_builtin(base.data.dataset, base.data.image_size)
    t1 = time.perf_counter()
    train(init_state(base, data, "cpu"), data)
    train_s = time.perf_counter() - t1
    import ray

    concurrency = max(1, int(ray.cluster_resources().get("CPU", 1) // 0.9))
    out = {
        "family": family,
        "steps_per_trial": steps,
        "trials": n,
        "wall_s": round(wall, 1),
        "trials_per_hour": round(n / wall * 3600, 1),
        "concurrency": concurrency,
        "train_s_per_trial": round(train_s, 2),
        "share_outside_training": round(1 - n * train_s / (wall * concurrency), 3),
    }
    print(
        f"{n} trials of {steps} steps in {wall:.0f} s at concurrency {concurrency}: {out['trials_per_hour']} trials/h; training itself {train_s:.1f} s a trial; {100 * out['share_outside_training']:.0f}% of trial wall time outside training"
    )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

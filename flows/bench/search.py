"""PBT vs ASHA vs a single run at equal compute: `python -m flows.bench.search`.

What a user choosing ``search:`` in the pipeline config gets, measured through the pipeline
itself (`ganflow run --config ... --json`, local Ray, MLflow on SQLite, Prefect without a
server), each arm in a fresh ``GANFLOW_HOME`` so each registers its first champion:

- ``single``: no search, one run of ``trials x steps`` steps (``search: false``);
- ``asha``: ASHA over the family's default space (``search: true``, ``search_samples: 1``:
  a population of 4 configs of ``steps`` steps, the worst stopped early), then the best
  config trained again from scratch for ``steps`` (the pipeline's ASHA path);
- ``pbt``: Population Based Training of the same population (``search: pbt``), 4 trials of
  ``steps`` steps, values mutated on exploit; the best trial's generator is the model.

Per arm: the registered model's primary metric on the snapshot's val split as promotion
measured it (the same judge and split for every arm of a dataset), the steps trained in
all, and the chain's wall time. Datasets: ``digits-cgan`` and ``digits-cyclegan`` (the
built-in sets) and ``shapes-cgan`` (an own RGB folder: 600 32 px shapes in random colours,
the conv preset). Prints a Markdown table and one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ARMS = ("single", "asha", "pbt")
DATASETS = {
    # name: (family, dataset reference or "shapes-folder", steps per trial)
    "digits-cgan": ("cgan", "builtin:digits", 1000),
    "digits-cyclegan": ("cyclegan", None, 200),
    "shapes-cgan": ("cgan", "shapes-folder", 1500),
}
POPULATION = 4  # the default spaces' population at search_samples 1


def arm_config(arm: str, family: str, dataset: str | None, steps: int) -> dict:
    cfg: dict = {"families": [family]}
    if dataset:
        cfg["datasets"] = {family: dataset}
    if arm == "single":
        cfg["overrides"] = {family: {"train.steps": POPULATION * steps}}
        cfg["search"] = False
    else:
        cfg["overrides"] = {family: {"train.steps": steps}}
        cfg["search"] = True if arm == "asha" else "pbt"
        cfg["search_samples"] = 1
        cfg["search_steps"] = steps
    return cfg


def run_arm(arm: str, family: str, dataset: str | None, steps: int, work: Path, log) -> dict:
    home = work / arm
    home.mkdir(parents=True)
    cache = Path(os.environ.get("GANFLOW_HOME", Path.home() / ".ganflow")) / "cache"
    if cache.is_dir():  # judges trained before: the same judge for every arm, and no retrain
        (home / "cache").mkdir()
        for f in cache.iterdir():
            if f.is_file():
                (home / "cache" / f.name).write_bytes(f.read_bytes())
    cfg_path = home / "pipeline.yaml"
    cfg_path.write_text(yaml.safe_dump(arm_config(arm, family, dataset, steps)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GANFLOW_", "MLFLOW_"))}
    env |= {"GANFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg_path), "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log(f"{arm} failed:\n{proc.stderr[-3000:]}")
        return {"arm": arm, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    row = result["results"][0]  # ganflow run --json: {"results": [one row per family]}
    promotion = row.get("promotion") or {}
    total = POPULATION * steps + (steps if arm == "asha" else 0)
    return {
        "arm": arm,
        "metric": promotion.get("metric"),
        "value": promotion.get("candidate"),
        "decision": row.get("decision"),
        "version": row.get("version"),
        "steps_at_most": total,
        "chain_s": row.get("seconds"),
        "wall_s": round(wall, 1),
    }


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| data | arm | registered model's val metric | steps (at most) | chain s | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {name} | {r['arm']} | failed: {r['error']} | | | |")
                continue
            value = "-" if r["value"] is None else f"{r['metric']} {r['value']:.4g}"
            chain = "-" if r["chain_s"] is None else f"{r['chain_s']:.0f}"
            lines.append(
                f"| {name} | {r['arm']} | {value} | {r['steps_at_most']} | {chain} | "
                f"{r['wall_s']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m flows.bench.search", description=__doc__)
    p.add_argument("--datasets", default=",".join(DATASETS), help=",".join(DATASETS))
    p.add_argument("--arms", default=",".join(ARMS), help=",".join(ARMS))
    p.add_argument("--steps", type=int, default=None, help="steps per trial (default: per set)")
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = p.parse_args(argv)
    names = [n for n in args.datasets.split(",") if n]
    arms = [a for a in args.arms.split(",") if a]
    bad = sorted(set(names) - set(DATASETS)) + sorted(set(arms) - set(ARMS))
    if bad:
        p.error(f"unknown {bad}; datasets: {list(DATASETS)}, arms: {list(ARMS)}")
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{(time.monotonic() - t0) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ganflow-bench-search-") as tmp:
        for name in names:
            family, dataset, steps = DATASETS[name]
            steps = args.steps or steps
            if dataset == "shapes-folder":
                from flows.bench.retrain import write_shapes_folder

                dataset = str(write_shapes_folder(Path(tmp) / "shapes", 1.0))
            results[name] = []
            for arm in arms:
                log(f"{name}: {arm} ({family}, {steps} steps per trial)")
                row = run_arm(arm, family, dataset, steps, Path(tmp) / name, log)
                results[name].append(row)
                log(f"  {json.dumps(row)}")
    md = table(results)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(md + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()

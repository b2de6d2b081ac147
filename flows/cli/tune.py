"""`ganflow tune`: the command line of the search (flows/tune), kept apart so that building
the command line never imports Ray or Prefect."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.tune.summary import SearchResult

# --- command line -----------------------------------------------------------------------


def cmd_tune(args: argparse.Namespace) -> dict:
    from flows.orchestration.inputs import config_and_snapshot
    from flows.tune.search import SearchRequest, run_search
    from flows.tune.space import check_args, count_trials, load_space, validate_space

    # The command line's part of the request, checked before the dataset is resolved.
    opts = {
        "samples": args.samples,
        "scheduler": args.scheduler,
        "max_concurrent": args.max_concurrent,
        "workers_per_trial": args.workers_per_trial,
        "gpus_per_worker": args.gpus_per_worker,
        "name": args.name,
        "resume": args.resume,
    }
    check_args(**opts)
    base, manifest = config_and_snapshot(args.family, None, args.overrides, args.dataset)
    space = validate_space(load_space(args.space, args.family), base)
    n = count_trials(space, args.samples)
    if not args.json:
        print(f"search over {', '.join(space)}: {n} trials, scheduler {args.scheduler}")
    pbt = {
        "perturbation_interval": args.perturbation_interval,
        "quantile": args.quantile,
        "resample_probability": args.resample_probability,
        "synch": args.synch,
    }
    result = run_search(
        SearchRequest(family=args.family, manifest=manifest, base=base, space=space, **opts, **pbt),
        progress=not args.json,
    )
    if not args.json:
        print(format_trials(result))
        best = result.best
        if best is not None and best.schedule:
            from flows.tune.pbt import format_schedule

            print(f"schedule of the winner (trial {best.trial_id}, its generator is the model):")
            print(format_schedule(best.schedule, base.train.steps))
    return result.to_dict()


def format_trials(result: SearchResult) -> str:
    lines = [f"{'trial':>10}  {'config':40}  {result.metric:>12}  {'step':>5}  status"]
    for t in result.trials:
        cfg = ", ".join(
            f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
            for k, v in t.config.items()
        )
        status = "error" if t.error else ("stopped early" if t.stopped_early else "completed")
        val = "-" if t.metric is None else f"{t.metric:.4g}"
        lines.append(f"{str(t.trial_id):>10}  {cfg:40}  {val:>12}  {t.step:>5}  {status}")
    b = result.best
    lines.append(
        "best: none completed"
        if b is None
        else f"best: {dict(b.config)} {b.metric_name}={b.metric:.4g} (run {b.run_id})"
    )
    return "\n".join(lines)


def add_commands(sub, add_common) -> None:
    from flows.train.options import OPTIONS, add_arguments

    p = sub.add_parser(
        "tune", help="search λ (lambda_cyc), k (d_steps) and other fields with Ray Tune"
    )
    add_arguments(p, [OPTIONS["family"]])
    p.add_argument(
        "--dataset",
        default=None,
        metavar="SNAPSHOT",
        help="snapshot id or name, or builtin:NAME (default: the family's built-in data)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="samples per grid point / random samples (default: 1)",
    )
    p.add_argument(
        "--space",
        default=None,
        metavar="FILE",
        help="YAML: field: {grid|choice: [..]} or {uniform|loguniform|randint: [low, high]}",
    )
    p.add_argument(
        "--scheduler",
        choices=("asha", "fifo", "pbt", "pb2"),
        default="asha",
        help="asha/fifo: fixed configs (the best is retrained); pbt/pb2: Population Based "
        "Training, hyperparameters change during training and the best trial's generator "
        "is the model",
    )
    p.add_argument(
        "--perturbation-interval",
        type=int,
        default=None,
        metavar="STEPS",
        help="pbt/pb2: steps between exploit/explore (default: the eval interval)",
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=0.25,
        help="pbt/pb2: bottom fraction that copies the top one (default: 0.25, Ray's)",
    )
    p.add_argument(
        "--resample-probability",
        type=float,
        default=0.25,
        help="pbt: chance a mutated field is drawn afresh (default: 0.25, Ray's)",
    )
    p.add_argument(
        "--synch",
        action="store_true",
        help="pbt/pb2: decide when every trial has reached the interval (early ones wait) "
        "rather than as each reports; for small populations",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: what the cluster's CPUs fit)",
    )
    p.add_argument("--workers-per-trial", type=int, default=1)
    # As `ganflow train` declares it (a trial is a training job); flows.tune.space checks it,
    # so that a bad value is the search's own error.
    add_arguments(p, [OPTIONS["gpus_per_worker"]])
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fixed overrides for every trial, e.g. train.steps=200",
    )
    p.add_argument("--name", default=None, help="search name (reuse it with --resume)")
    p.add_argument("--resume", action="store_true", help="resume the interrupted search --name")
    add_common(p)
    p.set_defaults(func=cmd_tune)

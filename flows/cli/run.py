"""`ganflow run` (the retraining pipeline) and `ganflow schedule` (served on a cron).

Kept apart from flows/orchestration/retraining.py so that building the command line never imports Prefect.
"""

from __future__ import annotations

import argparse

# --- command line -----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> dict:
    from flows.orchestration.retraining import PipelineConfig, retraining_flow
    from flows.preflight import check_services

    PipelineConfig.load(args.config)  # validate before Ray or MLflow start
    check_services()  # every configured remote service answers, before any work
    result = retraining_flow(args.config)
    if not args.json:
        print(result["summary"])
        print("\nSample from a champion: ganflow generate NAME --out samples.png")
    return {"results": result["results"]}


def cmd_schedule(args: argparse.Namespace) -> dict:
    """Serve the retraining flow on a cron schedule in this process (no infrastructure)."""
    from flows.orchestration.retraining import PipelineConfig, retraining_flow

    PipelineConfig.load(args.config)
    if not args.json:
        print(f"serving ganflow-retraining on cron '{args.cron}' (Ctrl-C to stop)")
    retraining_flow.serve(name=args.name, cron=args.cron, parameters={"config_path": args.config})
    return {"served": args.name, "cron": args.cron}


def add_commands(sub, add_common) -> None:
    run = sub.add_parser(
        "run",
        help="the retraining pipeline: ingest, optional search, train, evaluate, register, promote",
    )
    run.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="pipeline YAML (families, datasets, overrides, search, workers, margin); default: embedded defaults",
    )
    add_common(run)
    run.set_defaults(func=cmd_run)
    sch = sub.add_parser(
        "schedule", help="serve the retraining flow on a cron schedule (flow.serve)"
    )
    sch.add_argument("--cron", default="0 3 * * 1", help="cron expression (default: Mondays 03:00)")
    sch.add_argument("--config", default=None, metavar="FILE")
    sch.add_argument("--name", default="ganflow-weekly-retraining", help="deployment name")
    add_common(sch)
    sch.set_defaults(func=cmd_schedule)

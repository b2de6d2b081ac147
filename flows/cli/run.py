"""`ganflow run` (the retraining pipeline) and `ganflow schedule` (served on a cron).

Kept apart from flows/orchestration/retraining.py so that building the command line never imports Prefect.
"""

from __future__ import annotations

import argparse

# --- command line -----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> dict:
    from flows.orchestration.retraining import PipelineConfig, all_kept, retraining_flow
    from flows.preflight import check_services

    pc = PipelineConfig.load(args.config)  # validate before Ray or MLflow start
    check_datasets(pc)
    check_services()  # every configured remote service answers, before any work
    kept = all_kept(pc, args.force)
    if kept is not None:
        # Nothing to ingest or train anywhere: the decision took a listing per source and a
        # few registry reads; no Prefect server, no Ray (the flow would decide the same).
        from flows.orchestration.retraining import summary_markdown
        from flows.tracking import log_retraining, redact, tracking_uri

        run_id = log_retraining(tracking_uri(), kept)
        result = {
            "results": kept,
            "summary": summary_markdown(kept, redact(tracking_uri()), run_id),
        }
    else:
        result = retraining_flow(args.config, force=args.force)
    if not args.json:
        print(result["summary"])
        print("\nSample from a champion: ganflow generate NAME --out samples.png")
    return {"results": result["results"]}


def check_datasets(pc) -> None:
    """Each family's dataset is a snapshot here, a built-in, a remote source (checked when it
    is read) or a local path that exists: a missing folder is one line before any work, not
    a failed flow run."""
    import os

    from flows.orchestration.retraining import PipelineError
    from flows.snapshots.load import resolve_snapshot
    from flows.snapshots.store import SnapshotNotFound

    for family in pc.families:
        ref = pc.dataset(family)
        if ref.startswith("builtin:") or ("://" in ref and not ref.startswith("file://")):
            continue
        try:
            resolve_snapshot(ref)
            continue
        except SnapshotNotFound as exc:
            if "/" not in ref:  # not a path: a snapshot name that is not there
                raise PipelineError(f"datasets.{family}: {exc}") from None
        path = os.path.expanduser(ref.removeprefix("file://"))
        if not os.path.exists(path):
            raise PipelineError(f"datasets.{family}: source not found: {ref}")


def check_cron(cron: str) -> None:
    """One line for a bad cron expression, before anything is served."""
    from prefect._internal.schemas.validators import validate_cron_string

    from flows.errors import UserError

    try:  # Prefect's own rule, the one serve() applies (its error is a 5-line pydantic dump)
        validate_cron_string(cron)
    except ValueError as exc:
        raise UserError(
            f"--cron: {exc} (e.g. '0 3 * * 1': minute hour day month weekday)"
        ) from None


def cmd_schedule(args: argparse.Namespace) -> dict:
    """Serve the retraining flow on a cron schedule in this process (no infrastructure)."""
    check_cron(args.cron)
    from flows.orchestration.retraining import PipelineConfig, retraining_flow

    check_datasets(PipelineConfig.load(args.config))
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
        help="pipeline YAML (families, datasets, overrides, search, workers, margin, retrain); default: embedded defaults",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="train every family even when its champion was already trained on this snapshot with this config",
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

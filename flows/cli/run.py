"""`ganflow run` (the retraining pipeline), `ganflow schedule` (served on a cron, and with
--watch on new data) and `ganflow watch` (dataset sources -> ganflow.dataset.changed events).

Kept apart from flows/orchestration/retraining.py so that building the command line never imports Prefect.
"""

from __future__ import annotations

import argparse

from flows.errors import UserError

# --- command line -----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> dict:
    from flows.orchestration.retraining import (
        FamiliesFailed,
        PipelineConfig,
        Retraining,
        all_kept,
        retraining_flow,
    )
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

        run_id = log_retraining(tracking_uri(), [r.to_dict() for r in kept])
        summary = summary_markdown(kept, redact(tracking_uri()), run_id)
        result = Retraining(tuple(kept), summary, run_id)
    else:
        try:
            result = retraining_flow(args.config, force=args.force)
        except FamiliesFailed as exc:
            # The others finished: their rows first, then one line naming the failed ones
            # (and a non-zero exit status).
            if not args.json:
                print(exc.result.summary)
            raise UserError(str(exc)) from None
    if not args.json:
        print(result.summary)
        print("\nSample from a champion: ganflow generate NAME --out samples.png")
    return {"results": [r.to_dict() for r in result.results]}


def check_datasets(pc) -> None:
    """Each family's dataset as the resolver will find it (flows.ingest.resolve): a missing
    snapshot or folder is one line naming the family before any work, not a failed flow
    run."""
    from flows.ingest.resolve import check_reference
    from flows.orchestration.retraining import PipelineError
    from flows.snapshots.store import SnapshotNotFound

    for family in pc.families:
        try:
            check_reference(pc.dataset(family))
        except (SnapshotNotFound, FileNotFoundError) as exc:
            raise PipelineError(f"datasets.{family}: {exc}") from None


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
    """Serve the retraining flow on a cron schedule in this process (no infrastructure);
    with --watch, also on new data: the dataset watcher every --watch seconds, and a trigger
    that retrains the families of a source when it sends ganflow.dataset.changed."""
    check_cron(args.cron)
    from flows.orchestration.retraining import PipelineConfig, retraining_flow

    pc = PipelineConfig.load(args.config)
    check_datasets(pc)
    params = {"config_path": args.config}
    if not args.watch:
        if not args.json:
            print(f"serving ganflow-retraining on cron '{args.cron}' (Ctrl-C to stop)")
        retraining_flow.serve(name=args.name, cron=args.cron, parameters=params)
        return {"served": args.name, "cron": args.cron}

    from prefect import serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.orchestration.watch import sources_of, watch_flow

    require_server("ganflow schedule --watch")
    watched = sources_of(None, args.config)
    deployments = [
        retraining_flow.to_deployment(
            name=args.name,
            cron=args.cron,
            parameters=params,
            triggers=[retrain_trigger(f"{args.name}-on-new-data", sorted(watched))],
        ),
        watch_flow.to_deployment(
            name=f"{args.name}-watcher",
            interval=args.watch,
            parameters={**params, "quiet_seconds": args.quiet},
            # One poll at a time: two overlapping polls (a slow poll, a short interval) both
            # read the debounce record and both sent the event (seen: two retraining runs).
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
        ),
    ]
    if not args.json:
        print(
            f"serving ganflow-retraining on cron '{args.cron}' and on new data in "
            f"{len(watched)} source(s), polled every {args.watch:g} s, "
            f"{args.quiet:g} s of quiet (Ctrl-C to stop)"
        )
    serve(*deployments, print_starting_message=not args.json)
    return {"served": args.name, "cron": args.cron, "watch": sorted(watched)}


def retrain_trigger(name: str, sources: list[str]):
    """Run the retraining deployment for the source a ganflow.dataset.changed event names
    (the flow retrains only the families whose dataset it is)."""
    from prefect.events import DeploymentEventTrigger

    from flows.orchestration.watch import EVENT

    return DeploymentEventTrigger(
        name=name,
        expect={EVENT},
        match={"prefect.resource.id": sources},
        parameters={"source": "{{ event.resource.id }}"},
    )


def require_server(what: str) -> None:
    """Events and triggers live on a Prefect server: the ephemeral one a process starts
    without PREFECT_API_URL lives as long as the process and holds no deployment, so an
    event sent there would start nothing."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise UserError(
                f"{what} sends events to a Prefect server: set PREFECT_API_URL "
                "(e.g. http://127.0.0.1:4200/api after `prefect server start`)"
            )


def cmd_watch(args: argparse.Namespace) -> dict:
    """Poll sources every --every seconds (or once) and emit ganflow.dataset.changed for
    each whose listing changed and then stayed quiet for --quiet seconds."""
    import time

    from flows.orchestration.watch import flush_events, poll, sources_of

    if args.every <= 0 or args.quiet < 0:
        raise UserError("--every must be > 0 and --quiet >= 0 (seconds)")
    require_server("ganflow watch")
    watched = sources_of(args.sources, args.config)
    rows = poll(watched, args.quiet)
    try:
        while not args.once:
            time.sleep(args.every)
            rows = poll(watched, args.quiet)
    finally:
        flush_events()
    return {"sources": rows}


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
    sch.add_argument(
        "--watch",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also retrain on new data: poll the config's dataset sources every SECONDS and "
        "retrain a source's families when it changed (needs PREFECT_API_URL; default: cron only)",
    )
    sch.add_argument(
        "--quiet",
        type=float,
        default=120,
        metavar="SECONDS",
        help="with --watch: a source's listing must stay unchanged this long before the event",
    )
    add_common(sch)
    sch.set_defaults(func=cmd_schedule)
    watch = sub.add_parser(
        "watch",
        help="send ganflow.dataset.changed to Prefect when a dataset source's listing changes",
    )
    watch.add_argument("sources", nargs="*", metavar="SOURCE", help="folders or s3:// prefixes")
    watch.add_argument(
        "--config", default=None, metavar="FILE", help="also watch this pipeline's sources"
    )
    watch.add_argument("--every", type=float, default=30, help="seconds between polls")
    watch.add_argument(
        "--quiet",
        type=float,
        default=120,
        help="seconds a changed listing must stay unchanged before the event (a burst of "
        "uploads is one event)",
    )
    watch.add_argument("--once", action="store_true", help="poll once and exit (for cron)")
    add_common(watch)
    watch.set_defaults(func=cmd_watch)

"""`ganflow tracking replay SPOOL`: send what a training run kept on local disk while its
MLflow tracking server was away (flows.tracking.RunLogger), then the run's final status."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_replay(args: argparse.Namespace) -> dict:
    from flows import tracking
    from flows.train.worker import replay_loss_plot

    # The run's records need the server's MLflow client; its loss plot is drawn from the
    # history they complete (the training's own code, so the plot is the one it draws).
    spool = Path(args.spool)
    try:
        result = tracking.replay_spool(spool, handlers={"loss_plot": replay_loss_plot})
    except Exception as exc:
        if not tracking.is_outage(exc):
            raise
        # What was sent is marked in the spool: running the command again goes on from there.
        left = tracking.Spool(spool).pending()
        raise tracking.TrackingError(
            f"the tracking server went away during the replay ({left} records left in "
            f"{spool}); run the command again when it answers"
        ) from None
    if not args.json:
        status = f"; run ended {result['status']}" if result["status"] else ""
        dropped = (
            f" ({result['dropped']} dropped by the spool's bounds)" if result["dropped"] else ""
        )
        print(f"run {result['run_id']}: sent {result['sent']} records{dropped}{status}")
    return result


def add_commands(sub, add_common) -> None:
    p = sub.add_parser("tracking", help="MLflow tracking: replay a run's spooled records")
    tsub = p.add_subparsers(dest="tracking_command", required=True, metavar="COMMAND")
    rp = tsub.add_parser(
        "replay",
        help="send a spool kept while the tracking server was away (its path is printed at "
        "the end of the run), then set the run's final status",
    )
    rp.add_argument("spool", metavar="SPOOL_DIR", help="GANFLOW_HOME/tracking-spool/<run id>")
    add_common(rp)
    rp.set_defaults(func=cmd_replay)

"""The console shows ganflow's own lines; Ray's, MLflow's and Prefect's chatter goes to a log
file under GANFLOW_HOME/logs, whose path is printed when something was written to it.
``--verbose`` keeps everything on the terminal, as the libraries print it.

Ray workers' and the Train controller's output stays in Ray's own session logs: on a quiet
console the driver streams only the workers' ``[ganflow]`` lines (Ray's own skip filter,
RAY_DEDUP_LOGS_SKIP_REGEX), so a C++ line such as core_worker.cc's PreemptionWatcher note or a
library's INFO line from inside a worker (matplotlib's "generated new fontManager" the first
time its font cache is built) is not shown; their folder is printed with the file's path.
tests/test_console.py counts the lines of a `ganflow train` run that are not ganflow's.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

# Loggers of the libraries whose INFO lines are not the user's business on a normal run.
_LIBRARIES = (
    "ray",
    "mlflow",
    "alembic",
    "prefect",
    "botocore",
    "urllib3",
    "httpx",
    "filelock",
    "matplotlib",
)
# Lines that workers print and the driver streams: only ganflow's own (Ray reads the variable
# when it is imported, so it is set before that; a user's own value is kept).
WORKER_LINES_SKIPPED = r"^(?!\[ganflow\])"
_handler: logging.Handler | None = None


def quiet() -> bool:
    """Whether library output is routed away from the terminal (no --verbose)."""
    return _handler is not None


def route_library_logs(command: str, verbose: bool) -> Path | None:
    """Send the libraries' log records to GANFLOW_HOME/logs/<command>-<time>.log (None and
    nothing changed with verbose). Call before the libraries are used."""
    global _handler
    # The embedded Prefect server's telemetry: a machine without internet logs an ERROR per
    # heartbeat otherwise (and it is nothing the user asked for).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if verbose:
        return None
    from flows.settings import ganflow_home

    path = ganflow_home() / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # checked before (flows.preflight), but the folder may be another's
        from flows.errors import UserError

        reason = (exc.strerror or type(exc).__name__).lower()
        raise UserError(f"cannot create the log folder {path.parent} ({reason})") from None
    _handler = logging.FileHandler(path, delay=True)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    # Prefect and MLflow configure their own console handlers when imported and read their
    # levels then (MLflow's "Creating initial MLflow database tables" lines are INFO).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", WORKER_LINES_SKIPPED)
    reapply()
    return path


def reapply() -> None:
    """Route again: libraries add their own handlers when they start (ray.init does). Every
    logger of theirs that exists is pinned to the file, not only the top one: ray.init puts
    a console handler back on the ``ray`` logger before it logs its token-authentication
    warning from a child logger."""
    if _handler is None:
        return
    names = set(_LIBRARIES)
    names.update(n for n in logging.root.manager.loggerDict if n.split(".")[0] in _LIBRARIES)
    for name in names:
        lg = logging.getLogger(name)
        lg.handlers = [_handler]
        lg.propagate = False


def ray_session_logs() -> str | None:
    if "ray" not in sys.modules:  # never imported, so never started: no import (seconds) for it
        return None
    try:
        import ray

        node = ray._private.worker.global_worker.node  # noqa: SLF001 (no public accessor)
        return os.path.join(node.get_session_dir_path(), "logs")
    except Exception:  # Ray not started, or its internals moved: the path is a courtesy
        return None


def report(path: Path | None) -> None:
    """Say where the routed logs are, when anything went there."""
    if path is None or not path.exists() or path.stat().st_size == 0:
        return
    extra = ray_session_logs()
    where = f"{path}" + (f"; Ray worker logs: {extra}" if extra else "")
    print(f"[ganflow] library logs: {where} (--verbose shows them here)", file=sys.stderr)

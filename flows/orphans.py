"""MLflow runs whose process died without a word (SIGKILL, the OOM killer, a lost machine).

A process that owns a RUNNING run ends it FINISHED, FAILED or KILLED on every way out it is
given a chance to take (flows.train.driver, flows.tune.search); a SIGKILL gives it none, and
the run would stay RUNNING forever. So while it works, the owner beats: a daemon thread sets
the run's ``ganflow.heartbeat`` tag (UTC time) every ``GANFLOW_HEARTBEAT_S`` seconds (default
30: one tag write, nothing per training step) and ``ganflow.owner`` (``<pid>@<host>``) once.

The next command that touches the experiment (:func:`reap`, called where a training or a
search opens its experiment) marks a RUNNING run KILLED, with ``ganflow.killed_reason``
saying why, when its owner is this machine's and that process is gone, or when its last beat
is ``MISSED_BEATS`` intervals old (an owner on another machine; the clocks are compared, so
they should agree to within minutes). Runs without a heartbeat (another tool's, or from
before this) are never touched. Nothing else about a run changes: its metrics, params and
artifacts stay as the dead process left them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import sys
import threading

HEARTBEAT_TAG = "ganflow.heartbeat"
OWNER_TAG = "ganflow.owner"
REASON_TAG = "ganflow.killed_reason"
DEFAULT_INTERVAL_S = 30.0
# A beat this many intervals late marks the run (5 minutes by default): a busy tracking store
# or a loaded machine delays a beat by seconds, never by ten intervals.
MISSED_BEATS = 10

log = logging.getLogger(__name__)


def interval_s() -> float:
    raw = os.environ.get("GANFLOW_HEARTBEAT_S")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        raise ValueError(f"GANFLOW_HEARTBEAT_S must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"GANFLOW_HEARTBEAT_S must be > 0, got {raw!r}")
    return value


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


class Heartbeat:
    """``with Heartbeat(uri, run_id):`` the run's heartbeat while the block runs. The first
    beat is written before the block starts; a failed beat (the tracking store away) is
    logged and the next one tried, never raised into the work it watches."""

    def __init__(self, uri: str, run_id: str, every_s: float | None = None):
        self.uri, self.run_id = uri, run_id
        self.every_s = interval_s() if every_s is None else every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        from flows.tracking import client

        client(self.uri).set_tag(self.run_id, HEARTBEAT_TAG, _stamp(_now()))

    def __enter__(self) -> Heartbeat:
        from flows.tracking import client

        with contextlib.suppress(Exception):
            client(self.uri).set_tag(self.run_id, OWNER_TAG, _owner())
            self.beat()
        self._thread = threading.Thread(
            target=self._loop, name=f"ganflow-heartbeat-{self.run_id[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except Exception as exc:  # the tracking store's outage is not the work's failure
                log.warning("heartbeat of MLflow run %s not written: %s", self.run_id, exc)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _alive(pid: int) -> bool:
    """Whether process pid exists on this machine and is not a zombie (a killed child not
    yet waited for is one, and os.kill still finds it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def orphan_reason(tags: dict[str, str], now: dt.datetime, host: str, every_s: float) -> str | None:
    """Why a RUNNING run with these tags has no living owner, or None while it may have one
    (or when it never had a heartbeat)."""
    beat = tags.get(HEARTBEAT_TAG)
    if not beat:
        return None
    owner = tags.get(OWNER_TAG, "")
    pid, _, owner_host = owner.partition("@")
    if owner_host == host and pid.isdigit() and not _alive(int(pid)):
        return f"its process {pid} on {host} is gone (last heartbeat {beat})"
    try:
        last = dt.datetime.strptime(beat, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None  # not ours to judge
    late = (now - last).total_seconds()
    if late > MISSED_BEATS * every_s:
        return f"no heartbeat for {late:.0f} s (last {beat} from {owner or 'an unknown owner'})"
    return None


def reap(uri: str, experiment_ids: list[str], quiet: bool = False) -> list[str]:
    """Mark KILLED every RUNNING run of these experiments whose owner is gone (see the module
    notes); one line on stderr for each. Returns their run ids. A tracking store that cannot
    be asked is not this function's failure: nothing is marked then."""
    from flows.tracking import client

    c = client(uri)
    try:
        running = c.search_runs(
            experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=1000
        )
    except Exception as exc:
        log.warning("orphaned runs not looked for: %s", exc)
        return []
    now, host, every = _now(), socket.gethostname(), interval_s()
    marked = []
    for run in running:
        reason = orphan_reason(run.data.tags, now, host, every)
        if reason is None:
            continue
        run_id = run.info.run_id
        if c.get_run(run_id).info.status != "RUNNING":  # it ended while we looked
            continue
        c.set_tag(run_id, REASON_TAG, f"{reason}; marked KILLED by {_owner()} at {_stamp(now)}")
        c.set_terminated(run_id, status="KILLED")
        marked.append(run_id)
        if not quiet:
            print(
                f"[ganflow] MLflow run {run.info.run_name} ({run_id}) was left RUNNING: "
                f"{reason}; marked KILLED",
                file=sys.stderr,
                flush=True,
            )
    return marked

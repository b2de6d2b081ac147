"""Start retraining on new data: a light watcher that turns a changed dataset source into one
Prefect event, ``ganflow.dataset.changed``, which a deployment trigger turns into a
retraining run for the families that use the source (deploy/prefect.yaml, ``ganflow
schedule --watch``).

A poll lists each source the way ingest does before anything else (paths, sizes, ETags or
mtimes; :func:`flows.ingest.stages.scan_source`: nothing is read or decoded, one listing
per source) and compares the listing's fingerprint with the last one recorded for that
source:

- the same as the one last emitted (or recorded on the first poll): nothing;
- different: the source is *pending* from now; each further change restarts the wait;
- pending and unchanged for ``quiet_seconds``: one event (resource id: the source), and the
  fingerprint is recorded as emitted.

So a burst of uploads is one event, sent once the listing has been quiet for the whole
period, and an unchanged source never sends one. The first poll of a source records its
fingerprint without an event (its data is what the last retraining, or the first `ganflow
run`, trained on).

The records are Prefect variables on the server the events go to (one per source,
``ganflow-watch-<digest of the source>``), so `ganflow watch` and the dataset-watcher
deployment, on whichever worker it runs, read and write the same ones. Run one watcher per
source: two would each send the event.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass

from prefect import flow

from flows.errors import UserError
from flows.orchestration.sources import is_source, source_id

EVENT = "ganflow.dataset.changed"
DEFAULT_QUIET_SECONDS = 120.0


@dataclass(frozen=True)
class Listing:
    fingerprint: str
    files: int
    bytes: int


def list_source(ref: str) -> Listing:
    """The source's listing fingerprint, as ingest computes it for its unchanged check."""
    from flows.ingest.stages import IngestOptions, scan_source

    scan = scan_source(ref, IngestOptions())
    return Listing(scan.fingerprint, len(scan.entries), sum(e[1] for e in scan.entries))


@dataclass(frozen=True)
class Record:
    """What the watcher knows of a source between polls."""

    emitted: str | None = None
    """The fingerprint last emitted (or recorded on the first poll)."""
    pending: str | None = None
    """A different fingerprint seen since, waiting for the quiet period."""
    changed_at: float | None = None
    """When the listing last changed (epoch seconds): the quiet period counts from here."""


def step(record: Record | None, fingerprint: str, now: float, quiet: float) -> tuple[Record, bool]:
    """The next record and whether to emit, for one poll that saw ``fingerprint``."""
    if record is None:  # first sight: its data is the baseline
        return Record(emitted=fingerprint), False
    if fingerprint == record.emitted:  # unchanged, or changed and changed back
        return Record(emitted=record.emitted), False
    if fingerprint != record.pending:  # a (further) change: the wait starts again
        return Record(record.emitted, fingerprint, now), False
    if now - (record.changed_at or now) >= quiet:
        return Record(emitted=fingerprint), True
    return record, False


def _variable_name(sid: str) -> str:
    return "ganflow-watch-" + hashlib.sha256(sid.encode()).hexdigest()[:16]


def read_record(sid: str) -> Record | None:
    from prefect.variables import Variable

    value = Variable.get(_variable_name(sid), default=None)
    if not isinstance(value, dict):
        return None
    return Record(value.get("emitted"), value.get("pending"), value.get("changed_at"))


def write_record(sid: str, record: Record) -> None:
    from prefect.variables import Variable

    from flows.storage import mask_secrets

    value = {"source": mask_secrets(sid), **asdict(record)}
    Variable.set(_variable_name(sid), value, tags=["ganflow", "watch"], overwrite=True)


def emit_changed(sid: str, listing: Listing, families: list[str]) -> None:
    from prefect.events import emit_event

    from flows.storage import mask_secrets

    emit_event(
        EVENT,
        resource={"prefect.resource.id": sid, "prefect.resource.name": mask_secrets(sid)},
        payload={
            "fingerprint": listing.fingerprint,
            "files": listing.files,
            "bytes": listing.bytes,
            "families": families,
        },
    )


class NothingToWatch(UserError):
    """Neither sources named nor a pipeline dataset that is one."""


def sources_of(sources: list[str] | None, config_path: str | None) -> dict[str, list[str]]:
    """source id -> the families that use it: the sources named, and every family dataset in
    the pipeline config that is a source (not a built-in or snapshot)."""
    from flows.orchestration.retraining import PipelineConfig

    out: dict[str, list[str]] = {source_id(s): [] for s in sources or []}
    if config_path or not sources:
        pc = PipelineConfig.load(config_path)
        for family in pc.families:
            ref = pc.dataset(family)
            if is_source(ref):
                out.setdefault(source_id(ref), []).append(family)
    if not out:
        raise NothingToWatch(
            "nothing to watch: name sources (folders, s3:// prefixes) or a pipeline config "
            "whose datasets are sources, not built-ins or snapshot ids"
        )
    return out


def poll(watched: dict[str, list[str]], quiet: float, say=None) -> list[dict]:
    """One look at every watched source; emits an event for each that changed and has been
    quiet for ``quiet`` seconds. A source that cannot be listed (gone, denied) is reported
    and keeps its record. Returns one row per source."""
    from flows.storage import mask_secrets

    say = say or _say
    rows = []
    for sid, families in watched.items():
        shown = mask_secrets(sid)
        try:
            listing = list_source(sid)
        except Exception as exc:  # one unreadable source must not stop the others
            say(f"{shown}: not listed ({type(exc).__name__}: {str(exc)[:200]})")
            rows.append({"source": shown, "state": "error", "error": str(exc)[:300]})
            continue
        record = read_record(sid)
        new, emit = step(record, listing.fingerprint, time.time(), quiet)
        if new != record:
            write_record(sid, new)
        if emit:
            emit_changed(sid, listing, families)
            say(f"{shown}: changed ({listing.files} files) -> {EVENT}")
            state = "emitted"
        elif record is None:
            say(f"{shown}: watching ({listing.files} files)")
            state = "recorded"
        elif new.pending:
            state = "pending"
            if record.pending is None:  # once per burst
                say(f"{shown}: changed; waiting {quiet:g} s of quiet before the event")
        else:
            state = "unchanged"
        rows.append({"source": shown, "state": state, "files": listing.files})
    return rows


def flush_events() -> None:
    """Send emitted events before the process ends (they go out from a background thread)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)


def _say(msg: str) -> None:
    print(f"[ganflow watch] {msg}", file=sys.stderr, flush=True)


@flow(name="ganflow-dataset-watcher", persist_result=False, log_prints=False)
def watch_flow(
    sources: list[str] | None = None,
    config_path: str | None = None,
    quiet_seconds: float = DEFAULT_QUIET_SECONDS,
) -> list[dict]:
    """One poll of the watched sources (deployed on a short interval; the debounce state
    lives in Prefect variables between runs). A pipeline without sources (built-ins only,
    the deployment's default) has nothing to watch: said, and the run completes."""
    try:
        watched = sources_of(sources, config_path)
    except NothingToWatch as exc:
        _say(str(exc))
        return []
    return poll(watched, quiet_seconds)

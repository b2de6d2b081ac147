"""What a dataset source is, and its one spelling: shared by the watcher (which names a
changed source in its event) and the retraining flow (which picks the families an event's
source feeds), so neither imports the other for it."""

from __future__ import annotations

import os


def source_id(ref: str) -> str:
    """One spelling per source, the event's resource id: a local folder as its absolute path
    (no file://, no trailing slash), a URL without its trailing slash. The retraining flow
    compares its families' datasets with an event's source through the same function."""
    from flows.storage import is_remote

    if is_remote(ref):
        return ref.rstrip("/")
    path = ref.removeprefix("file://")
    return os.path.abspath(os.path.expanduser(path)).rstrip("/") or "/"


def is_source(ref: str) -> bool:
    """A dataset reference that names files to list (a folder, a file, a URL), not a built-in
    or a snapshot id or name (those never change)."""
    return not ref.startswith("builtin:") and ("/" in ref or "://" in ref)

"""A node's local, verified copy of the snapshot shards it reads.

Training reads minibatches by index from plain local files (gan_core.data.StoredRows), so
every node needs the shards of the splits it trains and evaluates on as local files, checked
against the manifest's sha256 once, not once per worker:

- Remote roots (``s3://``...): each shard is downloaded once per node into
  ``<cache>/snapshots/<id>/`` (``<cache>``: :func:`flows.settings.cache_dir`, under
  GANFLOW_HOME), streamed to a temporary file while hashed, and renamed into place only when
  its hash matches. A file is in the cache only if it was verified; a snapshot id names its
  content, so a cached copy never goes stale.
- Local roots (a local disk, or a filesystem every node mounts): shards are read where they
  are, with no second copy. Each is hashed once per node and change (size, mtime); the
  verdict is kept in ``<cache>/snapshots/<id>/verified.json``.

Concurrent first use (eight workers of a node starting at once) is serialised by an
exclusive lock on ``<cache>/snapshots/<id>.lock``: the first worker fetches and verifies,
the others wait and then find the verified files. The lock is released by the kernel when
its holder dies, and a dead holder's temporary file is never renamed into place.

The cache is not evicted: remove ``<cache>/snapshots/<id>`` to reclaim a snapshot's space
(the next use fetches it again).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from flows.settings import cache_dir
from flows.snapshots.manifest import Manifest, Shard
from flows.snapshots.store import Store
from flows.storage import is_remote

_CHUNK = 8 << 20


def snapshot_cache(snapshot_id: str) -> Path:
    return cache_dir() / "snapshots" / snapshot_id


@contextlib.contextmanager
def _locked(snapshot_id: str) -> Iterator[None]:
    folder = cache_dir() / "snapshots"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{snapshot_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _download(store: Store, manifest: Manifest, entry: Shard, dest: Path) -> None:
    """Stream one shard into dest, renamed into place only once its hash matches."""
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex}")

    def fetch() -> str:
        h = hashlib.sha256()
        path = store.shard_path(manifest, entry.file)
        with store.fs.open(path, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        return h.hexdigest()

    try:
        digest = store._call(fetch, what=store.url, missing=None)
        if digest != entry.sha256:
            raise store.corrupt(manifest, entry.file)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def local_shards(store: Store, manifest: Manifest, files: list[str]) -> dict[str, str]:
    """{file: local path} for these shard files of a snapshot, each verified against the
    manifest on this node (ValueError naming the shard when one is missing or altered)."""
    entries = {s.file: s for s in manifest.shards}
    sid = manifest.id
    folder = snapshot_cache(sid)
    out: dict[str, str] = {}
    with _locked(sid):
        folder.mkdir(parents=True, exist_ok=True)
        if is_remote(store.url):
            for f in files:
                dest = folder / f
                if not dest.exists() or dest.stat().st_size != entries[f].bytes:
                    _download(store, manifest, entries[f], dest)
                out[f] = str(dest)
            return out
        marker = folder / "verified.json"
        try:
            verified = json.loads(marker.read_text())
        except (OSError, ValueError):
            verified = {}
        changed = False
        for f in files:
            path = store.shard_path(manifest, f)
            try:
                st = os.stat(path)
            except OSError:
                raise store.corrupt(manifest, f) from None
            stamp = [st.st_size, st.st_mtime_ns]
            if verified.get(f) != stamp:
                if st.st_size != entries[f].bytes or _sha256_file(path) != entries[f].sha256:
                    raise store.corrupt(manifest, f)
                verified[f] = stamp
                changed = True
            out[f] = path
        if changed:
            tmp = marker.with_name(f"verified.json.tmp-{uuid.uuid4().hex}")
            tmp.write_text(json.dumps(verified))
            os.replace(tmp, marker)
    return out

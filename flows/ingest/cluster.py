"""Ingest on a Ray cluster: fetch, decode and the shard writes as Ray tasks on the workers.

Selected by ``run_pipeline(cluster=...)`` / ``ganflow ingest --cluster auto|yes|no``: auto (the
default) uses the cluster when ``RAY_ADDRESS`` is set; yes uses it always, starting a local
Ray for this process when ``RAY_ADDRESS`` is unset (several decode processes on one machine,
at the cost of Ray's start-up); no never does. Listing (scan), planning, arranging (splits,
quarantine, the bad-share limit: :func:`flows.ingest.stages.arrange`) and the manifest stay on
the driver, from metadata only; the same files give the same snapshot id and byte-identical
shards, whichever path ran.

- Fetch: tasks over batches of the listing read their files, hash them and read their
  headers, and return (path, sha256, size, header dims) per file, never the bytes: the
  driver holds names, not the source, and nothing is spooled.
- Decode: tasks over chunks of the plan read each file again, check it still has the hash
  the plan was made from (a file changed meanwhile is quarantined as "changed while being
  ingested", as :meth:`SourceFile.read` does on the local path), decode it with
  :func:`flows.ingest.layouts.decode_one` and shrink it with
  :func:`flows.ingest.stages.shrink`. Each returns two objects: the files' metadata (or
  quarantine reasons), fetched by the driver, and the shrunk pixels, left in Ray's object
  store (spilled to disk by Ray when it fills; rebuilt from lineage if a node is lost).
- Write: one task per shard converts its rows (:meth:`~flows.ingest.stages.Arrangement.arrays`,
  the local path's conversion) from the decode chunks it needs and puts the shard's files in
  the store (:meth:`~flows.snapshots.store.Store.put_shard`). The driver writes the manifest
  last. So the driver's memory follows the number of files, never the pixels.
- Progress is reported as tasks finish, with the local path's callback shape
  (``progress("read" | "decode" | "write", done, total)``).

Where workers read from: an ``s3://`` source is read by each worker directly from the object
store through s3fs. The endpoint travels with the tasks (Ray's runtime env, the settings of
:func:`flows.settings.forwarded_env`); credentials never do: each node has its own (its
environment or instance role), as for training, and writes to the snapshot root with them. A
local path (source or snapshot root) is used by that path on whichever node runs the task,
so on a cluster of several machines it must be on a filesystem every node mounts at the same
path (NFS, a shared volume); a node that does not see a source fails the ingest in one line
saying so. A single-file source (an archive, one .npz) stays on the local path: it is one
file, nothing to spread.

Failures: a task whose worker or node is lost is retried by Ray (``MAX_RETRIES``); if it
still fails, or a task raises (a storage error), the ingest fails in one line and nothing is
left: every shard file that may have been written is removed, and without a manifest no
snapshot exists (:meth:`~flows.snapshots.store.Store.cleaning_up`).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flows.ingest.layouts import (
    Decoded,
    IngestError,
    SourceFile,
    _release_freed_memory,
    decode_one,
    header_dims,
    is_ignored,
)
from flows.ingest.stages import (
    Arrangement,
    DecodedMeta,
    Plan,
    Progress,
    Scan,
    _shown,
    shrink,
)
from flows.preflight import ensure_ray
from flows.settings import forwarded_env
from flows.snapshots.manifest import Manifest, Shard
from flows.snapshots.store import Store, shard_file
from flows.storage import (
    StorageError,
    describe,
    get_filesystem,
    is_remote,
    is_transient,
    join,
    with_retries,
)

CLUSTER_CHOICES = ("auto", "yes", "no")
MAX_RETRIES = 3
"""Ray retries of a task whose worker or node is lost (never of a task that raised)."""
_READ_BATCH = (16, 256)  # files per fetch task: at least, at most
_DECODE_CHUNK = (8, 64)  # files per decode task: at least, at most
_FAULT_VAR = "GANFLOW_INGEST_TEST_FAULT"
_STOP_WAIT_S = 60.0


def use_cluster(cluster: str | bool | None) -> bool:
    """Whether to ingest on the Ray cluster: None or "auto": when RAY_ADDRESS is set; "yes" /
    True: always (a local Ray without RAY_ADDRESS); "no" / False: never."""
    if cluster is None or cluster == "auto":
        return bool(os.environ.get("RAY_ADDRESS", "").strip())
    if cluster in ("yes", True):
        return True
    if cluster in ("no", False):
        return False
    raise IngestError(f"--cluster must be one of {', '.join(CLUSTER_CHOICES)}, got {cluster!r}")


def runs_on_cluster(scan: Scan) -> bool:
    """Whether a source selected for the cluster is spread over it: not when it is one file
    (an archive, alone or alone in its folder, is opened by the local fetch)."""
    return not scan.single_file and sum(not is_ignored(e[0]) for e in scan.entries) > 1


class RemoteSourceFile(SourceFile):
    """A source file read where it lives (``local`` is its full URL), never spooled: what
    the cluster fetch returns for an object-store source."""

    def read(self) -> bytes:
        fs, path = get_filesystem(self.local)
        try:
            data = with_retries(fs.cat_file, path)
        except Exception as exc:
            data = exc
        return _checked(self, data)


# ---------------------------------------------------------------------------------------------
# What runs in the Ray tasks.


def _test_fault(stage: str) -> None:
    """Tests only: GANFLOW_INGEST_TEST_FAULT="<stage>:<n>:<file>" kills the worker process of
    the first n task attempts of the stage (counted in <file>), as a lost node would.
    Attempts that start together may all see fewer than n deaths counted: at least n die."""
    spec = os.environ.get(_FAULT_VAR)
    if not spec:
        return
    where, n, path = spec.split(":", 2)
    if where != stage or (os.path.exists(path) and os.path.getsize(path) >= int(n)):
        return
    with open(path, "ab") as f:
        f.write(b"x")
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _checked(f: SourceFile, data: bytes | BaseException) -> bytes:
    """The bytes the plan hashed, or IngestError (quarantined, as SourceFile.read's)."""
    if isinstance(data, FileNotFoundError):
        raise IngestError(f"{f.path}: unreadable (removed while being ingested)")
    if isinstance(data, BaseException):
        raise describe(data, _shown(f.local))  # a storage failure fails the ingest
    if hashlib.sha256(data).hexdigest() != f.sha256:
        raise IngestError(f"{f.path}: changed while being ingested")
    return data


def _read_batch(url: str, paths: list[str]) -> list[bytes | BaseException]:
    """The bytes of each path (or its error), concurrently on an object store."""
    fs, _ = get_filesystem(url)
    try:
        # cat_ranges, as fetch_source: one concurrent GET per file, no HEADs first.
        out = list(with_retries(fs.cat_ranges, paths, None, None))
    except Exception as exc:
        raise describe(exc, _shown(url)) from None
    for i, data in enumerate(out):
        # cat_ranges hands back a file's own error instead of raising it, so a transient
        # failure of one file would otherwise escape with_retries.
        if isinstance(data, Exception) and is_transient(data):
            try:
                out[i] = with_retries(fs.cat_file, paths[i])
            except Exception as exc:
                out[i] = exc
    return out


def _fetch_task(url: str, rels: list[str]) -> list[tuple[str, str, int, object]]:
    _test_fault("fetch")
    _, base = get_filesystem(url)
    full = [join(base, r) for r in rels]
    out = []
    for rel, path, data in zip(rels, full, _read_batch(url, full)):
        if isinstance(data, FileNotFoundError) and not is_remote(url):
            raise StorageError(
                f"not found: {path} on Ray node {platform.node()} (a local source must be on a "
                "filesystem every Ray node mounts at the same path; or use s3://)"
            )
        if isinstance(data, BaseException):
            raise describe(data, _shown(_url(url, path) if is_remote(url) else path))
        out.append((rel, hashlib.sha256(data).hexdigest(), len(data), header_dims(rel, data)))
    return out


def _decode_task(files: list[SourceFile], size: int, mode: str) -> list[Decoded | str]:
    _test_fault("decode")
    remote = [i for i, f in enumerate(files) if isinstance(f, RemoteSourceFile)]
    blobs: dict[int, bytes | BaseException] = {}
    if remote:
        blobs = dict(
            zip(remote, _read_batch(files[remote[0]].local, [_path(files[i]) for i in remote]))
        )
    out: list[Decoded | str] = []
    for i, f in enumerate(files):
        try:
            data = _checked(f, blobs.pop(i)) if i in blobs else f.read()
        except IngestError as exc:
            out.append(str(exc))
            continue
        d = decode_one(f.path, data)
        del data
        out.append(d if isinstance(d, str) else shrink(d, size, mode))
    _release_freed_memory()
    return out


def _url(source_url: str, path: str) -> str:
    return source_url.split("://", 1)[0] + "://" + path


def _path(f: SourceFile) -> str:
    return get_filesystem(f.local)[1]


# ---------------------------------------------------------------------------------------------
# The driver side.


def _connect() -> None:
    try:
        ensure_ray(log_to_driver=False)
    except Exception as exc:
        where = os.environ.get("RAY_ADDRESS") or "a local Ray"
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise IngestError(f"cannot start ingest on the Ray cluster ({where}): {text}") from None


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _batches(items: Sequence, bounds: tuple[int, int], cpus: int) -> list[list]:
    """About four batches per CPU (load balance), within bounds (per-task overhead, memory)."""
    lo, hi = bounds
    size = max(lo, min(hi, math.ceil(len(items) / (4 * cpus))))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _task(fn: Callable, stage: str, **options):
    import ray

    env = forwarded_env()
    if os.environ.get(_FAULT_VAR):
        env[_FAULT_VAR] = os.environ[_FAULT_VAR]
    return ray.remote(fn).options(
        name=f"ganflow-ingest-{stage}",
        num_cpus=1,
        max_retries=MAX_RETRIES,
        retry_exceptions=False,
        # Spread over the nodes: reading is bound by each node's network and disk, and a
        # node whose worker is up first would otherwise take every task while others start.
        scheduling_strategy="SPREAD",
        runtime_env={"env_vars": env},
        **options,
    )


def _lost(stage: str, batch: list, exc: BaseException) -> IngestError:
    if stage == "write":
        part, k = batch[0][:2]
        what = f"shard {k} of {part}"
    else:
        first = batch[0] if isinstance(batch[0], str) else batch[0].path
        what = f"{len(batch)} files from {first}"
    why = " ".join(str(exc).split())[:200] or type(exc).__name__
    return IngestError(
        f"ingest {stage} on the Ray cluster failed for {what} after "
        f"{MAX_RETRIES} retries ({type(exc).__name__}: {why}); nothing was written"
    )


def _gather(
    stage: str,
    task,
    args: Callable[[list], tuple],
    batches: list[list],
    progress,
    cpus: int,
    kept: list | None = None,
) -> list[list]:
    """Run task(*args(batch)) per batch, at most two per CPU in flight; results in batch order.
    A task with several returns has its first fetched here and the others' refs put in
    ``kept`` (in batch order): they stay in Ray's object store."""
    import ray

    results: list[list] = [[] for _ in batches]
    if kept is not None:
        kept[:] = [None] * len(batches)
    pending: dict = {}
    total, done, nxt = sum(len(b) for b in batches), 0, 0
    shown = {"fetch": "read"}.get(stage, stage)
    try:
        while nxt < len(batches) or pending:
            while nxt < len(batches) and len(pending) < 2 * cpus:
                refs = task.remote(*args(batches[nxt]))
                if isinstance(refs, list):
                    kept[nxt] = refs[1:]
                    refs = refs[0]
                pending[refs] = nxt
                nxt += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, IngestError | StorageError):
                    raise cause from None
                raise _lost(stage, batches[i], cause or exc) from None
            except ray.exceptions.RayError as exc:  # worker or node lost, retries spent
                raise _lost(stage, batches[i], exc) from None
            done += len(batches[i])
            if progress:
                progress(shown, done, total)
    except BaseException:
        for ref in pending:  # Ctrl-C or a failure: the rest stops now, not when done
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        # ...and has stopped before the caller cleans up: a write task still running would
        # put its shard (or leave its temporary file) after the cleanup. A cancelled task
        # is interrupted, and an interrupted put removes its temporary file.
        with contextlib.suppress(Exception):
            ray.wait(list(pending), num_returns=len(pending), timeout=_STOP_WAIT_S)
        raise
    return results


def fetch_on_cluster(scan: Scan, progress: Progress | None = None) -> list[SourceFile]:
    """The cluster's :func:`~flows.ingest.stages.fetch_source` for a folder or prefix: the
    same SourceFiles (paths, hashes, sizes, header dims), read by Ray tasks. ``local`` is
    the file's path (a local source) or full URL (RemoteSourceFile); nothing is spooled."""
    if not runs_on_cluster(scan):
        raise IngestError("a single-file source is ingested locally (fetch_source)")
    _connect()
    cpus = _cluster_cpus()
    rels = [e[0] for e in scan.entries if not is_ignored(e[0])]
    remote = is_remote(scan.url)
    _, base = get_filesystem(scan.url)
    batches = _batches(rels, _READ_BATCH, cpus)
    task = _task(_fetch_task, "fetch")
    out: list[SourceFile] = []
    for batch in _gather("fetch", task, lambda b: (scan.url, b), batches, progress, cpus):
        for rel, sha, size, dims in batch:
            full = join(base, rel)
            if remote:
                out.append(RemoteSourceFile(rel, sha, size, _url(scan.url, full), dims))
            else:
                out.append(SourceFile(rel, sha, size, full, dims))
    return out


@dataclass(frozen=True)
class ClusterDecoded:
    """The cluster decode's result: per plan file its metadata (or quarantine reason), on
    the driver; the shrunk pixels stay in Ray's object store, one object per decode chunk
    (``chunks``, each holding files ``starts[j]`` onwards), until the write tasks read them."""

    metas: list
    chunks: list
    starts: list[int]


def decode_on_cluster(plan: Plan, progress: Progress | None = None) -> ClusterDecoded:
    """The cluster's :func:`~flows.ingest.stages.decode_plan`: every file decoded and shrunk
    to the plan's stored size by Ray tasks. Only metadata comes back to the driver, so its
    memory follows the number of files, not the pixels (the write tasks read those)."""
    if not plan.files:
        return ClusterDecoded([], [], [])
    _connect()
    cpus = _cluster_cpus()
    size, mode = plan.options.image_size, plan.options.resize_mode
    batches = _batches(plan.files, _DECODE_CHUNK, cpus)
    task = _task(_decode_split_task, "decode", num_returns=2)
    kept: list = []
    metas = _gather("decode", task, lambda b: (b, size, mode), batches, progress, cpus, kept)
    starts = [0]
    for b in batches[:-1]:
        starts.append(starts[-1] + len(b))
    return ClusterDecoded([m for chunk in metas for m in chunk], [k[0] for k in kept], starts)


def _decode_split_task(files: list[SourceFile], size: int, mode: str):
    """_decode_task's result as (metadata for the driver, pixels for the object store)."""
    out = _decode_task(files, size, mode)
    metas = [d if isinstance(d, str) else DecodedMeta.of(d) for d in out]
    return metas, [None if isinstance(d, str) else d.images for d in out]


def _write_task(
    url: str,
    sid: str,
    part: str,
    k: int,
    layout: Arrangement,
    starts: list[int],
    *pixels: list,
) -> list[Shard]:
    """Shard k of a part, converted from the decoded chunks it draws on and put in the store
    by this worker (the store's credentials are the node's own)."""
    _test_fault("write")

    def image(f: int, i: int):
        j = bisect.bisect_right(starts, f) - 1
        return pixels[j][f - starts[j]][i]

    arrays = layout.arrays(part, 0, len(layout.parts[part]), image)
    return Store(url).put_shard(sid, part, k, arrays, [])


def write_on_cluster(
    store: Store,
    manifest: Manifest,
    layout: Arrangement,
    decoded: ClusterDecoded,
    progress: Progress | None = None,
) -> Manifest:
    """The snapshot's shards written by Ray tasks, each converting its rows from the decoded
    chunks in the object store (the same conversion and shard boundaries as
    Store.write_snapshot: the same bytes), then the manifest, last, by the driver. On any
    failure every shard file that may exist is removed: no partial snapshot."""
    _connect()
    cpus = _cluster_cpus()
    sid = manifest.id
    jobs = []  # (part, k, layout of the shard's rows, chunk indices it reads)
    expected: list[str] = []
    keys = ["images"]
    for part in sorted(layout.parts):
        arrays = keys + (["labels"] if layout.labels[part] is not None else [])
        for k, (start, stop) in enumerate(layout.shards(part)):
            refs = layout.parts[part][start:stop]
            labels = layout.labels[part]
            rows = Arrangement(
                {part: refs},
                {part: None if labels is None else labels[start:stop]},
                layout.channels,
                layout.size,
                layout.eight_bit,
            )
            used = sorted({bisect.bisect_right(decoded.starts, f) - 1 for f, _ in refs})
            jobs.append([(part, k, rows, used)])
            expected += [shard_file(part, k, a) for a in sorted(arrays)]
    task = _task(_write_task, "write")

    def args(batch):
        part, k, rows, used = batch[0]
        # Chunk refs as top-level arguments: Ray hands the task their values.
        starts = [decoded.starts[j] for j in used]
        return (store.url, sid, part, k, rows, starts, *[decoded.chunks[j] for j in used])

    def write() -> Manifest:
        entries = _gather("write", task, args, jobs, progress, cpus)
        return store.finish_snapshot(manifest, [e for shard in entries for e in shard])

    return store.cleaning_up(sid, expected, write)

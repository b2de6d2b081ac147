"""Ray Train checkpoints: written by every rank, read back on resume and by the registry stage.

Rank 0 writes ``state.pt`` (models, optimisers, schedulers, EMA, step, config) and, once a
validation evaluation has run, ``best.pt`` (the best generator so far by the primary metric
on val, its step and figures: :class:`flows.train.best.BestSoFar`); each rank writes
``rank-<r>.pt`` with its own random streams (gan_core's ``PER_RANK_KEYS``: sampler, noise,
CycleGAN image pools, augmentation), so a resumed run draws exactly the batches and noise the
uninterrupted one would have, and picks the same best step. Files hold tensors and primitives
only and load with ``weights_only=True``.

Every checkpoint is written, verified, then committed, and only committed ones are resumed:
each rank serialises its files in memory, records their SHA-256 and sizes in
``commit-rank-<r>.json``, and uploads (:func:`upload_checkpoint`, Ray's upload hook) the data
files first, each to a temporary name renamed into place on a local disk, checks their sizes
in storage, and the commit file last. A resume (:func:`complete_checkpoint`) checks every
rank's commit and every file's hash; when the latest checkpoint fails (a file truncated,
damaged or missing afterwards), it takes the newest earlier one that passes. A full disk is
one line naming the folder, the space the checkpoint needs and what is free; transient
storage errors are retried by :func:`flows.storage.with_retries`."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from flows.train.spec import STATE_FILE
from gan_core.train import PER_RANK_KEYS

BEST_FILE = "best.pt"

# --- checkpoints ----------------------------------------------------------------------------


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _commit_file(rank: int) -> str:
    return f"commit-rank-{rank:05d}.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (a full disk, storage refusing it); one line."""


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _disk_full(where: str, need: int, free: int | None) -> CheckpointError:
    have = f"{_mb(free)} is free there" if free is not None else "the disk is full"
    return CheckpointError(
        f"disk full: a checkpoint needs {_mb(need)} in {where} and {have}; free space there "
        "or point the storage elsewhere (--storage, GANFLOW_RAY_STORAGE)"
    )


def _is_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "no space left" in str(exc).lower()


def _free(path: str | Path) -> int | None:
    """Free bytes on the disk holding path (or the nearest folder above it that exists)."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            return shutil.disk_usage(q).free
    return None


def _save(obj: dict, path: Path) -> dict:
    """torch.save into memory, then to path: the size and hash recorded are of exactly the
    bytes written (and the size is known before the disk is asked for it)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    free = _free(path.parent)
    if free is not None and free < len(data):
        raise _disk_full(str(path.parent), len(data), free)
    try:
        path.write_bytes(data)
    except OSError as exc:
        if _is_full(exc):
            raise _disk_full(str(path.parent), len(data), _free(path.parent)) from None
        raise
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_checkpoint(state, directory: Path, rank: int, world_size: int, best=None) -> None:
    """Rank 0: shared state and the best so far (``best``, a BestSoFar, when it holds a
    step); every rank: its own random streams (see the module notes), then its commit file
    with the hash and size of each file it wrote."""
    from gan_core.train import state_dict

    sd = state_dict(state)
    per_rank = {k: sd.pop(k) for k in PER_RANK_KEYS}
    files = {
        _rank_file(rank): _save(
            {**per_rank, "world_size": world_size}, directory / _rank_file(rank)
        )
    }
    if rank == 0:
        files[STATE_FILE] = _save({**sd, "world_size": world_size}, directory / STATE_FILE)
        if best is not None and best.found:
            files[BEST_FILE] = _save(best.state_dict(), directory / BEST_FILE)
    commit = {"rank": rank, "world_size": world_size, "step": int(state.step), "files": files}
    (directory / _commit_file(rank)).write_text(json.dumps(commit, sort_keys=True))


def upload_checkpoint(src: Path, filesystem, dest: str) -> None:
    """Copy one rank's checkpoint files from src into dest on a pyarrow filesystem: data
    files first (a temporary name renamed into place on a local disk; an S3 object appears
    whole), each size checked in storage, the commit file last. Transient errors are
    retried (flows.storage.with_retries); a full disk is one line."""
    from pyarrow import fs as pafs

    from flows.storage import with_retries

    local = isinstance(filesystem, pafs.LocalFileSystem)
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    commits = [n for n in names if n.startswith("commit-rank-")]
    order = [n for n in names if n not in commits] + commits
    total = sum((src / n).stat().st_size for n in order)
    if local:
        free = _free(dest)
        if free is not None and free < total:
            raise _disk_full(dest, total, free)
    written: list[str] = []
    try:
        with_retries(filesystem.create_dir, dest)
        for name in order:
            data = (src / name).read_bytes()
            target = f"{dest}/{name}"
            written.append(target)
            with_retries(_put, filesystem, target, data, local)
            size = with_retries(filesystem.get_file_info, target).size
            if size != len(data):
                raise CheckpointError(
                    f"{target} holds {size} bytes after the upload, not {len(data)}"
                )
    except BaseException as exc:
        # Nothing half-written stays: this rank's files go (no commit means Ray never
        # registered the checkpoint, and a resume skips it anyway).
        for target in written:
            for path in (target, f"{target}.tmp"):
                with contextlib.suppress(Exception):
                    filesystem.delete_file(path)
        if isinstance(exc, OSError) and _is_full(exc):
            raise _disk_full(dest, total, _free(dest) if local else None) from None
        if isinstance(exc, OSError):
            raise CheckpointError(f"checkpoint file not written in {dest}: {exc}") from None
        raise


def _put(filesystem, target: str, data: bytes, local: bool) -> None:
    """One file: on a local disk to a temporary name, then renamed into place."""
    tmp = f"{target}.tmp" if local else target
    with filesystem.open_output_stream(tmp) as f:
        f.write(data)
    if local:
        filesystem.move(tmp, target)


def _ray_upload(checkpoint, checkpoint_dir_name: str):
    """Ray Train's checkpoint_upload_fn: :func:`upload_checkpoint` into the run's folder."""
    from ray.train import Checkpoint, get_context

    storage = get_context().get_storage()
    dest = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    upload_checkpoint(Path(checkpoint.path), storage.storage_filesystem, dest)
    return Checkpoint(path=dest, filesystem=storage.storage_filesystem)


def _step(name: str) -> int | None:
    m = _CHECKPOINT_NAME.match(name)
    return int(m.group(1)) if m else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def incomplete(directory: Path, legacy_ok: bool = False) -> str | None:
    """Why the checkpoint in directory is not complete, or None when it is: every rank's
    commit file is there and every file each lists has its recorded size and hash. With
    legacy_ok, a checkpoint from before commit files (none at all, a state.pt) passes."""
    if not list(directory.glob("commit-rank-*.json")):
        if legacy_ok and (directory / STATE_FILE).exists():
            return None
        return "never committed"
    commits = []
    try:
        first = json.loads((directory / _commit_file(0)).read_text())
        for r in range(int(first["world_size"])):
            commits.append(json.loads((directory / _commit_file(r)).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return f"rank {len(commits)} never committed"
    for commit in commits:
        for name, rec in commit["files"].items():
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != rec["bytes"] or _sha256(path) != rec["sha256"]:
                return f"{name} does not match the hash recorded when it was written"
    return None


_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)(-[0-9a-f]+)?$")
# After a resume from an earlier checkpoint than Ray's latest, the steps in between are
# checkpointed again: under new names (a suffix from the skipped checkpoint's name, the same
# on every rank), because Ray deletes the skipped one by its path when it rotates it out.
_name_suffix = ""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}{_name_suffix}"


def complete_checkpoint(checkpoint, say=print):
    """The checkpoint to resume from: ``checkpoint`` (Ray's latest) when it is complete,
    else the newest earlier one of the run that is, else None (a fresh start), with a line
    through ``say`` saying which and why. Every rank decides alike (same files)."""
    global _name_suffix
    _name_suffix = ""
    if checkpoint is None:
        return None
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    with checkpoint.as_directory() as d:
        why = incomplete(Path(d), legacy_ok=True)
    if why is None:
        return checkpoint
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    _name_suffix = "-" + hashlib.sha256(name.encode()).hexdigest()[:6]
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    step = _step(name)
    older = sorted(
        (
            (_step(i.base_name), i.base_name)
            for i in infos
            if i.type == pafs.FileType.Directory
            and i.base_name != name
            and _step(i.base_name) is not None
            and step is not None
            and _step(i.base_name) <= step
        ),
        reverse=True,
    )
    for _, other in older:
        candidate = Checkpoint(f"{parent}/{other}", filesystem=checkpoint.filesystem)
        with candidate.as_directory() as d:
            if incomplete(Path(d)) is None:
                say(f"checkpoint {name} is incomplete ({why}); resuming from {other}")
                return candidate
    say(f"checkpoint {name} is incomplete ({why}) and no earlier one is complete; starting over")
    return None


def restore_checkpoint(
    state, directory: Path, rank: int, world_size: int, hyperparameters=None
) -> bool:
    """Load a checkpoint into state. Returns whether this rank's random streams were restored
    (False when the run was resumed at another world size: fresh streams for the new shard).

    ``hyperparameters`` (a GanConfig): a PBT exploit. The checkpoint is the donor's complete
    training state; then this config's loss/optim numbers and k take effect from the next
    step (gan_core's set_hyperparameters: the restored optimisers' param groups and
    schedules too)."""
    from gan_core.train import load_state_dict, read_checkpoint, set_hyperparameters, state_dict

    sd = read_checkpoint(directory / STATE_FILE, map_location=state.device)
    rank_path = directory / _rank_file(rank)
    exact = rank_path.exists() and int(sd["world_size"]) == world_size
    if exact:
        per_rank = read_checkpoint(rank_path, map_location="cpu")
    else:
        fresh = state_dict(state)
        per_rank = {k: fresh[k] for k in PER_RANK_KEYS}
    per_rank["noise"] = per_rank["noise"].cpu()  # Generator.set_state wants a CPU ByteTensor
    load_state_dict(state, {**sd, **per_rank})
    if hyperparameters is not None:
        set_hyperparameters(state, hyperparameters)
    return exact


def read_best(directory: Path) -> dict | None:
    """The best-so-far saved with a checkpoint (a BestSoFar state dict on the CPU), or None
    when none was (no validation evaluation had run yet, or a checkpoint from before)."""
    from gan_core.train import read_checkpoint

    path = directory / BEST_FILE
    return read_checkpoint(path, map_location="cpu") if path.exists() else None


# --- staging folders -----------------------------------------------------------------------

STAGING_PREFIX = "ganflow-ckpt-"
_OWNED = re.compile(rf"^{STAGING_PREFIX}(\d+)(?:\.(\d+))?@([A-Za-z0-9.]+)-")
OLD_STAGING_AGE_S = 24 * 3600  # folders named before they carried an owner


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", ".", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_staging(root: Path | None = None) -> int:
    """Remove the staging folders whose process is gone: on this host, those of pids no
    longer alive, and this process's own whose thread is gone or is this one (a thread
    reports one checkpoint at a time, so its folder that exists before a new one is a
    leftover; Tune reuses a trial's actor for the next trial); older unnamed ones after a day.
    Folders of other hosts (a /tmp shared across nodes) are never touched. Returns how many."""
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    me, host, removed = os.getpid(), _host(), 0
    threads = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
    try:
        found = list(root.glob(f"{STAGING_PREFIX}*"))
    except OSError:
        return 0
    for folder in found:
        owner = _OWNED.match(folder.name)
        if owner is None:
            try:
                gone = time.time() - folder.stat().st_mtime > OLD_STAGING_AGE_S
            except OSError:
                continue
        else:
            pid, tid = int(owner.group(1)), owner.group(2)
            mine = pid == me and (tid is None or int(tid) not in threads)
            gone = owner.group(3) == host and (mine or (pid != me and not _alive(pid)))
        if gone and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def staging_folder() -> Iterator[Path]:
    """A fresh local folder for one checkpoint handed to Ray's report, removed afterwards.

    Ray kills a worker or a trial's actor while it is inside report (a trial Tune's
    scheduler stopped, a worker group torn down at the end of a run or after a failure), so
    a plain temporary folder's clean-up never ran: on a test machine, 32 such folders of up
    to 3.3 MB had piled up in /tmp. The folder is named after its owner (pid.thread@host), and
    each new one first sweeps the folders of processes that are gone."""
    sweep_staging()
    owner = f"{os.getpid()}.{threading.get_ident()}@{_host()}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{owner}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report_checkpoint(state, metrics: dict, rank: int, world_size: int, best=None) -> None:
    """Every rank writes its files into a temporary folder; Ray merges them into one
    checkpoint directory in storage (all ranks must call report the same number of times)."""
    import ray.train

    with staging_folder() as tmp:
        write_checkpoint(state, tmp, rank, world_size, best)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=checkpoint_name(state.step),
            checkpoint_upload_fn=_ray_upload,
        )


def trained_generators(directory: Path) -> tuple:
    """(config, generator networks in eval mode, best step or None) from a checkpoint folder:
    the best generator on val when the checkpoint holds one (every run's final checkpoint
    does), else the generator the run would be judged by at that step (the EMA copy when
    the config keeps one), never the optimiser's raw last-step weights when there is better."""
    from flows.package import generator_keys
    from gan_core.models import build_models
    from gan_core.overrides import from_flat_dict
    from gan_core.train import read_checkpoint, recalibrate

    why = incomplete(directory, legacy_ok=True)
    if why is not None:
        raise CheckpointError(f"checkpoint {directory} is incomplete: {why}")
    sd = read_checkpoint(directory / STATE_FILE)
    cfg = from_flat_dict(sd["config"])
    keys = generator_keys(cfg.family)
    best = read_best(directory)
    if best is not None and best.get("step") is not None and set(keys) <= set(best["weights"]):
        weights, step = best["weights"], int(best["step"])
    else:
        weights, step = _judged_weights(sd), None
    built = build_models(cfg)
    models = {}
    for k in keys:
        built[k].load_state_dict(weights[k])
        if step is None and k in (sd.get("ema") or {}):
            recalibrate(cfg, built[k])  # as evaluation did (best.pt holds recalibrated ones)
        models[k] = built[k].eval()
    return cfg, models, step


def _judged_weights(sd: dict) -> dict:
    """The networks' weights as evaluation sees them: the EMA copies where the checkpoint
    holds them, the live weights for the rest (and for checkpoints without EMA)."""
    ema = sd.get("ema") or {}
    return {k: ema.get(k, v) for k, v in sd["models"].items()}


def load_trained(checkpoint: str):
    """The trained generator(s) (eval mode) and config from a run's checkpoint path in the
    Ray storage (local or s3://), weights only: what the registry stage registers. The best
    step's generator on val (see :func:`trained_generators`)."""
    from ray.train import Checkpoint

    from flows.train.spec import StorageSpec

    _, filesystem = StorageSpec().resolve()
    ckpt = Checkpoint(checkpoint, filesystem=filesystem)
    with ckpt.as_directory() as d:
        cfg, models, _ = trained_generators(Path(d))
    return cfg, models


def read_warm_start(checkpoint: str, map_location="cpu") -> dict:
    """What a warm start takes from a run's checkpoint (path in the Ray storage, local or
    s3://): the networks, the optimisers' moments, the moving averages, D's augmentation
    strength and the config they were trained with, read weights-only from its
    ``state.pt``."""
    from ray.train import Checkpoint

    from flows.train.spec import StorageSpec
    from gan_core.train import read_checkpoint

    _, filesystem = StorageSpec().resolve()
    with Checkpoint(checkpoint, filesystem=filesystem).as_directory() as d:
        sd = read_checkpoint(Path(d) / STATE_FILE, map_location=map_location)
    keys = ("config", "models", "opt_g", "opt_d", "ema", "augment", "step")
    return {k: sd[k] for k in keys if k in sd}

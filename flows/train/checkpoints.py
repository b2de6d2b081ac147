"""Ray Train checkpoints: written by every rank, read back on resume and by the registry stage.

Rank 0 writes ``state.pt`` (models, optimisers, schedulers, EMA, step, config) and, once a
validation evaluation has run, ``best.pt`` (the best generator so far by the primary metric
on val, its step and figures: :class:`flows.train.best.BestSoFar`); each rank writes
``rank-<r>.pt`` with its own random streams (gan_core's ``PER_RANK_KEYS``: sampler, noise,
CycleGAN image pools, augmentation), so a resumed run draws exactly the batches and noise the
uninterrupted one would have, and picks the same best step. Files hold tensors and primitives
only and load with ``weights_only=True``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from flows.train.spec import STATE_FILE
from gan_core.train import PER_RANK_KEYS

BEST_FILE = "best.pt"

# --- checkpoints ----------------------------------------------------------------------------


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def write_checkpoint(state, directory: Path, rank: int, world_size: int, best=None) -> None:
    """Rank 0: shared state and the best so far (``best``, a BestSoFar, when it holds a
    step); every rank: its own random streams (see the module notes)."""
    from gan_core.train import state_dict

    sd = state_dict(state)
    per_rank = {k: sd.pop(k) for k in PER_RANK_KEYS}
    torch.save({**per_rank, "world_size": world_size}, directory / _rank_file(rank))
    if rank == 0:
        torch.save({**sd, "world_size": world_size}, directory / STATE_FILE)
        if best is not None and best.found:
            torch.save(best.state_dict(), directory / BEST_FILE)


def restore_checkpoint(state, directory: Path, rank: int, world_size: int) -> bool:
    """Load a checkpoint into state. Returns whether this rank's random streams were restored
    (False when the run was resumed at another world size: fresh streams for the new shard)."""
    from gan_core.train import load_state_dict, read_checkpoint, state_dict

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
    return exact


def read_best(directory: Path) -> dict | None:
    """The best-so-far saved with a checkpoint (a BestSoFar state dict on the CPU), or None
    when none was (no validation evaluation had run yet, or a checkpoint from before)."""
    from gan_core.train import read_checkpoint

    path = directory / BEST_FILE
    return read_checkpoint(path, map_location="cpu") if path.exists() else None


def report_checkpoint(state, metrics: dict, rank: int, world_size: int, best=None) -> None:
    """Every rank writes its files into a temporary folder; Ray merges them into one
    checkpoint directory in storage (all ranks must call report the same number of times)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="ganflow-ckpt-") as tmp:
        write_checkpoint(state, Path(tmp), rank, world_size, best)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint-{state.step:08d}",
        )


def trained_generators(directory: Path) -> tuple:
    """(config, generator networks in eval mode, best step or None) from a checkpoint folder:
    the best generator on val when the checkpoint holds one (every run's final checkpoint
    does), else the generator the run would be judged by at that step (the EMA copy when
    the config keeps one), never the optimiser's raw last-step weights when there is better."""
    from flows.tracking import generator_keys
    from gan_core.models import build_models
    from gan_core.overrides import from_flat_dict
    from gan_core.train import read_checkpoint, recalibrate

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
    s3://): the networks, the optimisers' moments, the moving averages and the config they
    were trained with, read weights-only from its ``state.pt``."""
    from ray.train import Checkpoint

    from flows.train.spec import StorageSpec
    from gan_core.train import read_checkpoint

    _, filesystem = StorageSpec().resolve()
    with Checkpoint(checkpoint, filesystem=filesystem).as_directory() as d:
        sd = read_checkpoint(Path(d) / STATE_FILE, map_location=map_location)
    return {k: sd[k] for k in ("config", "models", "opt_g", "opt_d", "ema", "step") if k in sd}

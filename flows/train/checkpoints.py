"""Ray Train checkpoints: written by every rank, read back on resume and by the registry stage.

Rank 0 writes ``state.pt`` (models, optimisers, schedulers, step, config); each rank writes
``rank-<r>.pt`` with its own random streams (sampler, noise, CycleGAN image pools), so a
resumed run draws exactly the batches and noise the uninterrupted one would have. Files hold
tensors and primitives only and load with ``weights_only=True``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from flows.train.spec import STATE_FILE

# --- checkpoints ----------------------------------------------------------------------------


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def write_checkpoint(state, directory: Path, rank: int, world_size: int) -> None:
    """Rank 0: shared state; every rank: its own random streams (see the module notes)."""
    from gan_core.train import state_dict

    sd = state_dict(state)
    per_rank = {k: sd.pop(k) for k in ("samplers", "noise", "pools")}
    torch.save({**per_rank, "world_size": world_size}, directory / _rank_file(rank))
    if rank == 0:
        torch.save({**sd, "world_size": world_size}, directory / STATE_FILE)


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
        per_rank = {k: fresh[k] for k in ("samplers", "noise", "pools")}
    per_rank["noise"] = per_rank["noise"].cpu()  # Generator.set_state wants a CPU ByteTensor
    load_state_dict(state, {**sd, **per_rank})
    return exact


def report_checkpoint(state, metrics: dict, rank: int, world_size: int) -> None:
    """Every rank writes its files into a temporary folder; Ray merges them into one
    checkpoint directory in storage (all ranks must call report the same number of times)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="ganflow-ckpt-") as tmp:
        write_checkpoint(state, Path(tmp), rank, world_size)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint-{state.step:08d}",
        )


def load_trained(checkpoint: str):
    """The trained models (eval mode) and config from a run's checkpoint path in the Ray
    storage (local or s3://), weights only: what the registry stage registers."""
    from ray.train import Checkpoint

    from flows.train.spec import StorageSpec
    from gan_core.config import GanConfig
    from gan_core.models import build_models
    from gan_core.train import read_checkpoint

    _, filesystem = StorageSpec().resolve()
    ckpt = Checkpoint(checkpoint, filesystem=filesystem)
    with ckpt.as_directory() as d:
        sd = read_checkpoint(Path(d) / STATE_FILE)
    cfg = GanConfig.from_flat_dict(sd["config"])
    models = build_models(cfg)
    for k, net in models.items():
        net.load_state_dict(sd["models"][k])
        net.eval()
    return cfg, models

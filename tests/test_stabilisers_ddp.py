"""The stabilisers under data parallelism, without Ray: two gloo processes on this machine run
the conv cGAN with D's augmentation (ADA), lazy R1 and the EMA, each network wrapped in
DistributedDataParallel as the Ray worker wraps it. Replicas must stay equal (R1's gradient
goes through the plain D but meets DDP's all-reduce in the same backward) and ADA's p must
move alike on both ranks (r_t summed over ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gan_core.data import ImageSet
from gan_core.overrides import apply_overrides
from gan_core.presets import preset

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from gan_core.train import eval_models, init_state, plain, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = apply_overrides(
        preset("cgan", "default", 32),
        {
            "data.channels": 3,
            "model.num_classes": 3,
            "model.ngf": 4,
            "model.ndf": 4,
            "train.batch_size": 4,
            "train.steps": 8,
            "train.log_every": 4,
            "train.device": "cpu",
            "augment.policy": "color,translation,cutout",
            "augment.ada": True,
            "augment.ada_target": 0.0,
            "augment.ada_images": 100,
            "augment.ada_interval": 2,
            "loss.r1_gamma": 1.0,
            "loss.r1_every": 2,
            "train.ema_half_life": 50,
            "model.d_batchnorm": False,  # D overfits the random images at once: p moves
        },
    )
    g = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(32) % 3
    )

    def summed(t):
        dist.all_reduce(t)
        return t

    state = init_state(cfg, data, "cpu", rank, world, wrap=DistributedDataParallel)
    state.augment.reduce = summed
    train(state, data)
    vec = torch.cat(
        [p.detach().flatten() for m in state.models.values() for p in plain(m).parameters()]
        + [p.detach().flatten() for p in eval_models(state)["G"].parameters()]
    )
    torch.save({"params": vec, "p": state.augment.p.clone()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_replicas_stay_equal_with_r1_ada_and_ema_under_ddp(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(a["params"], b["params"], rtol=0, atol=1e-6)
    assert float(a["p"]) == float(b["p"]) > 0  # moved, and alike

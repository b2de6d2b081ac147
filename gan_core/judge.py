"""The judge: a small classifier trained on a dataset's own train split, whose feature space
and predictions every evaluation of models trained on that dataset uses.

It works offline on any snapshot (any channels, classes and side >= 8). What it learns
depends on what the data carries:

- ``classes``: labelled images (and two-domain sets whose domains both carry labels, such as
  the built-in digits pair): predict the class. Gives Fréchet and kernel distances and the
  neighbour figures (coverage, recall) in its features, the cGAN's intra-class distance and
  class accuracy (its gate), GAN mode coverage, CycleGAN label preservation.
- ``domain_rotation``: two unlabelled domains: predict the domain and which of four
  rotations was applied (self-supervised rotation prediction, Gidaris et al. 2018), so its
  features tell X's look from Y's. Gives distances and neighbour figures only.
- ``rotation``: unlabelled images: predict the rotation. Gives distances and neighbour
  figures only: an unlabelled snapshot gets no class-based figure offline; with the
  standard FID weights configured (``eval.inception``) it also gets FID and KID.

Figures are comparable only under the same judge: it is cached by the caller's key (the
snapshot id), and promotion evaluates the candidate and the champion with the same one.
Weights are cached as safetensors (tensors only, with the task in the file's metadata).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as nnf
from safetensors import safe_open
from safetensors.torch import save_file

from gan_core.classifier import DigitClassifier, _random_shift, classifier_accuracy
from gan_core.data import ImageSet, UnpairedSet

TASKS = ("classes", "domain_rotation", "rotation")
# Bump when the architecture or recipe changes, so stale caches are not reused.
_JUDGE_VERSION = 1
_BATCH_SIZE = 64
_LEARNING_RATE = 2e-3
_MIN_STEPS, _MAX_STEPS, _EPOCHS = 400, 2000, 10


@dataclass
class Judge:
    """A trained judge. ``heldout_accuracy``: its own accuracy on the held-out split (how far
    to trust its class-based figures); NaN when not measured."""

    net: DigitClassifier
    task: str
    num_classes: int
    heldout_accuracy: float = float("nan")

    @property
    def labelled(self) -> bool:
        return self.task == "classes"


def judge_task(data: ImageSet | UnpairedSet) -> str:
    if isinstance(data, UnpairedSet):
        both = data.x.labels is not None and data.y.labels is not None
        return "classes" if both else "domain_rotation"
    return "classes" if data.labels is not None else "rotation"


def _rotate(images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    for r in (1, 2, 3):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(images[sel], r, dims=(2, 3))
    return out


def _task_data(data: ImageSet | UnpairedSet, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and base targets: class labels, or the domain index (0 = X, 1 = Y)."""
    if isinstance(data, UnpairedSet):
        images = torch.cat([data.x.images, data.y.images])
        if task == "classes":
            return images, torch.cat([data.x.labels, data.y.labels])
        return images, torch.cat(
            [
                torch.zeros(len(data.x), dtype=torch.int64),
                torch.ones(len(data.y), dtype=torch.int64),
            ]
        )
    if task == "classes":
        return data.images, data.labels
    return data.images, torch.zeros(len(data), dtype=torch.int64)


def _num_classes(data: ImageSet | UnpairedSet, task: str) -> int:
    if task == "classes":
        _, labels = _task_data(data, task)
        return max(2, int(labels.max()) + 1)
    return 8 if task == "domain_rotation" else 4


def _targets(
    images: torch.Tensor, base: torch.Tensor, task: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if task == "classes":
        return images, base
    k = torch.randint(0, 4, (images.shape[0],), generator=generator)
    return _rotate(images, k), base * 4 + k


def train_judge(data: ImageSet | UnpairedSet, seed: int = 0) -> Judge:
    """Train on a dataset's train split; deterministic for a given seed and thread count.

    About 10 epochs, at least 400 and at most 2,000 steps of 64 images (so tiny sets still
    converge and large ones stay a minute or two on a CPU), with random shifts of up to a
    sixteenth of the side. The global RNG is forked, so the caller's stream is unchanged."""
    task = judge_task(data)
    images, base = _task_data(data, task)
    images = images.float().cpu()
    if images.shape[0] < 2:
        raise ValueError("the judge needs at least 2 training images")
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    num_classes = _num_classes(data, task)
    steps_per_epoch = (n + _BATCH_SIZE - 1) // _BATCH_SIZE
    total = min(max(_EPOCHS * steps_per_epoch, _MIN_STEPS), _MAX_STEPS)
    shift = max(1, size // 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitClassifier(num_classes=num_classes, channels=channels)
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=_LEARNING_RATE)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_LEARNING_RATE, total_steps=total)
        net.train()
        step = 0
        while step < total:
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, _BATCH_SIZE):
                if step == total:
                    break
                idx = perm[start : start + _BATCH_SIZE]
                batch = _random_shift(images[idx], shift, generator)
                x, y = _targets(batch, base[idx], task, generator)
                loss = nnf.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
    return Judge(net.eval(), task, num_classes)


def judge_accuracy(judge: Judge, data: ImageSet | UnpairedSet, seed: int = 0) -> float:
    """The judge's accuracy on data (its own task; rotations drawn from a fixed seed)."""
    images, base = _task_data(data, judge.task)
    if images.shape[0] == 0:
        return float("nan")
    x, y = _targets(images.float().cpu(), base, judge.task, torch.Generator().manual_seed(seed))
    return classifier_accuracy(judge.net, x, y)


def _cache_path(key: str, cache_dir: str | os.PathLike, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:100]
    return Path(cache_dir) / f"judge-{safe}-seed{seed}-v{_JUDGE_VERSION}.safetensors"


def load_or_train_judge(
    key: str,
    data: ImageSet | UnpairedSet | Callable[[], tuple],
    cache_dir: str | os.PathLike,
    heldout: ImageSet | UnpairedSet | None = None,
    seed: int = 0,
) -> Judge:
    """The judge for a dataset (key: its snapshot id), from the cache or trained and cached.
    ``data``: the train split, or a function returning (train split, held-out split) that
    is called only when the judge must be trained. Concurrent callers (Ray workers, trials)
    see no file or a whole one, never half of one."""
    path = _cache_path(key, cache_dir, seed)
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["ganflow"])
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            net = DigitClassifier(num_classes=meta["num_classes"], channels=meta["channels"])
            net.load_state_dict(state)
            return Judge(net.eval(), meta["task"], meta["num_classes"], meta["heldout_accuracy"])
        except (RuntimeError, OSError, ValueError, KeyError):
            pass  # a stale or damaged cache file is retrained and replaced, not trusted
    train_data = data
    if callable(data):
        train_data, heldout = data()
    judge = train_judge(train_data, seed)
    if heldout is not None:
        judge.heldout_accuracy = judge_accuracy(judge, heldout, seed)
    meta = {
        "task": judge.task,
        "num_classes": judge.num_classes,
        "channels": judge.net.conv1.in_channels,
        "heldout_accuracy": judge.heldout_accuracy,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.contiguous() for k, v in judge.net.state_dict().items()}
        save_file(tensors, tmp, metadata={"ganflow": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return judge

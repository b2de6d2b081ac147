"""The config follows the data: a snapshot's manifest decides the image size, channels, class
count and which families can train on it; the driver proves the final config on a few real
images before any cluster work; evaluation uses a judge trained on the snapshot itself.

Everything here runs on the driver (or a rank-0 worker) in seconds, so a config that cannot
work is a one-line error before Ray, MLflow or Prefect do anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from flows.snapshots.manifest import Manifest
from gan_core.config import ConfigError, GanConfig
from gan_core.overrides import apply_overrides
from gan_core.presets import config_for_data


def config_for_snapshot(
    family: str, manifest: Manifest, overrides: dict | list[str] | None = None
) -> GanConfig:
    """Preset for the snapshot's image size, its facts, then the user's overrides; the
    dataset field names the snapshot id (lineage)."""
    cfg = config_for_data(family, manifest.facts(), overrides)
    return apply_overrides(cfg, {"data.dataset": manifest.id})


def check_config(cfg: GanConfig, manifest: Manifest) -> None:
    """ConfigError when a finished config does not fit the snapshot (a config built
    elsewhere, e.g. a search's base or a pipeline override, against another snapshot)."""
    f = manifest.facts()
    from gan_core.presets import check_family_data

    check_family_data(cfg.family, f)
    for key, have, want in (
        ("data.image_size", cfg.data.image_size, f.image_size),
        ("data.channels", cfg.data.channels, f.channels),
        (
            "model.num_classes",
            cfg.model.num_classes if cfg.family == "cgan" else 0,
            f.num_classes if cfg.family == "cgan" else 0,
        ),
    ):
        if have != want:
            raise ConfigError(
                f"{key}: {have!r} contradicts the dataset {f.name} ({want!r}); drop the override"
            )


def set_size(data) -> int:
    """Images in a split; for two domains, in the smaller one."""
    return min(len(data.x), len(data.y)) if hasattr(data, "x") else len(data)


JUDGE_BYTES = 1 << 30
"""Bound on the float32 copy of train images the judge trains on (rank 0, once per snapshot)."""


def judge_limit(channels: int, image_size: int) -> int:
    """Train rows the judge trains on: at most JUDGE_BYTES of float32 pixels, at least 1,024
    (its 2,000 steps of 64 images see ~128k draws, so a few thousand distinct rows suffice)."""
    return max(1024, JUDGE_BYTES // (4 * channels * image_size * image_size))


def load_heldout(snapshot_id: str, root: str | None, cfg: GanConfig) -> dict:
    """{'val': ..., 'test': ...} in memory, at most eval.heldout rows per split (spaced evenly):
    selection (Tune, promotion) reads val, the reported figures test. A snapshot too small to
    have a val split (under 2 images a part) selects on test."""
    from flows.snapshots.load import load_dataset

    limit = cfg.eval.heldout
    test = load_dataset(snapshot_id, "test", root, limit=limit)
    return {
        "val": selection_split(load_dataset(snapshot_id, "val", root, limit=limit), test),
        "test": test,
    }


def judge_data(snapshot_id: str, root: str | None, heldout, train=None) -> Callable:
    """What load_judge trains on when the judge is not cached: a bounded, evenly spaced
    subset of the train split (``train``: the split already opened, else opened here)."""

    def load():
        from flows.snapshots.load import open_dataset
        from gan_core.data import UnpairedSet, in_memory

        data = train if train is not None else open_dataset(snapshot_id, "train", root)
        one = data.x if isinstance(data, UnpairedSet) else data
        channels, size = one.images.shape[1], one.images.shape[-1]
        return in_memory(data, judge_limit(channels, size)), heldout

    return load


def selection_split(val, test):
    """What search and promotion select on: the validation split, or test when the snapshot
    is too small to have one (under 2 images a part, e.g. val_fraction 0)."""
    return val if set_size(val) >= 2 else test


def dry_run(cfg: GanConfig, train, heldout) -> None:
    """Build the networks from the final config and run one Algorithm 1 iteration, a sample
    grid and an evaluation on a few real images, on the CPU: any shape or config error
    surfaces here in seconds as ConfigError, not in the workers after minutes."""
    import torch

    from gan_core.classifier import DigitClassifier
    from gan_core.data import ImageSet, UnpairedSet
    from gan_core.evaluate import evaluate, sample_grid
    from gan_core.judge import Judge
    from gan_core.train import eval_models, init_state
    from gan_core.train import train as run

    def few(d, n):
        if isinstance(d, UnpairedSet):
            t = None if d.x_truth is None else d.x_truth[:n]
            return UnpairedSet(few(d.x, n), few(d.y, n), t)
        return ImageSet(d.images[:n], None if d.labels is None else d.labels[:n])

    small, probe = few(train, 4), few(heldout, 10)
    if set_size(small) < 2:
        raise ConfigError(f"data.dataset: {cfg.data.dataset} has fewer than 2 training images")
    trial = apply_overrides(
        cfg,
        {
            "train.batch_size": 2,
            "train.steps": 1,
            "train.log_every": 1,
            "train.device": "cpu",
            "train.precision": "fp32",
            "eval.samples": 10,
            "eval.inception": False,
        },
    )
    try:
        with torch.random.fork_rng(devices=[]):
            state = init_state(trial, small, "cpu")
            run(state, small)
            channels = (
                small.x.images.shape[1] if isinstance(small, UnpairedSet) else small.images.shape[1]
            )
            ncls = max(2, cfg.model.num_classes)
            judge = Judge(
                DigitClassifier(num_classes=ncls, channels=channels).eval(), "rotation", ncls
            )
            if len(probe.x if isinstance(probe, UnpairedSet) else probe) >= 2:
                # What evaluation judges (the moving averages when kept), as training will.
                evaluate(trial, eval_models(state), probe, judge)
                sample_grid(trial, eval_models(state), probe)
    except (RuntimeError, ValueError, IndexError) as exc:
        from flows.errors import first_line

        first = first_line(exc)
        raise ConfigError(
            f"the {cfg.family} config does not run on {cfg.data.dataset} "
            f"({cfg.data.image_size}px, {cfg.data.channels} ch, model.arch={cfg.model.arch}): {first}"
        ) from None


def load_judge(
    snapshot_id: str,
    cache: str | os.PathLike,
    load: Callable[[], tuple[object, object]],
    seed: int = 0,
):
    """The snapshot's judge (gan_core.judge), cached by snapshot id; ``load`` returns
    (train split, held-out split) and is called only when the judge must be trained."""
    from gan_core.judge import load_or_train_judge

    return load_or_train_judge(snapshot_id, load, cache, seed=seed)


def load_inception(cfg: GanConfig):
    """The FID feature extractor when eval.inception is on, else None."""
    if not cfg.eval.inception:
        return None
    from gan_core.inception import load_extractor

    return load_extractor()


def check_inception(cfg: GanConfig) -> None:
    """Preflight: the FID weights exist and match their pinned hash (one line otherwise)."""
    if cfg.eval.inception:
        from gan_core.inception import check_weights

        check_weights()

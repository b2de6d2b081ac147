"""What the quality benchmark runs: its datasets and judges, the rows (variants) and the
plan per dataset, and each run's config (see :mod:`flows.bench.quality` for what they mean)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from flows.bench import quality_data as qd
from gan_core.config import GanConfig
from gan_core.data import ImageSet, UnpairedSet
from gan_core.judge import Judge, judge_accuracy, train_judge
from gan_core.overrides import apply_overrides
from gan_core.presets import EMA_HALF_LIFE, DataFacts, config_for_data

EVAL_SEED = 2024  # the z of every evaluation, apart from any training seed
R1_GAMMA = 0.1  # the "r1" row's γ where the defaults have none: small images, small data
SHAPES_PER_CLASS = {"train": 200, "val": 60, "test": 100}
COLOURS_PER_CLASS = {"train": 100, "test": 60}

DATASETS = {
    # name: (family, image source, fraction of the source's train split)
    "shapes": ("cgan", "shapes", 1.0),
    "shapes-25": ("cgan", "shapes", 0.25),
    "shapes-10": ("cgan", "shapes", 0.10),
    "shapes-gan": ("gan", "shapes", 1.0),
    "colours": ("cyclegan", "colours", 1.0),
}

_OLD = {
    "model.g_layout": "wide",
    "model.spectral_norm": False,
    "model.d_batchnorm": False,
    "model.conditioning": "concat",
    "loss.mismatch": 0.0,
    "augment.policy": "none",
    "train.ema_half_life": 0,
    "loss.gan_loss": "minimax",
    "loss.r1_gamma": 0.0,
}
# CycleGAN as the paper trains it: LSGAN, and none of the GANs' stabilisers.
_PAPER_CYCLEGAN = {
    "model.spectral_norm": False,
    "augment.policy": "none",
    "train.ema_half_life": 0,
    "loss.gan_loss": "lsgan",
    "loss.r1_gamma": 0.0,
}
GANS = ("gan", "cgan")
ALL = ("gan", "cgan", "cyclegan")
# name: (families it applies to, overrides of the defaults). The anchor's None: the plain
# DCGAN (CycleGAN: _PAPER_CYCLEGAN); a string names a stabiliser of the GANs' defaults.
VARIANTS: dict[str, tuple[tuple[str, ...], dict | str | None]] = {
    "anchor": (ALL, None),
    "defaults": (ALL, {}),
    "no-aug": (GANS, {"augment.policy": "none"}),
    "fixed-p": (GANS, {"augment.ada": False}),
    "no-ema": (GANS, {"train.ema_half_life": 0}),
    "no-sn": (GANS, {"model.spectral_norm": False}),
    "no-bn-d": (GANS, {"model.d_batchnorm": False}),
    "mbstd": (GANS, {"model.minibatch_std": 4}),
    "no-cutout": (GANS, {"augment.policy": "color,translation"}),
    "cutout": (GANS, {"augment.policy": "color,translation,cutout"}),
    "resize": (GANS, {"model.g_upsample": "resize"}),
    "projection": (("cgan",), {"model.conditioning": "projection"}),
    "concat": (("cgan",), {"model.conditioning": "concat"}),
    "no-mismatch": (("cgan",), {"loss.mismatch": 0.0}),
    "minimax": (GANS, {"loss.gan_loss": "minimax"}),
    "hinge": (GANS, {"loss.gan_loss": "hinge"}),
    "r1": (ALL, {"loss.r1_gamma": R1_GAMMA}),
    "no-r1": (ALL, {"loss.r1_gamma": 0.0}),
    "old": (GANS, _OLD),
    "sn": (ALL, {"model.spectral_norm": True}),
    "augment": (ALL, "augment"),
    "ema": (ALL, "ema"),
}
PLAN = {
    # One row per stabiliser the defaults differ by (a row equal to the defaults is skipped);
    # the rest (minimax, hinge, r1, concat, augment) with --variants.
    "shapes": (
        "anchor",
        "defaults",
        "no-mismatch",
        "no-aug",
        "fixed-p",
        "ema",
        "no-bn-d",
        "sn",
        "projection",
        "old",
    ),
    "shapes-25": ("anchor", "defaults", "no-aug"),
    "shapes-10": ("anchor", "defaults", "no-aug", "old"),
    "shapes-gan": ("anchor", "defaults", "old"),
    "colours": ("anchor", "defaults", "sn", "augment"),
}
# Equal-time rows where the cost of a step differs most from the defaults'.
TIME_PLAN = {"shapes": ("anchor", "old")}


def _gans_stabiliser(name: str) -> dict:
    if name == "augment":  # DiffAugment's three ops with ADA's p, as the small-set presets
        return {"augment.policy": "color,translation,cutout", "augment.ada": True}
    return {"train.ema_half_life": EMA_HALF_LIFE}


# --- data and judges ----------------------------------------------------------------------


@dataclass
class Bench:
    name: str
    family: str
    train: ImageSet | UnpairedSet
    test: ImageSet | UnpairedSet
    judge: Judge
    facts: DataFacts
    val: ImageSet | None = None
    """The split the best step is chosen on (as ganflow registers it); None: no choice."""


def load_source(source: str, seed: int = 0) -> dict:
    if source == "shapes":
        n = SHAPES_PER_CLASS
        return {s: qd.make_shapes(s, n[s], seed) for s in ("train", "val", "test")}
    n = COLOURS_PER_CLASS
    return {s: qd.make_colours(s, n[s], seed) for s in ("train", "test")}


def make_judge(splits: dict, seed: int = 0) -> Judge:
    judge = train_judge(splits["train"], seed)
    judge.heldout_accuracy = judge_accuracy(judge, splits["test"], seed)
    return judge


def make_bench(name: str, splits: dict, judge: Judge) -> Bench:
    family, _, fraction = DATASETS[name]
    train_set = splits["train"] if fraction == 1.0 else qd.subset(splits["train"], fraction)
    images = train_set.x.images if family == "cyclegan" else train_set.images
    facts = DataFacts(
        kind="unpaired" if family == "cyclegan" else "labelled",
        image_size=images.shape[-1],
        channels=images.shape[1],
        classes=qd.SHAPES,
        has_truth=family == "cyclegan",
        name=name,
    )
    return Bench(name, family, train_set, splits["test"], judge, facts, splits.get("val"))


# --- configs ------------------------------------------------------------------------------


def base_config(b: Bench, args: argparse.Namespace, steps: int, seed: int) -> GanConfig:
    """The defaults for this dataset, sized for this benchmark (width, batch, steps)."""
    cfg = config_for_data(b.family, b.facts)
    n = len(b.train.x) if b.family == "cyclegan" else len(b.train)
    sized: dict[str, object] = {
        "train.steps": steps,
        "train.log_every": max(1, steps // 10),
        "train.seed": seed,
        "train.device": getattr(args, "device", "cpu"),
        "train.precision": "fp32",
        "train.compile": False,
        "eval.samples": args.samples,
        "train.batch_size": min(cfg.train.batch_size, n),
    }
    if b.family != "cyclegan":
        # CycleGAN's 32 px preset is CPU-sized already; the conv GANs' (ngf 64) is not.
        sized.update({"model.ngf": args.ngf, "model.ndf": args.ngf})
        sized["train.batch_size"] = min(args.batch, n)
    return apply_overrides(cfg, sized)


def variant_config(base: GanConfig, family: str, variant: str) -> tuple[GanConfig | None, str]:
    """(the variant's config, or None with the reason it is skipped)."""
    families, overrides = VARIANTS[variant]
    if family not in families:
        return None, f"not for {family}"
    if variant == "anchor":
        if family != "cyclegan":
            return base, ""  # the plain DCGAN borrows the sizes and the seed
        overrides = _PAPER_CYCLEGAN
    if isinstance(overrides, str):
        overrides = _gans_stabiliser(overrides)
    cfg = apply_overrides(base, overrides)
    if variant != "defaults" and cfg == base:
        if variant == "anchor":
            return None, "same as defaults: they are the paper's recipe"
        return None, "same as defaults"
    return cfg, ""


def names(text: str | None, known, what: str) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {', '.join(known)})")
    return names


def plan_runs(name: str, family: str, base: GanConfig, args, skipped: dict) -> list[tuple]:
    """(variant, config, budget) in running order: defaults first (its wall time is the
    others' equal-time budget), every equal-steps run before any equal-time one."""
    chosen = names(args.variants, VARIANTS, "variant") or list(PLAN[name])
    timed = names(args.time_variants, VARIANTS, "variant")
    if timed is None:
        timed = list(TIME_PLAN.get(name, ()))
    if args.budget != "steps" and args.seconds is None and "defaults" not in chosen:
        chosen = ["defaults", *chosen]
    chosen.sort(key=lambda v: v != "defaults")
    runs = []
    for v in chosen:
        cfg, why = variant_config(base, family, v)
        if cfg is None:
            skipped[v] = why
            continue
        if args.budget in ("steps", "both") or (v == "defaults" and args.seconds is None):
            runs.append((v, cfg, "steps"))
        wants_time = args.budget == "time" or (args.budget == "both" and v in timed)
        if wants_time and not (v == "defaults" and args.seconds is None):
            runs.append((v, cfg, "time"))
    runs.sort(key=lambda r: r[2] == "time")
    return runs

"""A user's own images, end to end: RGB and grayscale class folders and unpaired domains
without ground truth, made here, through `ganflow run --config` (Prefect ephemeral, local
Ray, MLflow on SQLite, local snapshots) to registered champions, then `ganflow generate`
from each; the config follows the data, contradictions fail in seconds, and a cGAN trained
on RGB shapes is judged by the snapshot's own classifier."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import yaml
from own_data import CLASSES, labelled, unpaired
from torch import nn

from flows.cli import main

# A hang guard, not a speed target: the three-family run took 1,078 s beside two 1-thread
# benchmarks (load average 6-10) on this 2-core machine.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-images")
    return {
        "rgb": labelled(root / "shapes-rgb", per_class=70, seed=1),
        "gray": labelled(root / "shapes-gray", per_class=50, classes=CLASSES, gray=True, seed=2),
        "pair": unpaired(root / "c2s", per_domain=100, seed=3),
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory, classifier_cache):
    pytest.importorskip("ray")
    from ray_isolated import embedded_pipeline

    with embedded_pipeline(tmp_path_factory.mktemp("own-home"), classifier_cache) as home:
        yield home


SMALL = {"train.log_every": 5, "model.ngf": 8, "model.ndf": 8, "train.batch_size": 8}
# The cGAN must learn its labels to pass promotion's gate: 600 steps at ngf 16 reach class
# accuracy 0.99-1.00 on the shapes (measured, seeds 0 and 1; 300-400 steps sit at the gate).
# Three evaluations (the preset's ten, each a per-class FD and a sample grid, were a fifth of
# the suite's longest test); the best step is one of them, as in any run.
CGAN = {
    "train.log_every": 50,
    "eval.every": 200,
    "model.ngf": 16,
    "model.ndf": 16,
    "train.steps": 600,
}
# Collapse check: the samples of one label spread at least this share of the label's real
# images (mean pairwise pixel distance). Measured 0.88-0.98 after 600 steps; one image per
# label is 0.
MIN_LABEL_SPREAD = 0.3


def _spread(images: torch.Tensor) -> float:
    return torch.pdist(images.flatten(1).double()).mean().item()


class _OneZ(nn.Module):
    """G collapsed onto one image per label: every z replaced by one fixed draw."""

    def __init__(self, G: nn.Module, z_dim: int):
        super().__init__()
        self.G = G
        self.register_buffer(
            "z0", torch.randn(1, z_dim, generator=torch.Generator().manual_seed(7))
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.G(self.z0.expand(z.shape[0], -1), y)


def _class_images(folder) -> torch.Tensor:
    """A class folder's PNGs as [N, C, H, W] in [-1, 1], as the snapshot stores them."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.slow
def test_three_families_on_own_images_to_champions(env, sources, tmp_path, monkeypatch, capsys):
    from flows.tracking import client, tracking_uri

    monkeypatch.setenv("GANFLOW_HOME", str(env))
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "families": ["gan", "cgan", "cyclegan"],
                "datasets": {
                    "gan": str(sources["gray"]),
                    "cgan": str(sources["rgb"]),
                    "cyclegan": str(sources["pair"]),
                },
                "overrides": {
                    "gan": {**SMALL, "train.steps": 20},
                    "cgan": CGAN,
                    "cyclegan": {**SMALL, "train.steps": 10, "model.n_res_blocks": 1},
                },
            }
        )
    )
    assert main(["run", "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = {r["family"]: r for r in out["results"]}
    c = client(tracking_uri())
    primary = {"gan": "fd", "cgan": "intra_fd", "cyclegan": "fd_translation"}
    for fam, r in results.items():
        assert r["promotion"]["decision"] == "champion", r["promotion"]
        assert r["promotion"]["metric"] == primary[fam]
        assert str(c.get_model_version_by_alias(r["name"], "champion").version) == r["version"]
        assert primary[fam] in r["metrics"] and f"val_{primary[fam]}" in r["metrics"]
        run = c.get_run(r["run_id"])
        # The config followed the data: size and channels from the snapshot.
        assert run.data.params["data.image_size"] == "32"
        want_ch = "1" if fam == "gan" else "3"
        assert run.data.params["data.channels"] == want_ch
        images = [a.path for a in c.list_artifacts(r["run_id"], "images")]
        assert any("samples" in p for p in images), images  # sample grids were logged
    # Judged by what each snapshot supports: labels give class figures, none give distances.
    cgan_figures = results["cgan"]["metrics"]
    assert {"class_accuracy", "classes_covered", "class_coverage"} <= set(cgan_figures)
    # Judged on diversity, not class accuracy alone: finite, logged, and through the gate.
    assert math.isfinite(cgan_figures["intra_fd"]) and 0 < cgan_figures["class_coverage"] <= 1
    assert cgan_figures["class_accuracy"] >= cgan_figures["class_accuracy_floor"]
    run_metrics = c.get_run(results["cgan"]["run_id"]).data.metrics
    assert "eval.intra_fd" in run_metrics and "eval.class_coverage" in run_metrics
    assert {"coverage", "recall"} <= set(results["gan"]["metrics"])
    assert {"coverage_translation", "recall_translation"} <= set(results["cyclegan"]["metrics"])
    assert "classes_covered" in results["gan"]["metrics"]  # the gray set has class folders
    assert "truth_error_ratio" not in results["cyclegan"]["metrics"]
    assert "label_preservation" not in results["cyclegan"]["metrics"]
    cg = c.get_run(results["cgan"]["run_id"]).data.params
    assert cg["model.num_classes"] == "3"
    assert c.get_run(results["gan"]["run_id"]).data.tags["ganflow.judge_task"] == "classes"
    assert c.get_run(results["cyclegan"]["run_id"]).data.tags["ganflow.judge_task"] == (
        "domain_rotation"
    )

    # Samples from every champion.
    grid = tmp_path / "gan.png"
    assert main(["generate", results["gan"]["name"], "--n", "8", "--out", str(grid)]) == 0
    arr = tmp_path / "cgan.npz"
    assert (
        main(["generate", results["cgan"]["name"], "--label", "2", "--n", "4", "--out", str(arr)])
        == 0
    )
    with np.load(arr) as z:
        assert z["images"].shape == (4, 3, 32, 32) and (z["labels"] == 2).all()
    # The champion draws different images for one label, about as spread as the real ones.
    folders = sorted(p for p in sources["rgb"].iterdir() if p.is_dir())
    for label, folder in enumerate(folders):
        out_file = tmp_path / f"label{label}.npz"
        argv = ["generate", results["cgan"]["name"], "--label", str(label), "--n", "16"]
        assert main([*argv, "--out", str(out_file)]) == 0
        with np.load(out_file) as z:
            ratio = _spread(torch.from_numpy(z["images"])) / _spread(_class_images(folder))
        print(f"cgan label {label} ({folder.name}): spread {ratio:.2f} of the real images'")
        assert ratio > MIN_LABEL_SPREAD, (label, ratio)
    src = next(iter(sorted((sources["pair"] / "trainA").iterdir())))
    moved = tmp_path / "translated.png"
    assert (
        main(["generate", results["cyclegan"]["name"], "--input", str(src), "--out", str(moved)])
        == 0
    )
    assert grid.exists() and moved.exists()
    _cgan_champion_is_judged_by_the_snapshots_classifier(results["cgan"])


def _cgan_champion_is_judged_by_the_snapshots_classifier(result: dict) -> None:
    """Behaviour of the RGB shapes' cGAN champion: samples of label y are classified as y by
    the snapshot's judge far above chance (1/3), and are not one image per label. Floor 0.8;
    measured 1.00 (600 steps, 2-core CPU). (Once a test of its own that trained the same
    config again in this process; the champion is that model.)"""
    from flows import registry
    from flows.settings import cache_dir, snapshot_root
    from flows.snapshots.load import load_dataset
    from gan_core.evaluate import evaluate, gate_failure, sample
    from gan_core.judge import load_or_train_judge

    cfg, models, _ = registry.load_registered(result["name"])
    assert (cfg.data.channels, cfg.data.image_size, cfg.model.num_classes) == (3, 32, 3)
    assert cfg.model.arch == "conv"  # DCGAN layout for 32 px
    sid, root = result["snapshot_id"], snapshot_root()
    data, test = load_dataset(sid, "train", root), load_dataset(sid, "test", root)
    judge = load_or_train_judge(sid, data, cache_dir(), heldout=test)
    assert judge.task == "classes" and judge.heldout_accuracy >= 0.9
    out = evaluate(cfg, models, test, judge)
    print("cgan on RGB shapes:", out)
    assert out["class_accuracy"] >= 0.8
    assert gate_failure(out, "intra_fd") is None
    # Diversity, which class accuracy cannot see: each label's samples spread about as much
    # as the label's real images, and the same generator collapsed onto one image per label
    # (its noise ignored) keeps its class accuracy but fails both checks.
    collapsed = {**models, "G": _OneZ(models["G"], cfg.model.z_dim)}
    worse = evaluate(cfg, collapsed, test, judge)
    print("collapsed twin:", worse)
    assert worse["class_accuracy"] >= 0.8
    assert worse["intra_fd"] > out["intra_fd"] and worse["class_coverage"] < out["class_coverage"]
    for label in range(3):
        real = _spread(test.images[test.labels == label])
        labels = torch.full((16,), label)
        assert _spread(sample(cfg, models["G"], 16, 1, labels)) > MIN_LABEL_SPREAD * real
        assert _spread(sample(cfg, collapsed["G"], 16, 1, labels)) < 1e-4 * real


@pytest.mark.slow
def test_contradictions_fail_in_one_line_before_any_work(env, sources, monkeypatch, capsys):
    monkeypatch.setenv("GANFLOW_HOME", str(env))
    monkeypatch.delenv("GANFLOW_FID_WEIGHTS", raising=False)
    assert main(["ingest", str(sources["rgb"]), "--name", "shapes"]) == 0
    capsys.readouterr()
    for argv, message in [
        (["--family", "cgan", "--set", "data.channels=1"], "data.channels: 1 contradicts"),
        (["--family", "cgan", "--set", "image_size=64"], "data.image_size: 64 contradicts"),
        (["--family", "cyclegan"], "cyclegan cannot train on shapes"),
        (["--family", "gan", "--set", "eval.inception=true"], "GANFLOW_FID_WEIGHTS"),
    ]:
        t0 = time.monotonic()
        rc = main(["train", "--dataset", "shapes", *argv])
        err = capsys.readouterr().err.strip()
        assert rc != 0
        assert message in err and len(err.splitlines()) == 1, err
        assert time.monotonic() - t0 < 30  # no Ray job, no retries


@pytest.mark.slow
def test_a_config_that_cannot_run_fails_fast_and_a_good_one_finishes(
    env, sources, monkeypatch, capsys
):
    """A config error is one line from the driver (seconds); the issue's CycleGAN command
    on unpaired RGB images without ground truth finishes; a deterministic error inside a
    worker is raised at once with the worker's own message (no retries)."""
    monkeypatch.setenv("GANFLOW_HOME", str(env))
    assert main(["ingest", str(sources["pair"]), "--name", "c2s"]) == 0
    capsys.readouterr()
    # patch_layers=4 on 32 px: PatchGAN's receptive field overruns the image.
    rc = main(["train", "--family", "cyclegan", "--dataset", "c2s", "--set", "patch_layers=4"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "patch_layers" in err

    small = ["--set", "train.steps=4", "--set", "log_every=2", "--set", "n_res_blocks=1"]
    argv = ["train", "--family", "cyclegan", "--dataset", "c2s", "--set", "data.channels=3"]
    assert main([*argv, *small, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "fd_translation" in out["metrics"] and "truth_error_ratio" not in out["metrics"]

    # Break the validation split only: the driver's dry run reads train and test, so the
    # error surfaces in the worker, which must not be retried three times.
    from flows.settings import snapshot_root
    from flows.snapshots.load import resolve_snapshot

    manifest = resolve_snapshot("c2s", snapshot_root())
    val = [sh.file for sh in manifest.shards if sh.split == "val"]
    assert val
    shard = env / "snapshots" / manifest.id / val[0]
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    t0 = time.monotonic()
    rc = main([*argv, *small, "--max-failures", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    last = err[-1]
    assert "rank 0" in last and "does not match its manifest hash" in last, err
    print(f"worker error raised after {time.monotonic() - t0:.0f} s")


def test_dry_run_turns_a_model_error_into_one_line(monkeypatch):
    from torch import nn

    from flows.train.data_config import dry_run
    from gan_core import train as train_module
    from gan_core.config import ConfigError
    from gan_core.data import load_builtin
    from gan_core.presets import preset

    cfg = preset("gan", "tiny")
    data, test = (load_builtin("builtin:digits", 16, s) for s in ("train", "test"))
    dry_run(cfg, data, test)  # a config that works passes quietly
    real = train_module.build_models

    def wrong_d(c):
        nets = real(c)
        nets["D"] = nn.Sequential(nn.Flatten(), nn.Linear(3, 1))  # 256 inputs expected
        return nets

    monkeypatch.setattr(train_module, "build_models", wrong_d)
    with pytest.raises(ConfigError, match="does not run on builtin:digits") as err:
        dry_run(cfg, data, test)
    assert "\n" not in str(err.value)

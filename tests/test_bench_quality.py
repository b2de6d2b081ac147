"""The quality benchmark's own parts: drawn datasets that are deterministic and whose classes
are told apart by their geometry alone, the plain DCGAN anchor, judge-free figures that
separate good from collapsed or copied samples, the run plan, and ``--quick`` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from flows.bench import quality, quality_plan, quality_report
from flows.bench import quality_data as qd


def _shape_by_fill(images: torch.Tensor) -> torch.Tensor:
    """Class from geometry alone: the share of its bounding box a shape fills (square 1,
    circle pi/4, triangle 1/2). The corner pixel is background: shapes keep a margin."""
    out = []
    for img in images:
        bg = img[:, 0, 0][:, None, None]
        dist = (img - bg).norm(dim=0)
        mask = dist > dist.max() / 2
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = mask.sum() / box
        out.append(2 if fill < 0.64 else 0 if fill < 0.9 else 1)
    return torch.tensor(out)


def test_shapes_are_deterministic_and_separable_by_geometry():
    a, b = qd.make_shapes("test", 40, seed=0), qd.make_shapes("test", 40, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (120, 3, 32, 32) and a.images.dtype == torch.float32
    assert a.images.min() >= -1 and a.images.max() <= 1
    assert torch.equal(a.labels, torch.arange(120) % 3)  # class-interleaved rows
    assert not torch.equal(a.images, qd.make_shapes("test", 40, seed=1).images)
    assert not torch.equal(a.images, qd.make_shapes("val", 40, seed=0).images)
    # Colours differ per image: the geometry, not a colour, carries the class.
    assert (_shape_by_fill(a.images) == a.labels).float().mean() >= 0.95
    corners = a.images[:, :, 0, 0]
    assert corners.std(dim=0).min() > 0.3


def test_subsets_are_nested_and_stratified():
    full = qd.make_shapes("train", 20)
    ten, quarter = qd.subset(full, 0.10), qd.subset(full, 0.25)
    assert len(ten) == 6 and len(quarter) == 15
    assert torch.equal(quarter.images[:6], ten.images)
    assert torch.bincount(quarter.labels).tolist() == [5, 5, 5]


def test_colour_pair_has_known_truth_and_unpaired_domains():
    p, q = qd.make_colours("test", 10), qd.make_colours("test", 10)
    assert torch.equal(p.x.images, q.x.images) and torch.equal(p.x_truth, q.x_truth)
    assert p.x_truth.shape == p.x.images.shape == p.y.images.shape
    # Day: light backgrounds; night: dark ones; the truth is x drawn at night.
    assert p.x.images[:, :, 0, 0].mean() > 0.3 and p.y.images[:, :, 0, 0].mean() < -0.3
    assert p.x_truth[:, :, 0, 0].mean() < -0.3
    for images in (p.x.images, p.x_truth, p.y.images):
        assert (_shape_by_fill(images) == p.x.labels).float().mean() >= 0.9
    # The truth keeps x's geometry; Y's training images come from other shapes.
    assert torch.equal(_shape_by_fill(p.x_truth), _shape_by_fill(p.x.images))
    assert not torch.equal(p.y.images, p.x_truth)


def test_anchor_trains_a_few_steps():
    torch.manual_seed(0)
    data = qd.make_shapes("train", 8)
    anchor = qd.Anchor(data, z_dim=16, ngf=8, batch=8, seed=0, cond=True)
    before = [p.clone() for p in anchor.G.parameters()]
    losses = anchor.train(3)
    assert anchor.step == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, anchor.G.parameters()))
    anchor.G.eval()
    fake = anchor.G(torch.randn(6, 16), torch.arange(6) % 3)
    assert fake.shape == (6, 3, 32, 32) and fake.abs().max() <= 1
    # Same seed, same run: the anchor's stream is seeded like gan_core's.
    again = qd.Anchor(data, z_dim=16, ngf=8, batch=8, seed=0, cond=True)
    again.train(3)
    assert all(torch.equal(a, b) for a, b in zip(anchor.G.parameters(), again.G.parameters()))


def test_thumbnail_fd_and_memorisation_tell_good_from_bad():
    test, val = qd.make_shapes("test", 60), qd.make_shapes("val", 60)
    train = qd.make_shapes("train", 60)
    assert qd.thumbnails(test.images).shape == (180, 192)
    assert qd.thumb_fd(test.images, test.images) == pytest.approx(0, abs=1e-3)
    disjoint = qd.thumb_fd(test.images, val.images)
    collapsed = qd.thumb_fd(test.images, val.images[:1].repeat(180, 1, 1, 1))
    assert 0 < disjoint < collapsed / 5
    # Right colours, wrong labels: only the per-class figure sees it.
    shuffled = val.labels.roll(1)
    assert qd.intra_thumb_fd(test.images, test.labels, val.images, shuffled) > qd.intra_thumb_fd(
        test.images, test.labels, val.images, val.labels
    )
    assert qd.memorisation(train.images, test.images, val.images) == pytest.approx(1, abs=0.15)
    copies = train.images + 0.01 * torch.randn_like(train.images)
    assert qd.memorisation(train.images, test.images, copies) < 0.2


def _args(**kw):
    return quality.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_plan_runs_defaults_first_time_rows_last_and_skips_said():
    splits = quality_plan.load_source("shapes")
    splits = {k: qd.subset(v, 0.01) for k, v in splits.items()}
    b = quality_plan.make_bench("shapes", splits, judge=None)
    args = _args(variants="old,anchor,hinge,no-r1,concat,no-sn,ema", time_variants="anchor,old")
    base = quality_plan.base_config(b, args, 10, 0)
    skipped: dict = {}
    runs = quality_plan.plan_runs("shapes", "cgan", base, args, skipped)
    names = [(v, budget) for v, _, budget in runs]
    assert names[0] == ("defaults", "steps")
    assert names[-2:] == [("old", "time"), ("anchor", "time")]
    assert {v for v, budget in names if budget == "steps"} == {
        "defaults",
        "old",
        "anchor",
        "concat",
        "ema",
    }
    # The defaults' loss is hinge, with no R1, no spectral norm and no EMA.
    assert skipped == {
        "hinge": "same as defaults",
        "no-r1": "same as defaults",
        "no-sn": "same as defaults",
    }
    ema = next(c for v, c, _ in runs if v == "ema")
    assert base.train.ema_half_life == 0 and ema.train.ema_half_life == 10_000
    # The cGAN's augmentation has no cutout (the GAN's keeps it): see gan_core.presets.
    assert base.augment.ada and base.augment.policy == "color,translation"
    old = next(c for v, c, _ in runs if v == "old")
    assert old.model.g_layout == "wide" and not old.model.d_batchnorm
    assert base.model.ngf == 32 and base.train.batch_size == 6  # cut to the 6 images here


@pytest.mark.slow
def test_quick_writes_tables_grids_and_json(tmp_path, capsys):
    out = tmp_path / "out"
    quality.main(["--quick", "--steps", "4", "--cycle-steps", "2", "--out", str(out)])
    md = (out / "results.md").read_text()
    assert "## shapes-10" in md and "## colours" in md and "| anchor@time |" in md
    result = json.loads((out / "results.json").read_text())
    runs = result["datasets"]["shapes-10"]["runs"]
    assert [r["run"] for r in runs] == ["defaults", "anchor", "anchor@time"]
    # The equal-time row: the defaults' steps scaled by the speed ratio probed beside them.
    timed = runs[2]
    assert timed["speed_ratio"] > 0
    assert timed["steps"] == max(1, round(runs[0]["steps"] * timed["speed_ratio"]))
    for r in runs:
        assert (out / r["grid"]).is_file()
        assert r["figures"]["fd_thumb"] > 0 and "fd" in r["figures"]["judge"]
        assert r["config"]["train.steps"] >= 1
    assert "truth_error_ratio" in result["datasets"]["colours"]["runs"][0]["figures"]["judge"]
    assert "| defaults |" in capsys.readouterr().out


def test_summary_averages_each_run_over_seeds():
    def run(name, seed, fd):
        judge = {"fd": fd, "intra_fd": fd * 2, "coverage": 0.5, "class_accuracy": 0.9}
        figures = {"judge": judge, "fd_thumb": 1.0, "intra_fd_thumb": 2.0}
        return {
            "run": name,
            "seed": seed,
            "steps": 10,
            "seconds": 1.0,
            "steps_per_s": 10.0,
            "figures": figures,
        }

    rows = [
        run("defaults", 0, 10.0),
        run("anchor", 0, 30.0),
        run("defaults", 1, 20.0),
        run("anchor", 1, 50.0),
    ]
    out = quality_report.summary("cgan", rows)
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in out.splitlines()[2:]}
    assert "| 15 ± 7.07 | 30 ± 14.1 |" in lines["defaults"]
    assert "| 40 ± 14.1 | 80 ± 28.3 |" in lines["anchor"]
    assert quality_report.summary("cgan", rows[:2]) == ""  # one seed: the table says it all


def test_a_run_whose_best_val_step_is_not_its_last_gets_a_best_row(tmp_path, monkeypatch):
    # Val figures made up so that step 2 of 4 is the best: the row must hold step 2's weights,
    # judged on test like the last step's.
    def offer(best, cfg, b, step, models):
        figures = {"fd": 1.0 if step == 2 else 5.0}
        best.offer(step, figures, {k: v for k, v in models.items() if k == "G"})

    monkeypatch.setattr(quality, "_offer", offer)
    out = tmp_path / "out"
    argv = ["--datasets", "shapes-gan", "--variants", "defaults", "--budget", "steps"]
    quality.main([*argv, "--steps", "4", "--samples", "60", "--ngf", "8", "--out", str(out)])
    runs = json.loads((out / "results.json").read_text())["datasets"]["shapes-gan"]["runs"]
    assert [(r["run"], r["steps"]) for r in runs] == [("defaults", 4), ("defaults best", 2)]
    last, best = runs
    assert best["best_of"] == 4 and best["val"] == {"fd": 1.0}
    assert best["seconds"] == last["seconds"]  # the same run
    assert best["figures"]["judge"]["fd"] != last["figures"]["judge"]["fd"]  # other weights
    assert (out / best["grid"]).is_file() and best["grid"] != last["grid"]
    assert "| defaults best |" in (out / "results.md").read_text()


def test_the_retrain_bench_shapes_folder_grows_as_a_superset_of_rgb_pngs(tmp_path):
    from PIL import Image

    from flows.bench.retrain import write_shapes_folder

    root = write_shapes_folder(tmp_path / "shapes", 0.8, per_class=10)
    before = {p: p.read_bytes() for p in root.rglob("*.png")}
    assert sorted(d.name for d in root.iterdir()) == ["circle", "square", "triangle"]
    assert all(len(list((root / d).iterdir())) == 8 for d in ("circle", "square", "triangle"))
    write_shapes_folder(root, 1.0, per_class=10)
    after = {p: p.read_bytes() for p in root.rglob("*.png")}
    assert len(after) == 30 and all(after[p] == b for p, b in before.items())
    with Image.open(next(iter(after))) as im:
        assert im.mode == "RGB" and im.size == (32, 32)

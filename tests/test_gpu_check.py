"""`make gpu-check-dry`: the prepared GPU check's CPU rehearsal, end to end, so the script
cannot rot between GPU sessions (the bench in quick mode, a 1-worker Ray Train job in bf16
to a FINISHED MLflow run, the plain loop, bf16 against fp32)."""

from __future__ import annotations

import json

import pytest

from flows.bench import gpu_check


@pytest.mark.slow  # ~70 s on an AVX2-only 2-core CPU (bf16 emulated)
def test_dry_run_writes_json_and_markdown(tmp_path, monkeypatch):
    # run_check points GANFLOW_HOME and Ray's settings at the output folder; undo after.
    for key in (
        "GANFLOW_HOME",
        "RAY_USAGE_STATS_ENABLED",
        "RAY_AUTH_MODE",
        "PREFECT_SERVER_ANALYTICS_ENABLED",
    ):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--dry"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert {
        "dry",
        "device",
        "nvidia_smi",
        "bench",
        "ray_train",
        "plain_loop",
        "bf16_vs_fp32",
        "wall_s",
        "ok",
    } <= set(report)
    assert report["dry"] is True and report["device"] == "cpu" and report["ok"] is True
    assert {(r["name"], r["precision"]) for r in report["bench"]} >= {
        ("mlp-gan-28", "fp32"),
        ("mlp-gan-28", "bf16"),
        ("dcgan-32", "bf16"),
        ("cyclegan-32-b1", "bf16"),
    }
    for r in report["bench"]:
        assert r["samples_per_s"] > 0 and r["flops_per_step"] > 0 and r["mfu"] > 0
    ray = report["ray_train"]
    assert ray["ok"] and ray["mlflow_status"] == "FINISHED" and ray["steps"] == 4
    assert ray["steps_per_s"] > 0 and report["plain_loop"]["steps_per_s"] > 0
    agree = report["bf16_vs_fp32"]
    assert agree["ok"] and {"loss_D", "loss_G"} <= set(agree["abs_gap"])
    md = (out / "gpu_check.md").read_text()
    assert "| config |" in md and "Ray Train" in md and "bf16 vs fp32" in md


def test_shapes_dataset_is_labelled_rgb(tmp_path):
    from PIL import Image

    root = gpu_check.make_shapes_dataset(tmp_path / "shapes", n=8, size=64)
    folders = sorted(p.name for p in root.iterdir())
    assert folders == sorted(gpu_check.SHAPES)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 8
    with Image.open(files[0]) as img:
        assert img.mode == "RGB" and img.size == (64, 64)

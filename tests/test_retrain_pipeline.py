"""Retraining that follows the data (issue 21), end to end on real services: Prefect
(ephemeral), a local Ray cluster, MLflow on SQLite, a local folder dataset that grows.

One sequence, each step reading what the last one registered:
1. first run: the champion, from scratch;
2. the same data and config again: kept, no training, no new version, no new MLflow
   training run (and, in a fresh process, in seconds without importing Ray);
3. the folder grows by 25%: the champion is measured on the new snapshot first (and logged in
   the ganflow-retraining experiment), and the candidate starts from its checkpoint: with
   learning rates of 1e-12 the candidate's trained parameters are the champion's;
4. the same again: kept, because that candidate already lost on this data;
5. a config whose networks have other shapes: auto falls back to scratch and says why;
6. --force on unchanged data and config trains anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.orchestration import retraining as pipeline

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

MODEL = "ganflow-gan-retrain-test"
BASE = {"train.steps": 60, "train.log_every": 20, "train.batch_size": 32, "model.hidden": 64}


@pytest.fixture(scope="module")
def env(tmp_path_factory, classifier_cache):
    pytest.importorskip("ray")
    from ray_isolated import embedded_pipeline

    with embedded_pipeline(tmp_path_factory.mktemp("retrain-home"), classifier_cache) as home:
        yield home


def _config(tmp_path: Path, folder: Path, overrides: dict, **extra) -> str:
    path = tmp_path / f"pipeline-{time.monotonic_ns()}.yaml"
    cfg = {
        "families": ["gan"],
        "datasets": {"gan": str(folder)},
        "overrides": {"gan": overrides},
        "model_names": {"gan": MODEL},
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _versions(c) -> list[str]:
    return sorted(str(v.version) for v in c.search_model_versions(f"name = '{MODEL}'"))


def _train_runs(c) -> int:
    exp = c.get_experiment_by_name("ganflow-train")
    return 0 if exp is None else len(c.search_runs([exp.experiment_id]))


def _params(checkpoint: str) -> dict:
    from flows.train.checkpoints import read_warm_start

    return read_warm_start(checkpoint)["models"]


def test_keep_warm_measure_fallback_force(env, tmp_path, monkeypatch):
    from flows.bench.retrain import write_digits_folder
    from flows.tracking import RETRAINING_EXPERIMENT, client, tracking_uri

    monkeypatch.setenv("GANFLOW_HOME", str(env))
    folder = write_digits_folder(tmp_path / "digits", 0.8)
    trained = {"n": 0}
    real_train = pipeline.stage_train

    def counted(*a):
        trained["n"] += 1
        return real_train(*a)

    monkeypatch.setattr(pipeline, "stage_train", counted)
    c = client(tracking_uri())

    # 1. The first champion, from scratch.
    first = _config(tmp_path, folder, BASE)
    r1 = pipeline.retraining_flow(first).results[0]
    assert (r1.decision, r1.start, r1.version) == ("champion", "scratch", "1")
    assert r1.start_why == "there is no champion to start from"
    tags = c.get_model_version(MODEL, "1").tags
    assert tags["ganflow.checkpoint"] and tags["ganflow.config_digest"]
    assert tags["ganflow.code_digest"] and "ganflow.warm_from" not in tags

    # 2. Nothing changed: kept, no Ray job, no version, no training run.
    runs = _train_runs(c)
    t0 = time.perf_counter()
    out = pipeline.retraining_flow(first)
    r2 = out.results[0]
    assert r2.decision == "kept" and r2.version == "1" and r2.run_id is None
    assert r2.why.startswith("champion v1 already trained on snapshot")
    assert "**kept**" in out.summary
    assert trained["n"] == 1 and _versions(c) == ["1"] and _train_runs(c) == runs
    print(f"kept in-process: {time.perf_counter() - t0:.1f} s")

    code = (
        "import json, sys, time; t = time.perf_counter(); from flows.cli import main; "
        f"rc = main(['run', '--config', {first!r}, '--json']); "
        "print(json.dumps({'rc': rc, 'ray': 'ray' in sys.modules, "
        "'s': time.perf_counter() - t}))"
    )
    # ... and as `ganflow run` in a fresh process: seconds, without Prefect's server or Ray.
    child_env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=300
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary, cli = json.loads(lines[-1]), json.loads(lines[-2])
    assert summary["rc"] == 0 and summary["ray"] is False
    assert [r["decision"] for r in cli["results"]] == ["kept"]
    assert "kept (champion v1 already trained" in proc.stderr
    print(f"kept `ganflow run` subprocess: {wall:.1f} s wall, {summary['s']:.1f} s in Python")
    assert wall < 30, f"a kept run took {wall:.1f} s"
    assert _versions(c) == ["1"] and _train_runs(c) == runs

    # 3. The data grew: the champion is measured on it, the candidate starts warm. Learning
    # rates of 1e-12 (0 is refused) leave the candidate's parameters where they started,
    # to 1e-9 (60 Adam steps move each by at most about 60 x 1e-12): the champion's, where
    # a random start would be ~0.1 away. Batch-norm statistics do move (forward passes on
    # the new data): the margin keeps the champion whatever they do to the figures.
    write_digits_folder(folder, 1.0)
    frozen = _config(
        tmp_path, folder, {**BASE, "optim.lr_g": 1e-12, "optim.lr_d": 1e-12}, margin=1e6
    )
    out = pipeline.retraining_flow(frozen)
    r3 = out.results[0]
    assert r3.snapshot_id != r1.snapshot_id and trained["n"] == 2
    assert (r3.start, r3.warm_from, r3.start_why) == ("warm", "1", "from champion v1")
    measured = r3.champion_on_snapshot
    assert measured.version == "1" and measured.metric == r3.promotion.metric
    assert measured.at_promotion is not None and measured.value > 0
    assert f"{measured.value:.4g} (v1;" in out.summary
    v1, v2 = c.get_model_version(MODEL, "1"), c.get_model_version(MODEL, r3.version)
    assert v2.tags["ganflow.warm_from"] == "1" and v2.tags["ganflow.warm_from_run"] == v1.run_id
    assert c.get_run(r3.run_id).data.tags["ganflow.warm_from"] == "1"
    assert c.get_run(r3.run_id).data.tags["ganflow.start"] == "warm"
    import torch

    champ, cand = _params(v1.tags["ganflow.checkpoint"]), _params(v2.tags["ganflow.checkpoint"])
    for net in ("G", "D"):
        for k, t in champ[net].items():
            if "running" not in k and "num_batches" not in k:
                torch.testing.assert_close(cand[net][k], t, rtol=0, atol=1e-9, msg=f"{net}.{k}")
    # The retraining's own MLflow run holds the champion's figure on the new snapshot.
    exp = c.get_experiment_by_name(RETRAINING_EXPERIMENT)
    run = c.get_run(out.retraining_run)
    assert run.info.experiment_id == exp.experiment_id
    key = f"gan.champion.val_{measured.metric}"
    assert run.data.metrics[key] == pytest.approx(measured.value)
    assert run.data.tags["gan.snapshot_id"] == r3.snapshot_id
    assert run.data.tags["gan.start"] == "warm"

    # 4. Same data, same config: that candidate already lost to the champion (equal
    # weights cannot beat it): kept, not trained again.
    assert r3.promotion.decision == "rejected"
    r4 = pipeline.retraining_flow(frozen).results[0]
    assert r4.decision == "kept" and trained["n"] == 2
    assert r4.why.startswith(f"challenger v{r3.version} already trained")

    # 5. Other shapes: auto falls back to scratch, naming the field.
    wider = _config(tmp_path, folder, {**BASE, "model.hidden": 96})
    r5 = pipeline.retraining_flow(wider).results[0]
    assert r5.start == "scratch" and trained["n"] == 3
    assert "model.hidden 64 -> 96" in r5.start_why, r5.start_why
    assert "snapshot" in r5.why and "config changed" in r5.why

    # 6. --force: unchanged data and config, trained anyway (a new version).
    before = _versions(c)
    r6 = pipeline.retraining_flow(wider, force=True).results[0]
    assert r6.decision in ("champion", "rejected") and r6.why == "--force"
    assert trained["n"] == 4 and len(_versions(c)) == len(before) + 1
    assert "forced" in r6.run_name

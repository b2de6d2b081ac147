"""Families side by side (issue 21): on a local Ray cluster of two 1-CPU nodes, the three
families' chains run concurrently, two training jobs at a time (the cluster's room for
1-worker jobs); a family whose data is broken fails in its own row while the other two are
promoted, and the flow's error names it. The same pipeline one family after another in the
same test gives the wall time to compare (printed, not asserted: a shared machine's load
decides a timing; the README quotes it). What is asserted is the overlap: side by side, the
two training runs' MLflow intervals overlap; one after another, they do not."""

from __future__ import annotations

import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.orchestration import retraining as pipeline
from flows.tracking import tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SMALL = {  # the gan: a first champion needs no gate
    "train.steps": 200,
    "train.log_every": 50,
    "eval.every": 100,
    "train.batch_size": 32,
    "model.hidden": 64,
}
# The cGAN must pass the class-accuracy gate: its preset at 700 steps carries its labels
# (conftest's trained_cgan: about 0.96); 200 steps do not (0.10).
CGAN = {"train.steps": 700, "train.log_every": 100, "eval.every": 700}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, classifier_cache):
    """embedded_pipeline's environment on a Ray cluster of two 1-CPU nodes."""
    pytest.importorskip("ray")
    from home_cache import seed_judges
    from ray_isolated import RAY_TEST_ENV, isolated_cluster

    home = seed_judges(tmp_path_factory.mktemp("sbs-home"), classifier_cache)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "GANFLOW_HOME": str(home),
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            **RAY_TEST_ENV,
        }.items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("PREFECT_API_URL", raising=False)
        with isolated_cluster([1, 1]):
            yield home


def _config(tmp_path, tag: str, broken) -> str:
    path = tmp_path / f"pipeline-{tag}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "families": ["gan", "cgan", "cyclegan"],
                "datasets": {"cyclegan": str(broken)},
                "overrides": {"gan": SMALL, "cgan": CGAN},
                "model_names": {f: f"ganflow-{f}-{tag}" for f in ("gan", "cgan", "cyclegan")},
            }
        )
    )
    return str(path)


def test_three_families_side_by_side_one_failing(two_nodes, tmp_path, monkeypatch):
    monkeypatch.setenv("GANFLOW_HOME", str(two_nodes))
    broken = tmp_path / "broken"  # images that do not decode: cyclegan's ingest fails
    broken.mkdir()
    for i in range(12):
        (broken / f"{i}.png").write_bytes(b"not a png" * (i + 1))
    # Warm-up paid by neither timing: Prefect's ephemeral server, the digits snapshot, the
    # MLflow database, the judge, the first Ray Train job (its workers' imports).
    warm = tmp_path / "warm.yaml"
    warm.write_text(
        yaml.safe_dump(
            {
                "families": ["gan"],
                "overrides": {"gan": {**SMALL, "train.steps": 50, "eval.every": 50}},
                "model_names": {"gan": "ganflow-gan-warm-up"},
            }
        )
    )
    pipeline.retraining_flow(str(warm))

    walls, outs = {}, {}
    for tag, side_by_side in (("sbs", True), ("seq", False)):
        t0 = time.perf_counter()
        with pytest.raises(pipeline.FamiliesFailed) as info:
            pipeline.retraining_flow(_config(tmp_path, tag, broken), side_by_side=side_by_side)
        walls[tag] = time.perf_counter() - t0
        outs[tag] = info.value
    print(
        f"three families (one failing), 2 x 1-CPU Ray nodes: side by side {walls['sbs']:.1f} s, "
        f"one after another {walls['seq']:.1f} s"
    )
    for exc in outs.values():
        rows = {r.family: r for r in exc.result.results}
        assert list(rows) == ["gan", "cgan", "cyclegan"]
        assert rows["gan"].decision == rows["cgan"].decision == "champion", rows
        assert rows["cyclegan"].decision == "failed"
        assert rows["cyclegan"].error_stage == "ingest", rows["cyclegan"]
        assert str(exc).startswith("failed: cyclegan (ingest: ")
        assert "2 other families finished" in str(exc)
        assert "**failed** (ingest)" in exc.result.summary
        print(exc.result.summary)
    client = MlflowClient(tracking_uri())
    spans = {}
    for tag, exc in outs.items():
        rows = {r.family: r for r in exc.result.results}
        runs = [client.get_run(rows[f].run_id).info for f in ("gan", "cgan")]
        spans[tag] = [(r.start_time, r.end_time) for r in runs]
    (a0, a1), (b0, b1) = spans["sbs"]
    assert a0 < b1 and b0 < a1, spans  # concurrent training runs
    (a0, a1), (b0, b1) = spans["seq"]
    assert a1 <= b0 or b1 <= a0, spans  # one after another


def test_ganflow_run_exit_status_names_the_failed_families(tmp_path, monkeypatch, capsys):
    """`ganflow run`: the summary's rows, then one error line naming each failed family
    and its stage, exit status 2 (two broken sources: no Ray needed)."""
    from flows.cli import main

    monkeypatch.setenv("GANFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    datasets = {}
    for fam in ("gan", "cgan"):
        folder = tmp_path / fam
        folder.mkdir()
        for i in range(4):
            (folder / f"{i}.png").write_bytes(b"not a png" * (i + 1))
        datasets[fam] = str(folder)
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"families": ["gan", "cgan"], "datasets": datasets}))
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        assert main(["run", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert (
        "| gan | - | **failed** (ingest) |" in out and "| cgan | - | **failed** (ingest) |" in out
    )
    line = err.strip().splitlines()[-1]
    assert line.startswith("ganflow run: error: failed: gan (ingest: IngestError: "), line
    assert "; cgan (ingest: IngestError: " in line and "0 other families finished" in line

"""The retraining flow end to end, in process: Prefect (ephemeral), local Ray, MLflow on
SQLite, local snapshots, the built-in digits. Then a stage failure and a rerun that picks
up the earlier stages' results."""

from __future__ import annotations

import datetime
import json

import pytest
import yaml

from flows.orchestration import retraining as pipeline
from flows.orchestration.retraining import PipelineConfig, PipelineError

pytestmark = pytest.mark.timeout(900)

TINY = {
    "gan": {"train.steps": 200, "train.log_every": 50},
    # Promotion gates the cGAN on class accuracy: 200 steps sit near chance (0.21), 700
    # clear the gate with margin (0.96; the floor is about 0.55).
    "cgan": {"train.steps": 800, "train.log_every": 50},
    "cyclegan": {"train.steps": 40, "train.log_every": 20},
}


def test_config_validation(tmp_path):
    with pytest.raises(PipelineError, match="families: unknown"):
        PipelineConfig(families=("wgan",))
    with pytest.raises(PipelineError, match=r"overrides.gan: train.d_steps"):
        PipelineConfig(overrides={"gan": {"d_steps": 0}})
    bad = tmp_path / "p.yaml"
    bad.write_text("famlies: [gan]\n")
    with pytest.raises(PipelineError, match="unknown keys"):
        PipelineConfig.load(str(bad))
    with pytest.raises(PipelineError, match="not found"):
        PipelineConfig.load(str(tmp_path / "missing.yaml"))
    assert PipelineConfig.load(None).families == ("gan", "cgan", "cyclegan")
    # YAML that is easy to write and must not be guessed at: one line naming the field.
    for text, result in [
        ("families: cgan\n", ("cgan",)),
        ("families: gan, cyclegan\n", ("gan", "cyclegan")),
        ("margin: '0.5'\n", "margin: must be a number, got '0.5'"),
        ("search: maybe\n", "search: must be one of false, true, asha, pbt, pb2, got 'maybe'"),
        ("workers: two\n", "workers: must be an integer, got 'two'"),
        ("overrides: {gan: 5}\n", "overrides.gan: must be a mapping"),
    ]:
        bad.write_text(text)
        if isinstance(result, tuple):
            assert PipelineConfig.load(str(bad)).families == result
        else:
            with pytest.raises(PipelineError, match=result):
                PipelineConfig.load(str(bad))


@pytest.fixture(scope="module")
def env(tmp_path_factory, classifier_cache):
    pytest.importorskip("ray")
    from ray_isolated import embedded_pipeline

    with embedded_pipeline(tmp_path_factory.mktemp("pipeline-home"), classifier_cache) as home:
        yield home


def _write(tmp_path, **cfg) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_pipeline_end_to_end_registers_champions(env, tmp_path, monkeypatch, capsys):
    from flows.cli import main
    from flows.tracking import client, tracking_uri

    monkeypatch.setenv("GANFLOW_HOME", str(env))
    config = _write(tmp_path, overrides=TINY)
    started = datetime.datetime.now(datetime.UTC)
    assert main(["run", "--config", config, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fams = [r["family"] for r in out["results"]]
    assert fams == ["gan", "cgan", "cyclegan"]
    c = client(tracking_uri())
    for r in out["results"]:  # the --json output: plain JSON
        assert r["name"].startswith("ganflow-") and r["version"] == "1"
        assert r["promotion"]["decision"] == "champion"
        assert str(c.get_model_version_by_alias(r["name"], "champion").version) == "1"
        assert r["metrics"]  # held-out evaluation came back
        tags = c.get_model_version(r["name"], "1").tags
        assert tags["ganflow.snapshot_id"] == r["snapshot_id"]
    # The summary is a Prefect artifact as well.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["ganflow-retraining-summary"])
            )
        )
    # This session's Prefect database holds earlier tests' summaries too: this run's is new.
    mine = [a for a in arts if a.created and a.created >= started]
    assert len(mine) == 1 and "ganflow-cyclegan" in mine[0].data, [a.data[:200] for a in arts]
    # Each champion is an MLflow model: MLflow itself loads it and predicts (issue 12).
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    requests = {
        "gan": {"n": 2, "seed": 0},
        "cgan": {"labels": [3, 7], "seed": 0},
        "cyclegan": {"images": [[[[0.0] * 16] * 16]] * 2, "direction": "G"},
    }
    for r in out["results"]:
        model = mlflow.pyfunc.load_model(f"models:/{r['name']}@champion")
        pred = model.predict(requests[r["family"]])
        assert len(pred["images"]) == 2, r["family"]
    # And the champion can be sampled from.
    png = tmp_path / "s.png"
    assert (
        main(["generate", out["results"][1]["name"], "--label", "3", "--n", "8", "--out", str(png)])
        == 0
    )
    assert png.exists()


@pytest.mark.slow
def test_failed_stage_then_rerun_picks_up(env, tmp_path, monkeypatch):
    monkeypatch.setenv("GANFLOW_HOME", str(env))
    config = _write(
        tmp_path,
        families=["gan"],
        overrides={"gan": {"train.steps": 100, "train.log_every": 50, "train.seed": 5}},
        model_names={"gan": "ganflow-gan-rerun"},
    )
    real_promote = pipeline.stage_promote
    calls = {"train": 0}
    real_train = pipeline.stage_train

    def count_train(*a):
        calls["train"] += 1
        return real_train(*a)

    def broken(*a):
        raise RuntimeError("injected: promotion service down")

    monkeypatch.setattr(pipeline, "stage_train", count_train)
    monkeypatch.setattr(pipeline, "stage_promote", broken)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.retraining_flow(config)
    from flows.tracking import client, tracking_uri

    c = client(tracking_uri())
    versions = c.search_model_versions("name = 'ganflow-gan-rerun'")
    assert [str(v.version) for v in versions] == ["1"]  # registration survived the failure

    monkeypatch.setattr(pipeline, "stage_promote", real_promote)
    out = pipeline.retraining_flow(config)
    r = out.results[0]
    assert r.version == "1"  # the rerun reused the registered version
    assert r.promotion.decision == "champion"
    assert len(c.search_model_versions("name = 'ganflow-gan-rerun'")) == 1
    assert calls["train"] == 2 and r.metrics

"""The retraining pipeline with ``search: pbt`` (issue 22, item 2): the best PBT trial's logged
generator is the candidate, registered and promoted like a trained one, with nothing trained
after the search; its version says which trial of which search it is and where the schedule
is; an unchanged rerun keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from home_cache import seed_judges

from flows.orchestration import retraining as pipeline
from flows.orchestration.retraining import PipelineConfig, PipelineError

pytestmark = pytest.mark.timeout(1200)


def test_search_takes_false_true_asha_pbt_pb2_and_says_so_in_one_line(tmp_path):
    expected = {False: None, True: "asha", "asha": "asha", "pbt": "pbt", "pb2": "pb2"}
    for value, scheduler in expected.items():
        assert PipelineConfig(families=("gan",), search=value).search_scheduler == scheduler
    choices = "false, true, asha, pbt, pb2"
    for bad in ("maybe", "PBT", "fifo", 1, None):
        with pytest.raises(PipelineError) as err:
            PipelineConfig(families=("gan",), search=bad)
        assert str(err.value) == f"search: must be one of {choices}, got {bad!r}"
    path = tmp_path / "p.yaml"
    path.write_text("families: [gan]\nsearch: hyperband\n")
    with pytest.raises(PipelineError) as err:
        PipelineConfig.load(str(path))
    assert str(err.value) == f"search: must be one of {choices}, got 'hyperband'"
    # A PBT population starts from random weights: "warm or an error" cannot be honoured.
    with pytest.raises(
        PipelineError, match=r"^retrain.mode: must be auto or scratch with search: pbt"
    ):
        PipelineConfig(families=("gan",), search="pbt", retrain={"mode": "warm"})
    assert PipelineConfig(search="pb2", retrain={"mode": "scratch"}).search_scheduler == "pb2"


# --- a real pipeline run: local isolated Ray, MLflow on SQLite under GANFLOW_HOME ------------


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory, classifier_cache):
    """As tests/test_pbt.py's, with 4 CPUs: the gan family's default space is a population of
    4 (k on a grid of 4) and PBT ranks a population that trains side by side (each trial
    trains on one thread; the machine's real cores are shared as in test_pbt). Prefect's
    ephemeral server lives under it, as ray_isolated.embedded_pipeline sets it up."""
    pytest.importorskip("ray")
    from ray_isolated import isolated_cluster, use_test_env

    home = tmp_path_factory.mktemp("pipeline-pbt-home")
    seed_judges(home, classifier_cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GANFLOW_HOME", str(home))
        mp.setenv("PREFECT_HOME", str(home / "prefect"))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("PREFECT_API_URL", raising=False)
        use_test_env(mp)
        with isolated_cluster([4]):
            yield home


@pytest.fixture
def home(ray_home, monkeypatch):
    monkeypatch.setenv("GANFLOW_HOME", str(ray_home))  # conftest gives each test its own
    return ray_home


# 40 steps, val every 10 (so PBT decides 3 times), small MLPs.
TINY_GAN = {
    "train.steps": 40,
    "train.log_every": 5,
    "eval.every": 10,
    "train.batch_size": 16,
    "model.hidden": 32,
}
MODEL = "ganflow-gan-pbt"


@pytest.mark.slow
def test_pbt_pipeline_promotes_the_best_trial_without_retraining(home, tmp_path, monkeypatch):
    import mlflow

    from flows.tracking import client, tracking_uri
    from gan_core.evaluate import gate_failure

    settings = {
        "families": ["gan"],
        "overrides": {"gan": TINY_GAN},
        "search": "pbt",
        "model_names": {"gan": MODEL},
    }
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(settings))
    stages: list[str] = []

    def recorded(stage, fn, *args):  # the flow's own stage runner, with the stages noted
        stages.append(stage)
        return real_as_task(stage, fn, *args)

    real_as_task = pipeline._as_task
    monkeypatch.setattr(pipeline, "_as_task", recorded)
    out = pipeline.retraining_flow(str(config))
    row = out.results[0]
    assert stages == ["ingest", "plan", "search", "candidate", "lineage", "register", "promote"]
    c = client(tracking_uri())
    search, best = row.search, row.search.best
    trials = json.loads((home / "searches" / search.name / "result.json").read_text())["trials"]
    assert len(trials) == 4 and all(t["error"] is None and t["step"] == 40 for t in trials)

    # Nothing trained after the search: every run of the family is the search or a PBT trial
    # (a training run has no ganflow.kind, and ganflow-train has none of its runs).
    runs = c.search_runs(
        [e.experiment_id for e in c.search_experiments()],
        filter_string="tags.`ganflow.family` = 'gan'",
        max_results=1000,
    )
    kinds = sorted(r.data.tags.get("ganflow.kind", "train") for r in runs)
    assert kinds == ["pbt-trial"] * 4 + ["search"], kinds
    assert c.get_experiment_by_name("ganflow-train") is None

    # The registered version is the best trial's own logged generator.
    version = row.version
    mv = c.get_model_version(MODEL, version)
    assert mv.run_id == best.run_id == row.run_id
    logged = c.get_logged_model(mv.tags["ganflow.model_id"])
    assert logged.source_run_id == best.run_id and mv.source == f"models:/{logged.model_id}"
    trial_run = c.get_run(best.run_id)
    assert trial_run.data.tags["ganflow.kind"] == "pbt-trial"
    assert trial_run.data.tags["ganflow.run_name"] == f"{search.name}-{best.trial_id}"
    # Its lineage: which trial of which search, and the schedule, reachable from the version.
    tags = mv.tags
    assert tags[pipeline.PBT_TRIAL_TAG] == best.trial_id
    assert tags[pipeline.PBT_SEARCH_TAG] == search.name
    parent = c.get_run(tags[pipeline.PBT_SEARCH_RUN_TAG])
    assert parent.data.tags["ganflow.kind"] == "search"
    assert parent.data.tags["ganflow.best_run_id"] == best.run_id
    mlflow.set_tracking_uri(tracking_uri())
    schedule = Path(mlflow.artifacts.download_artifacts(tags[pipeline.PBT_SCHEDULE_TAG]))
    assert json.loads(schedule.read_text()) == best.schedule
    assert best.schedule[0][0] == 1
    # The retraining lineage every version carries, and the checkpoint a later warm start reads.
    for tag in ("ganflow.config_digest", "ganflow.code_digest", "ganflow.checkpoint"):
        assert tags[tag], tag
    assert tags["ganflow.checkpoint"] == best.checkpoint
    assert tags["ganflow.snapshot_id"] == row.snapshot_id
    assert tags["train_metric.val_fd"] == f"{best.metric:.6g}"

    # Promotion by the usual rule: the gate, then the champion (none yet), on the val split,
    # with the figures recorded on the version as for any candidate.
    decision = row.promotion
    assert decision.metric == "fd" and gate_failure({"fd": decision.candidate}, "fd") is None
    assert (decision.decision, decision.reason) == ("champion", "no champion yet")
    assert tags["promotion.decision"] == "champion"
    assert tags["eval.fd"] == f"{decision.candidate:.6g}"
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == version

    # The summary row says where the candidate came from.
    line = f"candidate: PBT trial {best.trial_id} of search {search.name}, no retraining"
    md = out.summary
    table_row = next(ln for ln in md.splitlines() if ln.startswith("| gan |"))
    assert line in table_row and "**champion**" in table_row
    assert f"- gan: PBT search (no champion yet); {line}; no champion yet" in md
    assert f"(PBT trial runs: {best.run_id})" in md and "training runs" not in md
    retraining = c.get_run(out.retraining_run).data.tags
    assert retraining["gan.start"] == "pbt" and retraining["gan.decision"] == "champion"

    # Nothing changed, nothing trained: the same request on the same snapshot keeps the PBT
    # champion without a search; the digest is the request's, not the trial's mutated values.
    stages.clear()
    again = pipeline.retraining_flow(str(config)).results[0]
    assert stages == ["ingest", "plan"]
    assert again.decision == "kept" and again.version == version
    assert pipeline.all_kept(PipelineConfig.load(str(config))) is not None
    # Another search mode is another config: ASHA-then-train would retrain (asha is true).
    manifest = pipeline.stage_ingest("builtin:digits")
    setups = {
        str(mode): pipeline._family_setup(
            PipelineConfig(families=("gan",), overrides={"gan": TINY_GAN}, search=mode),
            "gan",
            manifest,
        )
        for mode in ("pbt", True, "asha")
    }
    digests = {mode: setup[2] for mode, setup in setups.items()}
    assert digests["True"] == digests["asha"] != digests["pbt"] == tags["ganflow.config_digest"]
    planned = pipeline.stage_plan(MODEL, manifest.id, digests["asha"], False)
    plan = planned["plan"]
    assert (plan.action, plan.why) == ("train", "config changed")
    # ... and may start warm from the PBT champion: its recorded checkpoint is the trial's.
    start = pipeline.stage_start(plan, planned["champion"], setups["asha"][0], "auto")
    assert (start.start, start.warm_from.version) == ("warm", version), start.start_why


def test_a_search_without_a_best_trial_says_why_in_one_line():
    from flows.orchestration.retraining import no_best_why
    from flows.tune.summary import Trial

    def trial(gate=None, error=None):
        return Trial("t", {}, 1.0, 40, False, gate, error, None)

    gate = "class_accuracy 0.1 is below the gate 0.546"
    why = no_best_why([trial(gate=gate), trial(gate=gate), trial(error="OOM")])
    assert why.startswith("no trial passed the gate (2 of 3 finished below it; e.g. class_acc")
    assert "train longer" in why and "\n" not in why
    assert no_best_why([trial(error="worker died")]) == (
        "no trial completed (1 failed; e.g. worker died)"
    )

"""Ray Tune search over λ and k: space validation, a small search with its MLflow parent and
child runs, ASHA stopping clearly bad trials, and resuming a killed search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from home_cache import seed_judges
from ingest_data import search_request

from flows.tune.search import run_search
from flows.tune.space import SearchError, count_trials, default_space, validate_space
from gan_core.overrides import apply_overrides
from gan_core.presets import preset

pytestmark = pytest.mark.timeout(900)
pytest_plugins = ["s3_server"]  # moto server fixtures: moto_endpoint, s3


def test_space_validation_names_the_problem():
    base = preset("cyclegan")
    ok = validate_space(
        {"lambda_cyc": {"loguniform": [1, 50]}, "d_steps": {"choice": [1, 2, 3, 5]}}, base
    )
    assert set(ok) == {"loss.lambda_cyc", "train.d_steps"}
    with pytest.raises(SearchError, match="no_such: unknown config field"):
        validate_space({"no_such": {"grid": [1]}}, base)
    with pytest.raises(SearchError, match=r"train.d_steps: k must be an integer >= 1, got 0"):
        validate_space({"d_steps": {"grid": [0, 1]}}, base)
    with pytest.raises(SearchError, match=r"loss.lambda_cyc: must be a finite number >= 0"):
        validate_space({"lambda_cyc": {"uniform": [-1, 3]}}, base)
    with pytest.raises(SearchError, match="loguniform needs low > 0"):
        validate_space({"lambda_cyc": {"loguniform": [0, 3]}}, base)
    with pytest.raises(SearchError, match="expected one of"):
        validate_space({"lambda_cyc": [1, 2]}, base)
    assert count_trials(default_space("cyclegan"), 1) == 4
    assert count_trials(default_space("gan"), 2) == 8


def test_search_shows_the_best_trials_best_step_grid():
    from flows.tune.summary import _pick_grid

    def img(key, step, ts, ext=".png"):
        return f"images/{key}+step+{step}+timestamp+{ts}+u{step}{ext}"

    samples = [img("samples", 900, 1), img("samples", 1000, 2), img("samples", 1000, 2, ".webp")]
    best = [img("best_samples", 300, 3), img("best_samples", 300, 3, "+compressed.webp")]
    assert _pick_grid(samples + best) == best[0]
    # A trial from before best steps were kept: its last step's grid, step 1000 after 900.
    assert _pick_grid(samples) == samples[1]
    assert _pick_grid([]) is None


def test_search_table_shows_trials_that_fail_the_gate():
    from dataclasses import replace

    from flows.orchestration.reports import search_markdown
    from flows.tune.summary import BestTrial, SearchResult, Trial

    def trial(tid, fd, gate):
        return Trial(tid, {"loss.k": 1}, fd, 10, False, gate, None, None)

    reason = "class_accuracy 0.2 is below the gate 0.55 (...): the samples do not carry labels"
    trials = (trial("a", 50.0, reason), trial("b", 80.0, None))
    best = BestTrial({"loss.k": 1}, 80.0, "val_intra_fd", "min", "c", "b", "r")
    result = SearchResult("s", "p", "val_intra_fd", "min", trials, best)
    md = search_markdown(result)
    lines = md.splitlines()
    assert lines[4].endswith("| 50 | 10 | completed, fails gate |")
    assert lines[5].endswith("| 80 | 10 | completed |")
    assert f"- a: {reason}" in lines and lines[-1].startswith("Best: loss.k=1")
    md = search_markdown(replace(result, trials=trials[:1], best=None))
    assert md.splitlines()[-1] == "Best: none; no completed trial passed the gate."


def _env(home, mp):
    for k, v in {
        "GANFLOW_HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        # The cluster's processes inherit these: trials on S3 storage (the moto server of
        # s3_server) need credentials, and none may be looked up from a cloud metadata service.
        "AWS_ACCESS_KEY_ID": "tune-test-key",
        "AWS_SECRET_ACCESS_KEY": "tune-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        mp.setenv(k, v)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory, classifier_cache):
    pytest.importorskip("ray")
    from ray_isolated import isolated_cluster, use_test_env

    home = tmp_path_factory.mktemp("tune-home")
    seed_judges(home, classifier_cache)
    with pytest.MonkeyPatch.context() as mp:
        _env(home, mp)
        use_test_env(mp)
        with isolated_cluster([2]) as cluster:
            mp.setenv("RAY_ADDRESS", cluster.address)  # the resume test's CLI driver joins it
            yield home


@pytest.fixture
def home(ray_home, monkeypatch):
    monkeypatch.setenv("GANFLOW_HOME", str(ray_home))  # conftest gives each test its own
    return ray_home


@pytest.mark.slow
def test_small_cyclegan_search_with_mlflow_parent_and_children(home):
    from flows.tracking import client, tracking_uri

    base = apply_overrides(preset("cyclegan", "tiny"), {"train.steps": 20, "train.log_every": 5})
    # Two fields, two trials (one wave on the 2-CPU cluster): a one-point grid is still a
    # searched field, with its column and its params.
    space = validate_space({"lambda_cyc": {"grid": [1.0, 10.0]}, "d_steps": {"grid": [2]}}, base)
    result = run_search(
        search_request(
            "cyclegan",
            "builtin:digits-unpaired",
            base,
            space,
            scheduler="fifo",
            eval_every=10,
            name="s-small",
        ),
        progress=False,
    )
    trials = result.trials
    assert len(trials) == 2
    assert {(t.config["loss.lambda_cyc"], t.config["train.d_steps"]) for t in trials} == {
        (1.0, 2),
        (10.0, 2),
    }
    assert all(t.error is None and not t.stopped_early and t.step == 20 for t in trials)
    best = result.best
    assert best.metric == min(t.metric for t in trials)
    assert best.overrides and set(best.overrides) == {"loss.lambda_cyc", "train.d_steps"}
    apply_overrides(base, best.overrides)  # consumable by training as is
    c = client(tracking_uri())
    parent = c.search_runs(
        [c.get_experiment_by_name("ganflow-search").experiment_id],
        filter_string="tags.`ganflow.run_name` = 's-small'",
    )[0]
    children = c.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert len(children) == 2
    assert {ch.data.params["loss.lambda_cyc"] for ch in children} == {"1.0", "10.0"}
    assert {ch.data.params["train.d_steps"] for ch in children} == {"2"}
    assert all(
        f"eval.{result.metric}" in ch.data.metrics or result.metric in ch.data.metrics
        for ch in children
    )
    assert parent.data.params["best.loss.lambda_cyc"] == str(best.config["loss.lambda_cyc"])
    assert best.run_id in {ch.info.run_id for ch in children}
    # Each 1-worker trial trained in its own actor, and its run is a training run like any:
    # config, dataset, sample grids through training, the best step and its generator.
    for ch in children:
        assert ch.info.status == "FINISHED"
        assert ch.data.tags["ganflow.workers"] == "1" and "ganflow.best_step" in ch.data.tags
        assert ch.inputs.dataset_inputs, "the snapshot is the run's dataset input"
        grids = [a.path for a in c.list_artifacts(ch.info.run_id, "images")]
        assert any("best_samples" in g for g in grids) and len(grids) >= 3, grids
    assert c.search_logged_models([parent.info.experiment_id], filter_string="name = 'generator'")
    # The best trial's checkpoint is what the registry stage reads: its best step's generator.
    from flows.train.checkpoints import load_trained

    cfg, models = load_trained(best.checkpoint)
    assert cfg.loss.lambda_cyc == best.config["loss.lambda_cyc"] and set(models) == {"G", "F"}
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "metric_vs_params.png"} <= arts
    # The table the Prefect search flow records as its artifact.
    from flows.orchestration.reports import search_markdown

    md = search_markdown(result).splitlines()
    assert md[2].split(" | ")[1:3] == ["lambda_cyc", "d_steps"]
    assert sum(line.endswith("| 20 | completed |") for line in md) == 2
    assert md[-1].startswith("Best: ") and best.run_id in md[-1]


@pytest.mark.slow
def test_asha_stops_clearly_bad_trials(home):
    base = apply_overrides(
        preset("gan"), {"train.steps": 120, "train.log_every": 20, "model.hidden": 64}
    )
    # lr 1e-7 barely moves G from its initialisation: clearly bad, and ASHA should see it.
    space = validate_space({"lr_g": {"grid": [2e-4, 1e-7, 2e-4, 1e-7, 1e-7, 1e-7]}}, base)
    result = run_search(
        search_request(
            "gan",
            "builtin:digits",
            base,
            space,
            scheduler="asha",
            eval_every=20,
            grace_period=20,
            max_concurrent=2,
            name="s-asha",
        ),
        progress=False,
    )
    trials = result.trials
    assert len(trials) == 6
    stopped = [t for t in trials if t.stopped_early]
    assert stopped, [(t.config, t.metric, t.step) for t in trials]
    completed = [t for t in trials if not t.stopped_early and t.error is None]
    assert result.best.metric == min(t.metric for t in completed)
    assert all(t.config["optim.lr_g"] != 1e-7 or t.step <= 120 for t in trials)
    # In MLflow a trial ASHA stopped is KILLED (its actor may go on to the next trial), a
    # completed one FINISHED: none is left RUNNING or marked FAILED.
    from flows.tracking import RUN_NAME_TAG, client, tracking_uri

    c = client(tracking_uri())
    exp = c.get_experiment_by_name("ganflow-search").experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` LIKE 's-asha-%'")
    status = {r.data.tags[RUN_NAME_TAG].removeprefix("s-asha-"): r.info.status for r in runs}
    assert {t.trial_id: status.get(t.trial_id) for t in trials} == {
        t.trial_id: "KILLED" if t.stopped_early else "FINISHED" for t in trials
    }


@pytest.mark.slow
def test_killed_search_resumes_with_every_trial_once(home, tmp_path):
    """The driver is SIGKILLed after the first trial finishes; --resume completes the rest."""
    ray_home = home
    space = tmp_path / "space.yaml"
    space.write_text("d_steps: {grid: [1, 3]}\n")
    env = {
        **os.environ,
        "GANFLOW_HOME": str(ray_home),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "tune",
        "--family",
        "gan",
        "--name",
        "s-resume",
        "--scheduler",
        "fifo",
        "--max-concurrent",
        "1",
        "--set",
        "train.steps=40",
        "--set",
        "train.log_every=20",
        "--set",
        "model.hidden=32",
        # Two trials, one at a time: the kill comes after the first, the resume runs the
        # second (the family's default grid of 4 added two more trials of nothing new).
        "--space",
        str(space),
    ]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    state = ray_home / "ray_results" / "s-resume"
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            done = (
                [p for p in state.glob("*/result.json") if '"step": 40' in p.read_text()]
                if state.exists()
                else []
            )
            if done:
                break
            if proc.poll() is not None:
                pytest.fail(f"search ended before it could be killed (rc {proc.returncode})")
            time.sleep(1)
        else:
            pytest.fail("no trial finished in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = subprocess.run(
        [*args, "--resume", "--json"], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    trials = result["trials"]
    assert len(trials) == 2
    assert sorted(t["config"]["train.d_steps"] for t in trials) == [1, 3]
    assert len({t["trial_id"] for t in trials}) == 2
    assert all(t["error"] is None and t["step"] == 40 for t in trials)


@pytest.mark.slow
def test_gpu_search_on_a_cluster_without_gpus_fails_before_any_run(home):
    """Trials asking for GPUs the cluster can never give would wait forever: the search stops
    first, before its MLflow parent run exists."""
    from flows.tracking import client, tracking_uri
    from flows.train.spec import TrainError

    base = apply_overrides(preset("gan", "tiny"), {"train.steps": 4})
    space = validate_space({"d_steps": {"grid": [1, 2]}}, base)
    req = search_request("gan", "builtin:digits", base, space, gpus_per_worker=1, name="s-gpu")
    with pytest.raises(TrainError, match=r"needs 1 GPUs .* has 0"):
        run_search(req, progress=False)
    exp = client(tracking_uri()).get_experiment_by_name("ganflow-search")
    if exp is not None:
        runs = client(tracking_uri()).search_runs(
            [exp.experiment_id], filter_string="tags.`ganflow.run_name` = 's-gpu'"
        )
        assert runs == []


@pytest.mark.slow
def test_search_on_s3_storage_resumes_from_there(home, s3):
    """Trials, their checkpoints and the search state live in the bucket (the S3 API of a
    moto server); --resume restores the search from there with every trial once. Each trial
    is a Ray Train run on two workers (the path a 1-worker trial, trained in its own actor,
    does not take): its reports reach Tune through Train's TuneReportCallback."""
    import dataclasses

    base = apply_overrides(
        preset("gan", "tiny"), {"train.steps": 8, "train.log_every": 4, "model.hidden": 32}
    )
    space = validate_space({"d_steps": {"grid": [1, 2]}}, base)
    req = search_request(
        "gan",
        "builtin:digits",
        base,
        space,
        scheduler="fifo",
        eval_every=4,
        name="s-s3",
        storage=s3.url("ray"),
        workers_per_trial=2,
        cpus_per_worker=0.5,
    )
    first = run_search(req, progress=False)
    assert len(first.trials) == 2 and all(t.step == 8 for t in first.trials)
    # A Train run's checkpoint (the workers' files), not a Tune one.
    assert "/checkpoint-" in first.best.checkpoint, first.best.checkpoint
    assert first.best.checkpoint.startswith(f"{s3.bucket}/ray/")
    stored = s3.fs().find(f"{s3.bucket}/ray/s-s3")
    assert any("experiment_state" in k for k in stored), stored
    assert not (home / "ray_results" / "s-s3").exists()  # nothing went to local disk
    again = run_search(dataclasses.replace(req, resume=True), progress=False)
    assert sorted(t.trial_id for t in again.trials) == sorted(t.trial_id for t in first.trials)
    assert again.best.metric == first.best.metric

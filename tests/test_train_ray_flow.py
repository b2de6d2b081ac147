"""The Prefect flow behind `ganflow train --flow`: config errors stop it before the Ray
task; a run goes through Ray Train and MLflow like the plain command. About 40 s."""

from __future__ import annotations

import json

import pytest
from ray_isolated import isolated_cluster, use_test_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def prefect_and_ray(tmp_path_factory):
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    mp.delenv("PREFECT_API_URL", raising=False)
    use_test_env(mp)
    from prefect.testing.utilities import prefect_test_harness

    try:
        # The job connects through RAY_ADDRESS (the flow's task calls ray.init itself).
        with isolated_cluster([2], connect=False) as cluster:
            mp.setenv("RAY_ADDRESS", cluster.address)
            with prefect_test_harness(server_startup_timeout=60):
                yield
    finally:
        ray.shutdown()
        mp.undo()


def test_bad_override_fails_in_the_flow_before_ray(prefect_and_ray, capsys):
    import ray

    from flows.cli import main

    rc = main(["train", "--family", "gan", "--flow", "--set", "d_steps=0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "train.d_steps" in err, err
    assert not ray.is_initialized()


def test_cli_trains_through_the_flow(prefect_and_ray, capsys):
    from flows.cli import main
    from flows.tracking import client, tracking_uri

    rc = main(
        [
            "train",
            "--family",
            "cgan",
            "--dataset",
            "builtin:digits",
            "--flow",
            "--cpus-per-worker",
            "0.9",
            "--set",
            "train.steps=4",
            "--set",
            "train.log_every=2",
            "--set",
            "train.batch_size=8",
            "--set",
            "model.hidden=32",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 4
    assert "class_accuracy" in out["metrics"] and "fd" in out["metrics"]
    run = client(tracking_uri()).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as pc:
        [art] = pc.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ganflow-train-cgan"]))
        )
    assert f"`{out['run_id']}`" in art.data and "| class_accuracy |" in art.data
    assert run.data.params["train.steps"] == "4"

"""The Prefect flow behind `ganflow train --flow` (and what deployments schedule).

Two tasks: ``build-config`` resolves the dataset into a snapshot and validates the config on
it (bad ``--set`` values fail here, before any cluster work), ``train-on-ray`` runs :func:`flows.train.driver.run_training`. The run name
is fixed before the training task starts, so Prefect's task retry reruns the same Ray run
name and resumes from its latest checkpoint instead of starting over (Ray Train's own
FailureConfig handles worker and node failures inside one attempt; the retry covers a
driver that died). Ray is called from inside the task, not through a Ray task runner
(prefect-ray would start a new Ray cluster for every flow run).
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.orchestration.inputs import config_and_snapshot
from flows.orchestration.reports import artifact_key, train_markdown
from flows.tracking import redact, tracking_uri
from flows.train.driver import default_run_name, run_training
from flows.train.options import check_options, train_request
from flows.train.spec import TrainRequest, TrainResult


@task(name="build-config")
def build_config_task(
    family: str, config_file: str | None, overrides: list[str], dataset: str | None
):
    return config_and_snapshot(family, config_file, overrides, dataset)


@task(name="train-on-ray", retries=1, retry_delay_seconds=5)
def train_task(req: TrainRequest) -> TrainResult:
    return run_training(req)


@flow(name="ganflow-train", validate_parameters=True)
def train_flow(
    family: str,
    dataset: str | None = None,
    overrides: list[str] | None = None,
    config_file: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    threads: int = 1,
    storage: str | None = None,
    s3_endpoint_url: str | None = None,
    run_name: str | None = None,
    checkpoint_every: int | None = None,
    max_failures: int = 3,
) -> TrainResult:
    """Train one family on one snapshot as a Ray Train job, tracked in MLflow."""
    # The parameters are exactly the declared options (tests/test_options.py), so they go on
    # to the request as one mapping; this must stay the first statement.
    values = dict(locals())
    # A deployment run with a bad parameter fails here, in one line, before the dataset is
    # resolved (an ingest) or Ray starts, as `ganflow train` does.
    check_options(values)
    overrides = list(overrides or [])
    cfg, manifest = build_config_task(family, config_file, overrides, dataset)
    # Fixed before the task starts: a retried task resumes this Ray run, not a new one.
    req = train_request(cfg, manifest, {**values, "run_name": run_name or default_run_name(cfg)})
    result = train_task(req)
    create_markdown_artifact(
        train_markdown(result, redact(tracking_uri())),
        key=artifact_key("ganflow-train", result.family),
        description="the training run: held-out metrics, MLflow run and checkpoint",
    )
    return result

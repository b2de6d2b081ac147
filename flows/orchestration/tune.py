"""The search as a Prefect flow (the on-demand deployment)."""

from __future__ import annotations

from prefect import flow

from flows.tune.search import SearchRequest, run_search
from flows.tune.space import default_space, validate_space
from flows.tune.summary import SearchResult


@flow(name="ganflow-search", persist_result=False, log_prints=False)
def tune_flow(
    family: str = "cyclegan", dataset: str = "builtin:digits-unpaired", samples: int = 8
) -> SearchResult:
    """The search as a Prefect flow (the on-demand deployment): default space, ASHA."""
    from prefect.artifacts import create_markdown_artifact

    from flows.orchestration.inputs import config_and_snapshot
    from flows.orchestration.reports import artifact_key, search_markdown

    base, manifest = config_and_snapshot(family, None, [], dataset)
    space = validate_space(default_space(family), base)
    result = run_search(
        SearchRequest(family=family, manifest=manifest, base=base, space=space, samples=samples),
        progress=False,
    )
    create_markdown_artifact(
        search_markdown(result),
        key=artifact_key("ganflow-search", family),
        description="every trial's configuration, metric and status, and the best",
    )
    return result

"""The Prefect flow behind `ganflow ingest`: same result as the plain pipeline, and failures
surface as one line on the command line, not as Prefect's logged traceback."""

from __future__ import annotations

import json

import pytest
from ingest_data import make_layout


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server for the module (starting one costs about 10 s). Not for the
    session: the harness's API URL would stay set for every later test in the process (a
    test that needs no Prefect server configured then found one)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    mp.delenv("PREFECT_API_URL", raising=False)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
    mp.undo()


def test_flow_matches_plain_pipeline_and_is_idempotent(prefect_harness, tmp_path):
    from flows.ingest.runner import ingest
    from flows.orchestration.ingest import run_flow

    folder, _, _ = make_layout("classes", tmp_path / "raw")
    r = run_flow(str(folder), root=str(tmp_path / "store"), name="digits")
    plain = ingest(str(folder), root=str(tmp_path / "plain"))
    assert r.id == plain.id and not r.reused
    again = run_flow(str(folder), root=str(tmp_path / "store"), name="digits")
    assert again.id == r.id and again.reused
    assert r.image_size == 8 and set(r.split_counts) == {"train", "val", "test"}
    # Each run leaves the snapshot summary as a Prefect artifact (newest first).
    [new, old] = _artifacts("ganflow-ingest-digits")[:2]
    assert f"`{r.id}`" in new.data and "reused" in new.data and "(new)" in old.data
    for group, n in r.counts.items():
        assert f"| {group} |" in new.data and f"| {n} |" in new.data


def test_flow_passes_every_option(prefect_harness, tmp_path):
    """The flow's parameters carry each IngestOptions field: same id as the plain pipeline."""
    from flows.ingest.runner import ingest
    from flows.ingest.stages import IngestOptions
    from flows.orchestration.ingest import run_flow

    folder, _, _ = make_layout("classes", tmp_path / "raw")
    o = IngestOptions(image_size=12, resize_mode="stretch", val_fraction=0.0, test_fraction=0.3)
    r = run_flow(str(folder), root=str(tmp_path / "store"), options=o)
    assert r.id == ingest(str(folder), root=str(tmp_path / "plain"), options=o).id
    assert r.image_size == 12 and r.split_counts["val"] == {}


def _artifacts(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as pc:
        return pc.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
        )


def test_quarantine_report_is_in_the_artifact(prefect_harness, tmp_path):
    from flows.orchestration.ingest import run_flow

    folder, _, _ = make_layout("flat", tmp_path / "raw")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r = run_flow(str(folder), root=str(tmp_path / "store"), name="with-bad")
    assert [q.path for q in r.quarantined] == ["broken.png"]
    md = _artifacts("ganflow-ingest-with-bad")[0].data
    assert "Quarantined: 1 file(s)" in md and "| broken.png |" in md


def test_cli_through_the_flow(prefect_harness, tmp_path, capsys):
    from flows.cli import main

    folder, _, _ = make_layout("flat", tmp_path / "raw")
    root = str(tmp_path / "store")
    assert main(["ingest", str(folder), "--root", root, "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["num_images"] == 30 and out["quarantined"] == []
    assert main(["ingest", str(tmp_path / "missing"), "--root", root]) == 2
    err = capsys.readouterr().err
    assert "source not found" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

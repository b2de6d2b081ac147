"""The dataset watcher's decisions without services (issue 21): when a listing becomes one
event, which families a source's event retrains, and a failed family's row."""

from __future__ import annotations

import yaml

from flows.orchestration.retraining import PipelineConfig, for_source, summary_markdown
from flows.orchestration.watch import Record, list_source, source_id, sources_of, step


def test_one_event_per_burst_after_the_quiet_period():
    quiet = 10.0
    rec, emit = step(None, "a", 0, quiet)  # first sight: the baseline, no event
    assert rec == Record(emitted="a") and not emit
    assert step(rec, "a", 100, quiet) == (rec, False)  # unchanged: nothing, ever
    events, t = 0, 100.0
    for i in range(50):  # a burst: every poll sees a new listing
        t += 1
        rec, emit = step(rec, f"burst-{i}", t, quiet)
        events += emit
    assert events == 0 and rec.pending == "burst-49"
    rec, emit = step(rec, "burst-49", t + quiet - 1, quiet)
    assert not emit  # not quiet long enough yet
    rec, emit = step(rec, "burst-49", t + quiet, quiet)
    assert emit and rec == Record(emitted="burst-49")
    assert step(rec, "burst-49", t + 1000, quiet) == (rec, False)
    # Changed and changed back before the quiet period ended: nothing to retrain.
    rec2, _ = step(rec, "x", 0, quiet)
    assert step(rec2, "burst-49", 1, quiet) == (Record(emitted="burst-49"), False)


def test_the_listing_fingerprint_follows_paths_and_sizes(tmp_path):
    (tmp_path / "a.png").write_bytes(b"1234")
    first = list_source(str(tmp_path))
    assert list_source(str(tmp_path)) == first and (first.files, first.bytes) == (1, 4)
    (tmp_path / "b.png").write_bytes(b"56")
    assert list_source(str(tmp_path)).fingerprint != first.fingerprint


def test_a_source_event_retrains_the_families_that_use_it(tmp_path):
    cfg = tmp_path / "p.yaml"
    folder = tmp_path / "photos"
    cfg.write_text(
        yaml.safe_dump(
            {
                "families": ["gan", "cgan", "cyclegan"],
                "datasets": {
                    "gan": f"{folder}/",
                    "cgan": f"file://{folder}",
                    "cyclegan": "s3://b/x",
                },
            }
        )
    )
    pc = PipelineConfig.load(str(cfg))
    assert for_source(pc, str(folder)).families == ("gan", "cgan")
    assert for_source(pc, "s3://b/x/").families == ("cyclegan",)
    assert for_source(pc, "s3://b/other") is None
    assert sources_of(None, str(cfg)) == {
        source_id(str(folder)): ["gan", "cgan"],
        "s3://b/x": ["cyclegan"],
    }
    # Built-ins never change: nothing to watch in the default pipeline.
    assert for_source(PipelineConfig(), "builtin:digits") is None


def test_a_failed_family_has_its_row_and_its_reason():
    from flows.orchestration.retraining import FamilyOutcome

    ok = FamilyOutcome("gan", "s1", "m", "champion v1 already trained", "kept", version="1")
    why = "ingest: IngestError: bad"
    failed = FamilyOutcome("cgan", "-", "-", why, "failed", error_stage="ingest")
    md = summary_markdown([ok, failed], "sqlite:///x")
    assert "| cgan | - | **failed** (ingest) |" in md
    assert "- cgan: failed at ingest: IngestError: bad" in md
    assert "| gan | m | **kept** |" in md


def test_schedule_watch_builds_the_trigger_and_the_watcher(tmp_path):
    from flows.cli.run import retrain_trigger
    from flows.orchestration.retraining import retraining_flow
    from flows.orchestration.watch import EVENT, watch_flow

    trig = retrain_trigger("t", ["/data/photos", "s3://b/x"])
    dep = retraining_flow.to_deployment(name="r", cron="0 3 * * 1", triggers=[trig])
    (t,) = dep.triggers
    assert t.expect == {EVENT} and t.parameters == {"source": "{{ event.resource.id }}"}
    assert t.match.root["prefect.resource.id"] == ["/data/photos", "s3://b/x"]
    assert watch_flow.to_deployment(name="w", interval=60).schedules


def test_watch_needs_a_prefect_server(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["watch", str(tmp_path), "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set PREFECT_API_URL" in err[0]

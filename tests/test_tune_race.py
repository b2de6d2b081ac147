"""Tune trials that start together log the same snapshot as their dataset input into one
SQLite MLflow store at the same moment (issue 22, item 5).

MLflow's store reads "is this dataset in the experiment?" and inserts it if not, in two
statements: two trials can both read "absent", and the second insert breaks the datasets
table's (experiment, name, digest) key (``sqlite3.IntegrityError: UNIQUE constraint failed:
datasets...``, seen in a fresh-clone CI run of the search test). The test runs the trials'
own code path, ``flows.tracking.log_dataset_input``, from 4 processes released together by a
barrier, each into its own run of one experiment, over several rounds (a new snapshot each
round, so each round is a fresh race)."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from pathlib import Path

import pytest

WORKERS = 4
ROUNDS = 8


def _snapshot_id(i: int) -> str:
    return f"snap-{i:04d}-0123456789abcdef"


def _trial(uri: str, run_id: str, barrier, out: str) -> None:
    """One trial's process: a warmed-up client (the import and the engine cost seconds, which
    would spread the starts out), then each round released with the others. Failures go to
    its own file ``out`` (a queue's pipe fills with tracebacks and blocks the exit)."""
    errors: list[str] = []
    try:
        _rounds(uri, run_id, barrier, errors)
    finally:
        Path(out).write_text("\n=====\n".join(errors))


def _rounds(uri: str, run_id: str, barrier, errors: list[str]) -> None:
    try:
        from flows import tracking

        tracking.client(uri).get_run(run_id)
        import mlflow.data.code_dataset_source  # noqa: F401
        import mlflow.data.meta_dataset  # noqa: F401
    except Exception:
        errors.append(traceback.format_exc())
        barrier.abort()
        return
    for i in range(ROUNDS):
        try:
            barrier.wait(timeout=600)
        except Exception:
            return
        try:
            tracking.log_dataset_input(uri, run_id, _snapshot_id(i), "digits", "file:///snapshots")
        except Exception:
            errors.append(traceback.format_exc())


@pytest.mark.slow  # 4 spawned processes importing MLflow: 30-250 s on 2 loaded cores
@pytest.mark.timeout(900)
def test_trials_starting_together_log_the_same_dataset_once(tmp_path):
    from flows import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "ganflow-search")
    runs = [
        tracking.find_or_create_run(uri, exp, f"trial-{k}", {"ganflow.kind": "trial"})
        for k in range(WORKERS)
    ]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    outs = [tmp_path / f"errors-{k}.txt" for k in range(WORKERS)]
    procs = [ctx.Process(target=_trial, args=(uri, r, barrier, str(o))) for r, o in zip(runs, outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=800)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = [e for o in outs if o.exists() for e in o.read_text().split("\n=====\n") if e]
    assert not failures, f"{len(failures)} of {WORKERS * ROUNDS} logs failed:\n" + failures[0]
    assert not alive, f"trial processes did not finish: {alive}"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    c = tracking.client(uri)
    want = {_snapshot_id(i) for i in range(ROUNDS)}
    for r in runs:
        got = [d.dataset.digest for d in c.get_run(r).inputs.dataset_inputs]
        assert sorted(got) == sorted(want), r  # every snapshot linked to every run, once

"""The console of a default `ganflow train` run holds ganflow's lines only (issue 23).

A first run on a fresh machine is the noisiest: HOME is an empty folder here, so Ray starts
a local cluster with token authentication on by default (its warning), matplotlib builds its
font cache inside the worker ("generated new fontManager"), and Ray Train's controller adds
its C++ `core_worker.cc ... PreemptionWatcher` line. The command runs as a subprocess, so
lines written straight to file descriptor 2 (C++ logging) are counted too; a line that is
not ganflow's is counted whatever printed it. About 40 s on 2 cores (Ray's start and the
worker's start dominate).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from home_cache import seed_judges

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent
# What `ganflow train` itself prints: its progress and pointers on stderr, two result lines
# on stdout (flows/cli/train.py).
STDERR_OURS = re.compile(r"^\[ganflow\] ")
STDOUT_OURS = re.compile(r"^(run \S+ \(MLflow run [0-9a-f]+\): |checkpoint: )")


def test_a_default_train_run_prints_only_ganflow_lines(tmp_path, classifier_cache):
    home = tmp_path / "ganflow-home"
    seed_judges(home, classifier_cache)
    user_home = tmp_path / "user-home"  # no ~/.ray token, no matplotlib cache: a first run
    user_home.mkdir()
    # What `make run` sets, and nothing a test module left behind (a cluster's address,
    # RAY_AUTH_MODE, tracking URIs, logging levels).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "MLFLOW_", "PREFECT_", "GANFLOW_", "MPLCONFIGDIR"))
    }
    env.update(
        HOME=str(user_home),
        GANFLOW_HOME=str(home),
        RAY_USAGE_STATS_ENABLED="0",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    argv = ["train", "--family", "gan", "--set", "train.steps=4", "--set", "train.log_every=2"]
    out = subprocess.run(
        [str(BIN / "ganflow"), *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    err = [line for line in out.stderr.splitlines() if line.strip()]
    std = [line for line in out.stdout.splitlines() if line.strip()]
    foreign = [f"stderr: {x}" for x in err if not STDERR_OURS.match(x)]
    foreign += [f"stdout: {x}" for x in std if not STDOUT_OURS.match(x)]
    print("console:", *err, *std, sep="\n")
    assert len(foreign) == 0, "\n".join(foreign)
    assert any("iteration 4/4" in x for x in err), err  # the workers' own lines still come
    assert len(std) == 2
    # Routed, not lost: the token warning is in the log file the last line points to, the
    # worker's font-cache line in Ray's session logs.
    [pointer] = [x for x in err if x.startswith("[ganflow] library logs: ")]
    log_file, ray_logs = re.match(
        r"\[ganflow\] library logs: (\S+); Ray worker logs: (\S+) ", pointer
    ).groups()
    assert "Token authentication is enabled" in Path(log_file).read_text()
    session = [p.read_text(errors="replace") for p in Path(ray_logs).glob("worker-*.err")]
    assert any("generated new fontManager" in text for text in session)


def test_local_progress_goes_to_the_stderr_of_the_moment(monkeypatch):
    """`ganflow local`'s progress lines go to sys.stderr as it is when each line is printed.
    Bound at import as a default argument, they went to whatever stream was current then: in
    a pytest worker, an earlier test's capture, closed since ('I/O operation on closed file')."""
    import io
    from types import SimpleNamespace

    from flows.train.local import _progress

    cb = _progress("gan", 4)
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    cb(SimpleNamespace(step=2), {"loss_D": 1.25, "loss_G": 0.5})
    assert now.getvalue().startswith("[gan] step 2/4 loss_D=1.250 loss_G=0.500 ("), now.getvalue()

"""Shared test setup. Every test runs with its own GANFLOW_HOME so nothing leaks into the
working tree; services (Ray, MLflow, S3, Prefect) are started by the tests that need them."""

from __future__ import annotations

import pytest
import torch

# One intra-op thread: with Ray workers or other processes beside on 2 cores, OpenMP
# oversubscription slowed training 10-30x here (measured), and results stay bit-stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GANFLOW_HOME", str(tmp_path / "ganflow-home"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    yield


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    """One trained digits classifier per session (it takes seconds, and is deterministic)."""
    return tmp_path_factory.mktemp("classifier-cache")

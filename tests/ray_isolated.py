"""A Ray cluster of its own for a test module, safe beside other Ray instances on the machine.

Ray Train's helper actors (the PlacementGroupCleaner) query the state API without an
address; with two Ray instances on one machine (two test runs at once on a shared box) that
raises "Found multiple active Ray instances", the cleaner dies, and placement groups leak
until later jobs wait forever for CPUs (seen here). So the cluster is started with a known
GCS port and RAY_ADDRESS set in its raylets' environment, which every worker inherits.
``ray.cluster_utils.Cluster`` also stops only its own processes (never `ray stop`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

RAY_TEST_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # Ray Train's controller takes one report per worker per interval (default 2 s).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def use_test_env(mp) -> None:
    """Set RAY_TEST_ENV through a pytest MonkeyPatch (undone with it)."""
    for k, v in RAY_TEST_ENV.items():
        mp.setenv(k, v)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def isolated_cluster(cpus_per_node: list[float], connect: bool = True) -> Iterator[object]:
    """Start nodes with the given CPUs (the first is the head); yields the Cluster. With
    connect, this process is connected (ray.init) until the end."""
    import ray
    from ray.cluster_utils import Cluster

    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    env = {"RAY_ADDRESS": address}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": cpus_per_node[0],
            "gcs_server_port": port,
            "dashboard_port": _free_port(),
            "env_vars": env,
        },
    )
    try:
        for cpus in cpus_per_node[1:]:
            cluster.add_node(num_cpus=cpus, env_vars=env)
        cluster.wait_for_nodes()
        if connect:
            ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextlib.contextmanager
def embedded_pipeline(home, judges=None) -> Iterator[object]:
    """What `make run` uses, for a test module: GANFLOW_HOME at home, Prefect's ephemeral
    server under it (no telemetry), MLflow on its SQLite default, and a 2-CPU Ray cluster of
    its own. ``judges``: conftest's classifier_cache, copied into home's cache. Yields home."""
    import pytest

    if judges is not None:
        from home_cache import seed_judges

        seed_judges(home, judges)

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "GANFLOW_HOME": str(home),
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
            **RAY_TEST_ENV,
        }.items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("PREFECT_API_URL", raising=False)
        with isolated_cluster([2]):
            yield home

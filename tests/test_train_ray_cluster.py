"""A simulated 2-node Ray cluster (ray.cluster_utils.Cluster): `ganflow train`'s driver
connects through RAY_ADDRESS and its 2 workers land one on each node (1 CPU per node, 0.9
per worker). About 40 s on 2 shared cores."""

from __future__ import annotations

import pytest
from ray_isolated import isolated_cluster, use_test_env

from flows.ingest.resolve import ensure_snapshot
from flows.train.driver import run_training
from flows.train.spec import ClusterSpec, TrainRequest
from gan_core.overrides import apply_overrides
from gan_core.presets import preset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def two_nodes():
    pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        use_test_env(mp)
        with isolated_cluster([1, 1], connect=False) as cluster:
            yield cluster


def test_job_spreads_over_two_nodes_through_ray_address(two_nodes, monkeypatch, classifier_cache):
    import ray

    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", two_nodes.address)  # the driver connects, starts nothing
    cfg = apply_overrides(preset("gan", "tiny"), ["train.steps=10", "train.log_every=5"])
    out = run_training(
        TrainRequest(
            cfg=cfg,
            manifest=ensure_snapshot(cfg.data.dataset, image_size=cfg.data.image_size),
            cluster=ClusterSpec(workers=2, cpus_per_worker=0.9),
            tracking=False,
            cache_dir=str(classifier_cache),
        )
    )
    assert len(ray.nodes()) == 2
    assert out.steps == 10
    assert out.metrics["ray_workers"] == 2
    assert out.metrics["ray_nodes"] == 2

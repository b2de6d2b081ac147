"""Typed values across the two Ray boundaries: the WorkerJob every Ray Train worker is handed
(the train_loop_config) and the TrialContext every Tune trial is handed (under "__ganflow" in
its config). Each crosses as primitives and comes back exactly; a trial's hyperparameters
never include the context; a search saved with the context dict older versions wrote still
resumes."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest

from flows.train.spec import FaultInjection, WorkerJob
from flows.tune.request import (
    CONTEXT_KEY,
    TrialContext,
    split_trial_config,
    trial_params,
)
from gan_core.config import GanConfig
from gan_core.overrides import apply_overrides
from gan_core.presets import preset


def _cfg() -> GanConfig:
    """Far from the defaults in every section, floats that print long included."""
    cfg = apply_overrides(
        preset("cyclegan"),
        {
            "data.image_size": 32,
            "data.augment": "jitter_flip",
            "model.n_res_blocks": 2,
            "model.sync_batchnorm": False,
            "loss.lambda_cyc": 3.25,
            "loss.lambda_id": 0.1 + 0.2,  # 0.30000000000000004: exact, not rounded
            "augment.policy": "color,translation",
            "augment.ada": True,
            "optim.lr_g": 1.234567891e-4,
            "optim.decay_start": 0.5,
            "train.d_steps": 3,
            "train.seed": 17,
            "train.precision": "bf16",
            "eval.every": 40,
        },
    )
    assert cfg != preset("cyclegan")
    return cfg


def _primitives(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _primitives(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_primitives(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def _job(**kw) -> WorkerJob:
    return WorkerJob(
        config=_cfg(),
        snapshot_id="snap-1",
        snapshot_root="/data/snapshots",
        cache_dir="/data/cache",
        tracking_uri="http://mlflow:5000",
        run_id="r1",
        checkpoint_every=40,
        sample_every=80,
        threads=2,
        check_replicas=True,
        warm_start="bucket/runs/champion/checkpoint_000003",
        **kw,
    )


@pytest.mark.parametrize("fault", [None, FaultInjection(rank=1, step=20, marker="/tmp/m")])
def test_worker_job_round_trips_exactly(fault):
    job = _job(fault=fault)
    wire = job.to_wire()
    assert _primitives(wire)  # what Ray Train V2 also exports as the run's settings (JSON)
    assert WorkerJob.from_wire(wire) == job
    assert WorkerJob.from_wire(json.loads(json.dumps(wire))) == job
    # Ray pickles train_loop_config to the workers; the typed job pickles as well.
    assert WorkerJob.from_wire(pickle.loads(pickle.dumps(wire))) == job
    assert pickle.loads(pickle.dumps(job)) == job
    assert isinstance(WorkerJob.from_wire(wire).config, GanConfig)


def _ctx(threads: int = 1) -> TrialContext:
    return TrialContext(
        base=_cfg(),
        snapshot_id="snap-1",
        search_name="search-cyclegan-1",
        workers=2,
        gpus_per_worker=0.5,
        cpus_per_worker=0.9,
        storage="s3://bucket/ray",
        tracking=True,
        parent_run_id="parent-1",
        env={"GANFLOW_HOME": "/home/g", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        experiment="ganflow-search",
        snapshot_root="/data/snapshots",
        cache_dir="/data/cache",
        threads=threads,
    )


def _legacy_wire(ctx: TrialContext) -> dict:
    """The context dict as run_search wrote it before TrialContext existed."""
    return {
        "base": ctx.base.to_flat_dict(),
        "snapshot_id": ctx.snapshot_id,
        "search": ctx.search_name,
        "workers": ctx.workers,
        "gpus": ctx.gpus_per_worker,
        "cpus": ctx.cpus_per_worker,
        "storage": ctx.storage,
        "tracking": ctx.tracking,
        "parent_run_id": ctx.parent_run_id,
        "env": dict(ctx.env),
        "experiment": ctx.experiment,
        "snapshot_root": ctx.snapshot_root,
        "cache_dir": ctx.cache_dir,
    }


@pytest.mark.parametrize("threads", [1, 3])
def test_trial_context_round_trips_exactly(threads):
    ctx = _ctx(threads)
    wire = ctx.to_wire()
    assert _primitives(wire)
    assert TrialContext.from_wire(wire) == ctx
    assert TrialContext.from_wire(json.loads(json.dumps(wire))) == ctx
    assert TrialContext.from_wire(pickle.loads(pickle.dumps(wire))) == ctx
    assert pickle.loads(pickle.dumps(ctx)) == ctx


def test_trial_context_reads_and_writes_the_legacy_dict():
    """The wire is the dict older versions saved, key for key, so their trials' configs read
    back and Tune's resume check (the param space's flattened keys) passes."""
    from ray.tune.utils import flatten_dict

    ctx = _ctx()
    legacy = _legacy_wire(ctx)
    assert ctx.to_wire() == legacy
    assert TrialContext.from_wire(legacy) == ctx
    space = {"loss.lambda_cyc": [1.0, 3.0]}
    old_keys = sorted(flatten_dict({**space, CONTEXT_KEY: legacy}))
    assert sorted(flatten_dict(ctx.param_space(space))) == old_keys
    # Only a context that asks for other than 1 thread carries the key.
    assert ctx.to_wire().keys() | {"threads"} == _ctx(3).to_wire().keys()


def test_a_trials_hyperparameters_exclude_the_context():
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    from flows.tune.space import to_tune_space

    ctx = _ctx()
    space = {"loss.lambda_cyc": {"grid": [1.0, 30.0]}, "train.d_steps": {"choice": [1, 2]}}
    param_space = ctx.param_space(to_tune_space(space))
    assert isinstance(param_space["loss.lambda_cyc"], dict)  # a grid_search spec
    assert isinstance(param_space["train.d_steps"], tune.search.sample.Categorical)
    configs = [config for _, config in generate_variants(param_space)]
    assert len(configs) == 2
    for config in configs:
        got, params = split_trial_config(config)
        assert got == ctx
        assert set(params) == set(space) == set(trial_params(config))
        cfg = got.trial_config(params)
        assert (cfg.loss.lambda_cyc, cfg.train.d_steps) == (
            params["loss.lambda_cyc"],
            params["train.d_steps"],
        )
        assert cfg.optim.lr_g == ctx.base.optim.lr_g  # everything else is the base's


def test_the_summary_reports_hyperparameters_without_the_context():
    from flows.settings import ganflow_home
    from flows.tune.summary import _summarise

    wire = _ctx().to_wire()
    grid = [
        SimpleNamespace(
            config={"loss.lambda_cyc": lam, CONTEXT_KEY: wire},
            metrics={"val_fd": fd, "step": 10, "trial_id": tid},
            error=None,
            checkpoint=None,
        )
        for tid, lam, fd in (("a", 1.0, 5.0), ("b", 3.0, 2.0))
    ]
    result = _summarise(None, "s", grid, "val_fd", "min", 10, None, None, "path")
    assert [dict(t.config) for t in result.trials] == [
        {"loss.lambda_cyc": 1.0},
        {"loss.lambda_cyc": 3.0},
    ]
    assert result.best.overrides == {"loss.lambda_cyc": 3.0}
    saved = (ganflow_home() / "searches" / "s" / "result.json").read_text()
    assert CONTEXT_KEY not in saved and "snapshot_root" not in saved


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_search_saved_with_the_legacy_context_resumes(tmp_path):
    """A Tune run whose param space holds the dict older versions wrote, with one trial that
    failed, restores with the param space this version builds (Tune checks the keys) and
    reruns that trial from its saved config."""
    from ray import tune
    from ray_isolated import isolated_cluster, use_test_env

    marker = tmp_path / "failed-once"

    def trainable(config):
        ctx, params = split_trial_config(config)
        cfg = ctx.trial_config(params)
        if cfg.train.d_steps == 2 and not marker.exists():
            marker.write_text("x")
            raise RuntimeError("first attempt dies")
        tune.report(
            {"d_steps": cfg.train.d_steps, "n_params": len(params), "search": ctx.search_name}
        )

    ctx = _ctx()
    space = {"train.d_steps": tune.grid_search([1, 2])}
    run_config = tune.RunConfig(name="legacy", storage_path=str(tmp_path / "ray"), verbose=0)
    with pytest.MonkeyPatch.context() as mp:
        use_test_env(mp)
        with isolated_cluster([1]):
            first = tune.Tuner(
                trainable,
                param_space={**space, CONTEXT_KEY: _legacy_wire(ctx)},
                tune_config=tune.TuneConfig(max_concurrent_trials=1),
                run_config=run_config,
            ).fit()
            assert sorted(r.error is None for r in first) == [False, True]
            path = str(tmp_path / "ray" / "legacy")
            with pytest.raises(ValueError, match="Invalid `param_space`"):
                # A key the saved search lacks is refused: why threads=1 is left off the wire.
                tune.Tuner.restore(path, trainable, param_space=_ctx(3).param_space(space))
            again = tune.Tuner.restore(
                path, trainable, resume_errored=True, param_space=ctx.param_space(space)
            ).fit()
    assert all(r.error is None for r in again)
    metrics = sorted(
        (r.metrics["d_steps"], r.metrics["n_params"], r.metrics["search"]) for r in again
    )
    assert metrics == [(1, 1, ctx.search_name), (2, 1, ctx.search_name)]

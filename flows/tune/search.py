"""Hyperparameter search with Ray Tune over λ (``lambda_cyc``) and k (``d_steps``), and any
other config field, at cluster scale.

A trial is the training stage's run. On one worker (the default) it trains in the trial's
own Tune actor, the same loop, checkpoints and MLflow run as a Train run's rank 0, reporting
to Tune directly (flows.train.driver.train_in_trial): no Train controller, worker group or
placement group per trial. On several workers it is a Ray Train run (Ray Train V2: the Tune
function builds one TorchTrainer and forwards its reports with ``TuneReportCallback``), so
a trial can itself span several GPU workers. Trials report the family's primary quality
metric on val every ``eval.every`` iterations (the training config's one evaluation
interval: the search's ``eval_every`` sets it in every trial's config); ASHA stops poor
trials early. A trial's final figure is its best step's, the generator its run registers.
MLflow gets one parent run for the search and one child run per trial; the parent records
the best trial's config, metric and checkpoint, a metric-vs-(λ, k) picture and the best
trial's sample grid. The best configuration comes back as config overrides
that ``ganflow train --set``/``--config`` and the retraining flow take as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import uuid

from flows.settings import forwarded_env, ray_storage

# SearchRequest is asked of run_search: callers import it from here (it is defined in
# flows.tune.request, which the PBT trial and the summary read without importing this module).
from flows.tune.request import SearchRequest, TrialContext, split_trial_config
from flows.tune.space import PBT_SCHEDULERS, SearchError, to_tune_space
from flows.tune.summary import SearchResult, _summarise
from gan_core.evaluate import primary_metric
from gan_core.overrides import apply_overrides

EXPERIMENT = "ganflow-search"


class _ReapOrphanedPlacementGroups:
    """Tune callback (driver side): free the CPUs/GPUs of Ray Train runs whose trial Tune
    stopped (ASHA) or finished.

    Tune stops a trial by killing its actor while the TorchTrainer inside may still hold its
    workers' placement group. Ray's own PlacementGroupCleaner is meant to free it, but on a
    loaded 2-core machine it did not within 10 minutes (seen: 1.8 of 2 CPUs reserved by
    finished trials, every later trial pending). A placement group of this job with real
    resources, no live actor in it and older than ``min_age_s`` (well past any worker start)
    is orphaned: remove it."""

    def __init__(self, min_age_s: float = 120.0, every_s: float = 15.0):
        self.min_age_s, self.every_s, self._last = min_age_s, every_s, 0.0

    def reap(self) -> int:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group
        from ray.util.state import list_actors, list_placement_groups

        ctx = ray.get_runtime_context()
        # This job's cluster by its address: without one, the state API looks for "the" Ray
        # instance on the machine, and a second one (another ganflow job) makes that fail.
        job, address = ctx.get_job_id(), ctx.gcs_address
        try:
            alive = list_actors(
                address=address, detail=True, filters=[("state", "=", "ALIVE")], limit=10000
            )
            in_use = {a.placement_group_id for a in alive if a.placement_group_id}
            pgs = list_placement_groups(
                address=address, detail=True, filters=[("state", "=", "CREATED")], limit=10000
            )
        except Exception:  # the state API is best effort here; try again at the next event
            return 0
        now_ns = time.time_ns()
        removed = 0
        for pg in pgs:
            units = [b["unit_resources"] for b in pg.bundles]
            heavy = any(u.get("CPU", 0) >= 0.5 or u.get("GPU", 0) > 0 for u in units)
            created = int(pg.stats.get("creation_request_received_ns", now_ns))
            old = (now_ns - created) / 1e9 > self.min_age_s
            if pg.creator_job_id == job and heavy and old and pg.placement_group_id not in in_use:
                pg_id = ray.PlacementGroupID(bytes.fromhex(pg.placement_group_id))
                remove_placement_group(PlacementGroup(pg_id))
                removed += 1
        return removed

    def maybe_reap(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last > self.every_s:
            self._last = time.monotonic()
            self.reap()


def _reaper_callback():
    from ray import tune

    class Reaper(tune.Callback):
        def __init__(self):
            self.reaper = _ReapOrphanedPlacementGroups()

        def on_step_end(self, iteration, trials, **info):
            self.reaper.maybe_reap()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.reaper.maybe_reap(force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.reaper.maybe_reap(force=True)

    return Reaper()


def _trial(config: dict) -> None:
    """One Tune trial: the training stage's run. A 1-worker trial trains in this actor
    (flows.train.driver.train_in_trial); a trial on several workers is a Ray Train run whose
    reports Tune gets through ``TuneReportCallback``."""
    from ray import tune

    from flows.snapshots.load import resolve_snapshot
    from flows.train.driver import run_training, train_in_trial
    from flows.train.spec import StorageSpec, TrainRequest

    ctx, params = split_trial_config(config)
    # The driver's view of where things live (no secrets), so a trial on any node reads the
    # same snapshot store and writes the same MLflow/Ray storage as the driver.
    os.environ.update(ctx.env)
    cfg = ctx.trial_config(params)
    trial_name = ctx.run_name(tune.get_context().get_trial_id())
    # Read by id (an id names one content, whenever it is read), from the root the driver's
    # environment names: the trial's config carries the id, not the manifest, whose file
    # list would be copied into every trial's saved state.
    manifest = resolve_snapshot(ctx.snapshot_id)
    req = TrainRequest(
        cfg=cfg,
        manifest=manifest,
        cluster=ctx.cluster(),
        storage=StorageSpec(url=ctx.storage),
        run_name=trial_name,
        experiment=ctx.experiment,
        tracking=ctx.tracking,
        parent_run_id=ctx.parent_run_id,
        cache_dir=ctx.cache_dir,
        max_failures=0,
    )
    if ctx.workers == 1:
        train_in_trial(req)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    run_training(dataclasses.replace(req, trainer_callbacks=[TuneReportCallback()]))


def _scheduler(req: SearchRequest, steps: int, eval_every: int, interval: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if req.scheduler == "asha":
        # max_t one past the last step: a trial that reaches the end returns by itself
        # (Tune killing it at max_t would strand its Train run's resources).
        return ASHAScheduler(
            time_attr="step",
            max_t=steps + 1,
            # Never past the last step (Ray asserts grace_period <= max_t).
            grace_period=min(req.grace_period or eval_every, steps),
            reduction_factor=2,
        )
    if req.scheduler in PBT_SCHEDULERS:
        from flows.tune import pbt

        common = {
            "time_attr": pbt.TIME_ATTR,
            "perturbation_interval": interval,
            "quantile_fraction": req.quantile,
            "custom_explore_fn": pbt.clip(req.space),
            # The final report has no TIME_ATTR (see flows.tune.pbt): not an error.
            "require_attrs": False,
            "synch": req.synch,
        }
        if req.scheduler == "pb2":
            from ray.tune.schedulers.pb2 import PB2

            return PB2(hyperparam_bounds=pbt.pb2_bounds(req.space), **common)
        from ray.tune.schedulers import PopulationBasedTraining

        return PopulationBasedTraining(
            hyperparam_mutations=pbt.mutations(req.space),
            resample_probability=req.resample_probability,
            **common,
        )
    return FIFOScheduler()


def _storage_root(req: SearchRequest) -> str:
    return req.storage or ray_storage()


def run_search(req: SearchRequest, progress: bool = True) -> SearchResult:
    """Run (or resume) the search."""
    import ray
    from ray import tune

    from flows import orphans, tracking
    from flows.settings import cache_dir, snapshot_root
    from flows.train.checkpoints import sweep_staging
    from flows.train.driver import check_resources, ensure_ray, gpu_capacity
    from flows.train.spec import ClusterSpec, StorageSpec

    req.check()
    steps = req.base.train.steps
    eval_every = min(req.eval_every or req.base.eval.every or max(1, steps // 4), steps)
    if req.grace_period and req.grace_period > steps:
        raise SearchError(
            f"grace_period ({req.grace_period}) must be at most train.steps ({steps}): ASHA "
            "would stop no trial before its end"
        )
    # Every trial evaluates on val at this interval (its reports carry the metric ASHA reads).
    base = apply_overrides(req.base, {"eval.every": eval_every})
    pbt = req.scheduler in PBT_SCHEDULERS
    interval = req.perturbation_interval or eval_every
    if pbt:
        from flows.tune.pbt import check_pbt_space

        check_pbt_space(req.space, base)
        if interval % eval_every:
            raise SearchError(
                f"perturbation_interval ({interval}) must be a multiple of the eval interval "
                f"({eval_every}): PBT decides on the val metric"
            )
    if req.resume:  # before any work: a search that cannot resume leaves nothing behind
        where, fs = StorageSpec(url=_storage_root(req)).resolve()
        if not tune.Tuner.can_restore(f"{where}/{req.name}", storage_filesystem=fs):
            raise SearchError(
                f"nothing to resume: no search named {req.name!r} under {_storage_root(req)}"
            )
    uri = parent = None
    if req.tracking:
        uri = tracking.tracking_uri()
        tracking.check_reachable(uri)
    manifest = req.manifest
    from flows.train.data_config import check_config

    check_config(base, manifest)
    # Trials are selected on the validation split (test stays for the reported figures).
    primary, mode = primary_metric(base, manifest.has_truth)
    metric = f"val_{primary}"
    name = (
        req.name or f"search-{req.family}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    )
    storage_path, filesystem = StorageSpec(url=_storage_root(req)).resolve()
    ensure_ray(log_to_driver=False)
    # A trial the cluster can never place would wait forever: fail before any run is made.
    check_resources(
        ClusterSpec(
            workers=req.workers_per_trial,
            gpus_per_worker=req.gpus_per_worker,
            cpus_per_worker=req.cpus_per_worker,
        )
    )
    path = f"{storage_path}/{name}"

    if req.tracking:
        exp_id = tracking.ensure_experiment(uri, EXPERIMENT)
        orphans.reap(uri, [exp_id])  # a killed search's parent and trials left RUNNING
        parent = tracking.find_or_create_run(
            uri,
            exp_id,
            name,
            {
                "ganflow.family": req.family,
                "ganflow.snapshot_id": manifest.id,
                "ganflow.kind": "search",
            },
        )

    try:
        if parent is not None:
            client = tracking.client(uri)
            have = client.get_run(parent).data.params
            params = {
                "family": req.family,
                "dataset": manifest.id,
                "samples": req.samples,
                "scheduler": req.scheduler,
                "space": json.dumps(req.space)[:6000],
                "steps": steps,
                **(
                    {
                        "perturbation_interval": interval,
                        "quantile": req.quantile,
                        "resample_probability": req.resample_probability,
                        "synch": req.synch,
                    }
                    if pbt
                    else {}
                ),
            }
            for k, v in params.items():
                if k not in have:
                    client.log_param(parent, k, str(v))
            # Logged here, before any trial starts, the experiment holds the dataset row: the
            # trials that start together only link their runs to it (no insert to race on).
            tracking.log_dataset_input(uri, parent, manifest.id, manifest.name, snapshot_root())

        # Trials report losses at every log point and the quality metric every eval.every
        # iterations; ASHA only judges results that carry the metric, so reports without it are
        # valid (Tune's strict check would reject them).
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        ctx = TrialContext(
            base=base,
            snapshot_id=manifest.id,
            search_name=name,
            workers=req.workers_per_trial,
            gpus_per_worker=req.gpus_per_worker,
            cpus_per_worker=req.cpus_per_worker,
            storage=_storage_root(req),
            tracking=req.tracking,
            parent_run_id=parent,
            env=forwarded_env(),
            experiment=EXPERIMENT,
            snapshot_root=snapshot_root(),
            cache_dir=str(cache_dir()),
        )
        # The same param space on a resume: Tune checks its keys against the saved search's.
        param_space = ctx.param_space(to_tune_space(req.space))
        # A trial on several workers runs a Ray Train run whose workers reserve the real
        # resources (the trial's actor only waits on it); a 1-worker trial trains in its own
        # actor (flows.train.driver.train_in_trial, flows/tune/pbt.py), which reserves them.
        on_workers = req.workers_per_trial > 1
        resources = {"cpu": req.cpus_per_worker, "gpu": req.gpus_per_worker}
        if pbt:
            from flows.tune.pbt import pbt_trial as trial_fn
        else:
            trial_fn = _trial
        trainable = tune.with_resources(trial_fn, {"cpu": 0.01} if on_workers else resources)
        max_conc = req.max_concurrent
        if max_conc is None:
            # GPU trials: as many as the GPUs allow, counting those an autoscaling cluster can add
            # (its CPUs arrive with the GPU nodes, so today's CPU count says nothing). Else CPUs.
            if req.gpus_per_worker > 0:
                free = gpu_capacity() / (req.workers_per_trial * req.gpus_per_worker)
            else:
                cpus = ray.cluster_resources().get("CPU", 1.0)
                free = cpus / (req.workers_per_trial * req.cpus_per_worker)
            max_conc = max(1, int(free))
        scheduler = _scheduler(req, steps, eval_every, interval)
        run_config = tune.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=1 if progress else 0,
            # A stopped trial's Train run can leave its placement group behind (see the
            # reaper); a 1-worker trial makes none.
            callbacks=[_reaper_callback()] if on_workers else [],
            # A 1-worker ASHA/FIFO trial checkpoints into Tune: the latest two stay, as a
            # Train run's do (PBT keeps every one: an exploit may take any trial's latest).
            checkpoint_config=None if pbt or on_workers else tune.CheckpointConfig(num_to_keep=2),
        )
        if req.resume:
            tuner = tune.Tuner.restore(
                path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=True,
                storage_filesystem=filesystem,
                param_space=param_space,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    scheduler=scheduler,
                    num_samples=req.samples,
                    max_concurrent_trials=max_conc,
                    # A 1-worker trial's actor (its process, torch and ganflow imported)
                    # takes the next trial, or a PBT trial's restart after an exploit, instead
                    # of a new process each time. A trial on several workers owns a Train run
                    # that a reset could not stop in time: its actor is not reused.
                    reuse_actors=not on_workers,
                ),
                run_config=run_config,
            )
        sweep_staging()  # what stopped trials of earlier searches on this node left in /tmp
        with orphans.Heartbeat(uri, parent) if parent else contextlib.nullcontext():
            grid = tuner.fit()
        return _summarise(req, name, grid, metric, mode, steps, parent, uri, path)
    except BaseException as exc:
        # Never leave the parent run RUNNING (its trials close their own runs).
        if parent is not None:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            # The server may be what failed; the original error is the one to show.
            with contextlib.suppress(Exception):
                tracking.finish_run(uri, parent, status)
        raise

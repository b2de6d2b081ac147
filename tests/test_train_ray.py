"""Ray Train jobs on a real local Ray cluster (started here, one per module): DDP replicas
stay identical, 2 workers match 1 worker at the same global batch, the generator registered
is the best step's on val (not the last), a killed worker resumes from its checkpoint
exactly (the same best step included), a rerun of a run name resumes after the driver gave up
(from the newest complete checkpoint, past a damaged latest one), checkpoints and MLflow
artifacts go through an S3 API (moto server), and the errors a user meets come before any
training.

Costs on 2 shared cores: about 15-25 s per TrainerFit (worker start dominates)."""

from __future__ import annotations

import hashlib
import socket

import numpy as np
import pytest
import torch
from ray_isolated import RAY_TEST_ENV, isolated_cluster

from flows import tracking
from flows.ingest.resolve import ensure_snapshot
from flows.train.driver import run_training
from flows.train.spec import (
    ClusterSpec,
    FaultInjection,
    StorageSpec,
    TrainError,
    TrainRequest,
    TrainResult,
)
from gan_core.data import load_digits
from gan_core.evaluate import evaluate
from gan_core.judge import load_or_train_judge
from gan_core.models import build_models
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import read_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Dummy credentials for the moto server, in the environment Ray's workers inherit.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**RAY_TEST_ENV, **AWS_ENV}.items():
            mp.setenv(k, v)
        mp.setenv("GANFLOW_HOME", str(tmp_path_factory.mktemp("ray-home")))
        with isolated_cluster([2]):
            yield ray


def _cfg(family: str, steps: int, batch: int, log_every: int, *extra: str):
    return apply_overrides(
        preset(family, "tiny"),
        [
            f"train.steps={steps}",
            f"train.batch_size={batch}",
            f"train.log_every={log_every}",
            *extra,
        ],
    )


def _snapshot(cfg):
    """The config's built-in dataset as a snapshot in this test's store (the caller's part:
    run_training takes it resolved)."""
    return ensure_snapshot(cfg.data.dataset, image_size=cfg.data.image_size)


def _req(cfg, workers: int, classifier_cache, **kw) -> TrainRequest:
    return TrainRequest(
        cfg=cfg,
        manifest=_snapshot(cfg),
        cluster=ClusterSpec(workers=workers, cpus_per_worker=0.9),
        cache_dir=str(classifier_cache),
        **kw,
    )


def _history(run_id: str, key: str, uri: str | None = None) -> dict[int, float]:
    """step -> the latest value logged for it (a resumed run logs some steps twice)."""
    c = tracking.client(uri or tracking.tracking_uri())
    out: dict[int, float] = {}
    for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        out[m.step] = m.value
    return out


def _counts(run_id: str, key: str, uri: str | None = None) -> dict[int, int]:
    c = tracking.client(uri or tracking.tracking_uri())
    out: dict[int, int] = {}
    for m in c.get_metric_history(run_id, key):
        out[m.step] = out.get(m.step, 0) + 1
    return out


def _models(checkpoint_dir: str) -> dict:
    """The networks and their moving averages (EMA) in a checkpoint."""
    sd = read_checkpoint(f"{checkpoint_dir}/state.pt")
    return {**sd["models"], **{f"ema.{k}": v for k, v in sd["ema"].items()}}


def _best(checkpoint_dir: str) -> dict:
    return read_checkpoint(f"{checkpoint_dir}/best.pt")


def _assert_same_models(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        for name in a[k]:
            torch.testing.assert_close(a[k][name], b[k][name], rtol=0, atol=0, msg=f"{k}.{name}")


STEPS = 16
# Val evaluations at 4, 8, 12 and the end, of an EMA generator (a half-life of one iteration's
# images, no ramp-up: it differs from the live G at every step); a learning rate high enough
# that the figures do not just fall to the last step (the Fréchet distance is best at 8).
BEST = (
    "eval.every=4",
    "optim.lr_g=0.05",
    "optim.lr_d=0.05",
    "train.ema_half_life=16",
    "train.ema_rampup=0",
)


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory, classifier_cache):
    """2 workers, an iteration per log point, replicas compared at every one of them."""
    home = tmp_path_factory.mktemp("reference-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GANFLOW_HOME", str(home))
        cfg = _cfg("gan", STEPS, 8, 1, *BEST)
        out = run_training(_req(cfg, 2, classifier_cache, check_replicas=True, checkpoint_every=5))
        assert isinstance(out, TrainResult)  # a value with attributes, not a dict of keys
        uri = tracking.tracking_uri()
        history = {
            k: _history(out.run_id, k, uri)
            for k in ("loss_D", "loss_G", "replica_max_abs_diff", "steps_per_s", "eval.val_fd")
        }
        return {**out.to_dict(), "uri": uri, "history": history}


def test_two_workers_hold_identical_weights_after_every_step(reference):
    print("steps/s at each log point:", reference["history"]["steps_per_s"])
    diffs = reference["history"]["replica_max_abs_diff"]
    assert sorted(diffs) == list(range(1, STEPS + 1))
    assert all(d == 0.0 for d in diffs.values()), diffs
    assert reference["steps"] == STEPS
    assert reference["metrics"]["ray_workers"] == 2
    # Something was learned through DDP: D's loss moved off its initial value.
    losses = reference["history"]["loss_D"]
    assert losses[STEPS] != losses[1]


def test_run_is_tracked_in_mlflow(reference):
    c = tracking.client(reference["uri"])
    run = c.get_run(reference["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "8"
    assert run.data.params["global_batch_size"] == "16"
    assert run.data.params["dataset.id"] == reference["snapshot_id"]
    assert run.data.metrics["eval.fd"] == pytest.approx(reference["metrics"]["fd"])
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == reference["snapshot_id"]
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"images", "losses.png"} <= artifacts
    images = {a.path for a in c.list_artifacts(run.info.run_id, "images")}
    assert any("samples" in p for p in images), images
    assert any("best_samples" in p for p in images), images  # the registered generator's
    import mlflow

    mlflow.set_tracking_uri(reference["uri"])
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    [logged] = [m for m in models if m.source_run_id == run.info.run_id and m.name == "generator"]
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert info.signature is not None and info.saved_input_example_info is not None
    # The one logged model is MLflow-servable: a python_function predicting {"n", "seed"}.
    served = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    size = int(run.data.params["data.image_size"])
    out = np.asarray(served.predict({"n": 7, "seed": 0})["images"])
    assert out.shape == (7, 1, size, size) and out.min() >= -1 and out.max() <= 1


def _best_step(curve: dict[int, float]) -> int:
    """The step with the lowest val figure in the MLflow history (a tie: the earlier)."""
    return min(curve, key=lambda s: (curve[s], s))


def test_registered_generator_is_the_best_step_on_val(reference):
    """The val curve is in MLflow at every eval.every; the run's figures, its logged model
    and the version the registry stage registers are all the best step's, and the weights
    served are the ones best.pt holds."""
    from flows import registry
    from flows.train.checkpoints import load_trained

    curve = reference["history"]["eval.val_fd"]
    print("val fd:", curve)
    assert sorted(curve) == [4, 8, 12, STEPS]
    best = _best_step(curve)
    metrics = reference["metrics"]
    assert metrics["best_step"] == best and metrics["val_fd"] == curve[best]
    c = tracking.client(reference["uri"])
    run = c.get_run(reference["run_id"])
    assert run.data.tags["ganflow.best_step"] == str(best)
    assert run.data.tags["ganflow.best_metric"] == "val_fd"
    saved = _best(reference["checkpoint"])
    assert saved["step"] == best and saved["metric"] == "fd" and saved["mode"] == "min"
    last = _models(reference["checkpoint"])  # EMA is on: the average is not the live G
    assert any(not torch.equal(t, last["G"][n]) for n, t in last["ema.G"].items())
    # What the retraining flow's register stage does with the run's final checkpoint.
    cfg, models = load_trained(reference["checkpoint"])
    name = f"ray-best-{reference['run_name']}"
    version = registry.register(
        reference["run_id"],
        cfg,
        models,
        name,
        metrics,
        reference["snapshot_id"],
        tracking_uri=reference["uri"],
    )
    mv = c.get_model_version(name, version)
    assert mv.tags["train_metric.best_step"] == str(best)
    logged = c.get_logged_model(mv.tags["ganflow.model_id"])
    assert logged.tags["ganflow.best_step"] == str(best)
    _, served, meta = registry.load_registered(f"{name}/{version}", tracking_uri=reference["uri"])
    assert meta["best_step"] == best
    for nets in (served, models):
        got = {k: v.detach().cpu() for k, v in nets["G"].state_dict().items()}
        torch.testing.assert_close(got, saved["weights"]["G"], rtol=0, atol=0)


def test_killed_worker_resumes_from_its_checkpoint(reference, tmp_path, classifier_cache):
    """Rank 1 is SIGKILLed at iteration 13; checkpoints every 5: the group restarts from 10
    and ends bit-identical to the uninterrupted reference (losses and weights)."""
    marker = tmp_path / "killed"
    cfg = _cfg("gan", STEPS, 8, 1, *BEST)
    out = run_training(
        _req(
            cfg,
            2,
            classifier_cache,
            check_replicas=True,
            checkpoint_every=5,
            max_failures=1,
            fault=FaultInjection(rank=1, step=13, marker=str(marker)),
        )
    )
    assert marker.exists(), "the fault was not injected"
    assert out.steps == STEPS
    counts = _counts(out.run_id, "loss_D")
    # Iterations up to the checkpoint were logged once (resumed from it, not from scratch),
    # the ones after it up to the kill twice. The checkpoint is 10, or 5 when the controller
    # had not yet registered 10's report when the worker died.
    resumed_at = 10 if counts[10] == 1 else 5
    assert all(counts[s] == 1 for s in range(1, resumed_at + 1)), counts
    assert all(counts[s] == 2 for s in range(resumed_at + 1, 14)), counts
    assert all(counts[s] == 1 for s in range(14, STEPS + 1)), counts
    for key in ("loss_D", "loss_G"):
        after = _history(out.run_id, key)
        for s in range(resumed_at + 1, STEPS + 1):
            assert after[s] == reference["history"][key][s], (key, s)
    _assert_same_models(_models(out.checkpoint), _models(reference["checkpoint"]))
    # The best so far came back from best.pt: the same val curve, best step and weights.
    assert _history(out.run_id, "eval.val_fd") == reference["history"]["eval.val_fd"]
    best, ref_best = _best(out.checkpoint), _best(reference["checkpoint"])
    assert out.metrics["best_step"] == reference["metrics"]["best_step"] == ref_best["step"]
    assert best["step"] == ref_best["step"] and best["figures"] == ref_best["figures"]
    _assert_same_models(best["weights"], ref_best["weights"])


def test_rerun_of_a_run_name_resumes_after_the_driver_gave_up(
    reference, tmp_path, classifier_cache
):
    """Rank 0 dies at iteration 14 with max_failures=0, so the driver gives up (checkpoints at
    4, 8 and 12 kept); the latest checkpoint's state.pt is then damaged in storage. The rerun
    of the run name continues the same MLflow run: Ray hands it 12, which it finds incomplete,
    so it resumes from 8 (the newest complete one, not 4) and finishes bit-identical to the
    uninterrupted reference, its best step included (iterations 9-14 logged twice, 1-8 and
    15-16 once)."""
    storage = tmp_path / "ray"
    cfg = _cfg("gan", STEPS, 8, 1, *BEST)
    name = f"resume-{tmp_path.name}"
    kw = dict(
        run_name=name,
        checkpoint_every=4,
        keep_checkpoints=3,  # 4 is still there to be (wrongly) picked over 8
        storage=StorageSpec(str(storage)),
    )
    marker = tmp_path / "killed"
    fault = FaultInjection(rank=0, step=14, marker=str(marker))
    with pytest.raises(TrainError, match="failed"):
        run_training(_req(cfg, 2, classifier_cache, max_failures=0, fault=fault, **kw))
    assert marker.exists(), "the fault was not injected"
    ckpts = sorted((storage / name).glob("checkpoint-*"))
    assert [c.name for c in ckpts] == [f"checkpoint-{s:08d}" for s in (4, 8, 12)]
    state = ckpts[-1] / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte flipped, same size: only the hash tells
    state.write_bytes(bytes(data))
    out = run_training(_req(cfg, 2, classifier_cache, **kw))
    # Resumed from 8 though Ray handed out 12: the iterations after 8 were checkpointed
    # again under new names (never into the skipped checkpoint's folder, which Ray deletes
    # by its path when it rotates it out), the suffix naming the skipped one.
    tag = hashlib.sha256(b"checkpoint-00000012").hexdigest()[:6]
    assert out.checkpoint.endswith(f"/checkpoint-{STEPS:08d}-{tag}"), out.checkpoint
    assert out.steps == STEPS
    counts = _counts(out.run_id, "loss_D")  # the same MLflow run, continued
    assert [counts[s] for s in range(1, STEPS + 1)] == [1] * 8 + [2] * 6 + [1] * 2, counts
    _assert_same_models(_models(out.checkpoint), _models(reference["checkpoint"]))
    assert out.metrics["best_step"] == reference["metrics"]["best_step"]
    _assert_same_models(_best(out.checkpoint)["weights"], _best(reference["checkpoint"])["weights"])


def test_two_workers_match_one_worker_at_the_same_global_batch(ray_local, classifier_cache):
    """Same global minibatch (1 x 32 vs 2 x 16): the held-out Fréchet distance agrees, and
    both learned (an untrained G is far worse)."""
    steps = 400
    extra = ("model.hidden=128", "optim.decay_start=1.0")
    one = run_training(
        _req(_cfg("gan", steps, 32, 200, *extra), 1, classifier_cache, tracking=False)
    )
    two = run_training(
        _req(_cfg("gan", steps, 16, 200, *extra), 2, classifier_cache, tracking=False)
    )
    cfg = _cfg("gan", steps, 32, 200, *extra)
    torch.manual_seed(cfg.train.seed)
    heldout = load_digits(cfg.data.image_size, "test")
    # The runs' own judge: trained on the snapshot at the first run's end, cached by its id.
    judge = load_or_train_judge(one.snapshot_id, load_digits(16, "train"), classifier_cache)
    fd0 = evaluate(cfg, build_models(cfg), heldout, judge)["fd"]
    fd1, fd2 = one.metrics["fd"], two.metrics["fd"]
    print(f"fd: 1 worker {fd1:.1f}, 2 workers {fd2:.1f}, untrained {fd0:.1f}")
    assert fd1 < 0.5 * fd0 and fd2 < 0.5 * fd0
    assert 1 / 1.5 < fd2 / fd1 < 1.5


def test_checkpoints_and_mlflow_artifacts_through_an_s3_api(
    ray_local, tmp_path, monkeypatch, classifier_cache
):
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("ganflow-test")
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("GANFLOW_MLFLOW_ARTIFACT_ROOT", "s3://ganflow-test/mlflow")
        # CycleGAN on 2 workers: four DDP-wrapped networks, and two ranks' files merged into
        # each checkpoint on the S3 side.
        cfg = _cfg("cyclegan", 6, 4, 3)
        out = run_training(
            _req(
                cfg,
                2,
                classifier_cache,
                storage=StorageSpec("s3://ganflow-test/ray", endpoint_url=endpoint),
                experiment="s3-test",
            )
        )
        assert out.checkpoint.startswith("ganflow-test/ray/")
        ckpts = fs.ls(f"ganflow-test/ray/{out.run_name}")
        names = {p.rsplit("/", 1)[-1] for p in ckpts}
        assert "checkpoint-00000006" in names, names
        files = {p.rsplit("/", 1)[-1] for p in fs.ls(out.checkpoint)}
        assert {"state.pt", "rank-00000.pt", "rank-00001.pt"} <= files
        found = fs.find(f"ganflow-test/mlflow/s3-test/{out.run_id}")
        assert any(p.endswith("losses.png") for p in found), found
        assert any("/images/" in p for p in found), found
    finally:
        server.stop()


def test_missing_gpus_fail_before_training(ray_local, classifier_cache):
    cfg = _cfg("gan", 2, 8, 1)
    req = TrainRequest(cfg=cfg, manifest=_snapshot(cfg), cluster=ClusterSpec(gpus_per_worker=1))
    with pytest.raises(TrainError, match=r"needs 1 GPUs .* has 0"):
        run_training(req)


def test_autoscaling_cluster_is_checked_against_its_ceiling(ray_local, monkeypatch, capsys):
    """A KubeRay/launcher cluster with GPU workers at minReplicas 0 has no GPUs until the job
    asks: GANFLOW_RAY_MAX_GPUS lets the check pass (Ray Train waits for the autoscaler) while
    a job larger than the ceiling still fails before any work."""
    from flows.train.driver import check_resources

    one_gpu = ClusterSpec(workers=1, gpus_per_worker=1)
    monkeypatch.setenv("GANFLOW_RAY_MAX_GPUS", "8")
    check_resources(one_gpu)
    assert "waiting for the autoscaler" in capsys.readouterr().err
    with pytest.raises(TrainError, match=r"needs 16 GPUs .* can grow to 8"):
        check_resources(ClusterSpec(workers=16, gpus_per_worker=1))
    monkeypatch.setenv("GANFLOW_RAY_MAX_GPUS", "eight")
    with pytest.raises(TrainError, match="GANFLOW_RAY_MAX_GPUS must be a number"):
        check_resources(one_gpu)
    monkeypatch.delenv("GANFLOW_RAY_MAX_GPUS")
    with pytest.raises(TrainError, match="set GANFLOW_RAY_MAX_GPUS if it autoscales"):
        check_resources(one_gpu)
    check_resources(ClusterSpec(workers=2))  # two 1-CPU workers fit this 2-CPU cluster


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_gpu_worker_trains_in_bf16(ray_local, classifier_cache):
    """On a GPU the job uses CUDA (NCCL backend) and bf16 autocast unless the config says
    otherwise. Not run on the CPU-only development machine."""
    cfg = _cfg("gan", 20, 8, 10)
    req = _req(cfg, 1, classifier_cache)
    req.cluster.gpus_per_worker = 1
    out = run_training(req)
    assert out.steps == 20
    params = tracking.client(tracking.tracking_uri()).get_run(out.run_id).data.params
    assert params["train.precision"] == "auto"  # nothing set: bf16 autocast on the GPU


def test_a_user_error_on_a_worker_is_raised_not_retried():
    """The failure policy sees what Ray Train's controller builds from the workers' poll
    (Ray unwraps its traceback holder, so the error's text is only its message): a
    WorkerUserError raises at once, a lost node or a CUDA error goes to the retries."""
    pytest.importorskip("ray")
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.worker_group.poll import (
        WorkerGroupPollStatus,
        WorkerStatus,
    )

    from flows.train.driver import failure_cause, user_error_in
    from flows.train.spec import WorkerUserError

    def group_error(exc: Exception, other: Exception | None = None):
        def status(e):
            held = UserExceptionWithTraceback(e, f"Traceback ...\n{type(e).__name__}: {e}")
            return WorkerStatus(running=False, error=held)

        second = status(other) if other else WorkerStatus(running=True)
        return WorkerGroupPollStatus({0: status(exc), 1: second})

    user = group_error(
        WorkerUserError("ValueError: model.ngf must be positive")
    ).get_worker_group_error()
    assert user_error_in(user)
    assert failure_cause(user) == "rank 0: ValueError: model.ngf must be positive"
    for transient in (RuntimeError("CUDA error: an illegal memory access"), OSError("node lost")):
        assert not user_error_in(group_error(transient).get_worker_group_error())
    # A worker lost beside one whose collective then failed: the loss decides (retry).
    lost = group_error(OSError("worker died"), WorkerUserError("RuntimeError: peer closed"))
    assert not user_error_in(lost.get_worker_group_error())

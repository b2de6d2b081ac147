"""Population Based Training (issue 22): exploit restores the donor's complete training state
bit for bit and the new hyperparameters take effect from the next step; mutations stay in
the space's bounds; a small real Tune PBT search; kill-and-resume of a PBT search."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from home_cache import seed_judges
from ingest_data import search_request

from flows.train.checkpoints import restore_checkpoint, write_checkpoint
from flows.tune import pbt
from flows.tune.space import SearchError, validate_space
from gan_core.data import load_builtin
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import init_state, state_dict, train

pytestmark = pytest.mark.timeout(900)


def _cyclegan(**over):
    # EMA on, so the exploit must carry averages too; CycleGAN brings the image pools.
    base = {"train.steps": 40, "train.ema_half_life": 500, "train.log_every": 5, **over}
    return apply_overrides(preset("cyclegan", "tiny"), base)


def _assert_same(a, b, where=""):
    """Nested state dicts equal bit for bit (tensors by torch.equal, the rest by ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_exploit_restores_the_donor_exactly_and_new_values_apply_from_the_next_step(tmp_path):
    data = load_builtin("builtin:digits-unpaired", 16, "train")
    s = 15
    donor_cfg = _cyclegan()
    donor = init_state(donor_cfg, data, "cpu")
    train(donor, data, until=s)
    # Through the files a trial's checkpoint holds (a Train worker's, as a 1-process trial
    # writes them into Tune's), as the receiving trial reads them.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_checkpoint(donor, ckpt, 0, 1)
    saved = copy.deepcopy(state_dict(donor))

    # The receiver has trained on with other values: none of its own state may survive.
    recv_cfg = _cyclegan(**{"optim.lr_g": 5e-4, "train.d_steps": 3, "train.seed": 7})
    receiver = init_state(recv_cfg, data, "cpu")
    train(receiver, data, until=25)
    new = {"optim.lr_g": 2.4e-4, "optim.lr_d": 1.6e-4, "loss.lambda_cyc": 12.0, "train.d_steps": 2}
    new_cfg = apply_overrides(donor_cfg, new)
    assert restore_checkpoint(receiver, ckpt, 0, 1, new_cfg)  # every stream, exactly

    after = state_dict(receiver)
    assert after["step"] == s
    for key in ("models", "ema", "pools", "samplers", "noise", "augment", "augment_rng"):
        _assert_same(after[key], saved[key], key)
    for key in ("opt_g", "opt_d"):
        _assert_same(after[key]["state"], saved[key]["state"], key)  # Adam's moments and steps
    assert after["d_updates"] == saved["d_updates"]
    # The new values, in the loop's config and the optimisers (the decay has not started).
    assert receiver.cfg.loss.lambda_cyc == 12.0 and receiver.cfg.train.d_steps == 2
    assert [g["lr"] for g in receiver.opt_g.param_groups] == [2.4e-4]
    assert [g["lr"] for g in receiver.opt_d.param_groups] == [1.6e-4]

    # Step s+1 under the new values: k = 2 D updates, and G's Adam step scaled by the new
    # learning rate exactly. The reference is the donor's state run one step with only the
    # learning rates left at the donor's (same k, λ): the same gradients and moments, so every
    # G parameter's change differs by the factor lr_new / lr_old.
    before = {k: t.clone() for k, t in receiver.models["G"].state_dict().items()}
    d0 = receiver.d_updates
    train(receiver, data, until=s + 1)
    assert receiver.d_updates - d0 == 2 and receiver.step == s + 1
    ref_cfg = apply_overrides(new_cfg, {"optim.lr_g": donor_cfg.optim.lr_g})
    ref = init_state(ref_cfg, data, "cpu")
    restore_checkpoint(ref, ckpt, 0, 1, ref_cfg)
    train(ref, data, until=s + 1)
    ratio = 2.4e-4 / donor_cfg.optim.lr_g
    for name, t in receiver.models["G"].named_parameters():
        moved = t.detach() - before[name]
        ref_moved = dict(ref.models["G"].named_parameters())[name].detach() - before[name]
        assert moved.abs().sum() > 0, name
        # Both differences are float32 subtractions from the same weights: equal to a few
        # ulps of the weights (1e-7 is 0.05% of a step, whose size is about lr = 2e-4).
        torch.testing.assert_close(moved, ref_moved * ratio, rtol=1e-4, atol=1e-7)
    # And the donor's own continuation (old k = 1) is not what ran.
    train(donor, data, until=s + 1)
    assert donor.d_updates - saved["d_updates"] == 1


def test_mutations_stay_in_bounds_and_k_moves_one_step():
    base = preset("cyclegan", "tiny")
    space = validate_space(
        {
            "lambda_cyc": {"loguniform": [1, 30]},
            "d_steps": {"randint": [1, 4]},
            "lr_g": {"uniform": [1e-4, 4e-4]},
        },
        base,
    )
    pbt.check_pbt_space(space, base)
    from ray.tune.schedulers.pbt import _explore

    random.seed(0)
    muts, clip = pbt.mutations(space), pbt.clip(space)
    assert muts["train.d_steps"] == [1, 2, 3]
    config = {"loss.lambda_cyc": 29.0, "train.d_steps": 2, "optim.lr_g": 3.9e-4}
    for _ in range(300):
        new, _ = _explore(config, muts, 0.25, (1.2, 0.8), clip)
        assert 1 <= new["loss.lambda_cyc"] <= 30 and 1e-4 <= new["optim.lr_g"] <= 4e-4
        assert isinstance(new["train.d_steps"], int) and 1 <= new["train.d_steps"] <= 3
        config = new
    with pytest.raises(SearchError, match="model.hidden cannot change while a run trains"):
        pbt.check_pbt_space(validate_space({"hidden": {"grid": [16, 32]}}, base), base)


def test_schedule_keeps_the_donors_segments_up_to_the_exploit():
    a, b = {"optim.lr_g": 1e-4}, {"optim.lr_g": 2e-4}
    donor = [[1, a], [41, b]]
    assert pbt.schedule_after(donor, 60, {"optim.lr_g": 3e-4}) == [
        [1, a],
        [41, b],
        [61, {"optim.lr_g": 3e-4}],
    ]
    assert pbt.schedule_after(donor, 30, b) == [[1, a], [31, b]]
    assert pbt.schedule_after(donor, 60, b) == donor  # unchanged values: no new segment
    text = pbt.format_schedule([[1, a], [31, b]], 100)
    assert text.splitlines() == [
        "  steps 1-30: optim.lr_g=0.0001",
        "  steps 31-100: optim.lr_g=0.0002",
    ]


# --- a real Tune PBT search ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory, classifier_cache):
    pytest.importorskip("ray")
    from ray_isolated import isolated_cluster, use_test_env

    home = tmp_path_factory.mktemp("pbt-home")
    seed_judges(home, classifier_cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GANFLOW_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        use_test_env(mp)
        with isolated_cluster([2]) as cluster:
            mp.setenv("RAY_ADDRESS", cluster.address)  # the resume test's CLI driver joins it
            yield home


@pytest.fixture
def home(ray_home, monkeypatch):
    monkeypatch.setenv("GANFLOW_HOME", str(ray_home))  # conftest gives each test its own
    return ray_home


PBT_ARGS = {"train.steps": 40, "train.log_every": 5, "model.hidden": 32}


@pytest.mark.slow
def test_small_pbt_search_exploits_and_its_winner_is_the_model(home):
    from flows.tracking import client, tracking_uri
    from flows.tune.search import run_search

    base = apply_overrides(preset("gan", "tiny"), PBT_ARGS)
    space = validate_space(
        {"lr_g": {"loguniform": [5e-5, 1e-3]}, "d_steps": {"grid": [1, 3]}}, base
    )
    c = client(tracking_uri())
    exp_name = "ganflow-search"
    # Whether so short an asynchronous PBT exploits at all depends on how its 4 trials
    # interleave on the machine (a trial is compared with those that have reported by then):
    # one fresh-clone CI run of three saw none. A second search is the retry; every check
    # below is on the search that exploited.
    for name in ("pbt-small", "pbt-small-2"):
        result = run_search(
            search_request(
                "gan",
                "builtin:digits",
                base,
                space,
                samples=2,
                scheduler="pbt",
                eval_every=10,
                quantile=0.5,
                cpus_per_worker=0.45,
                name=name,
            ),
            progress=False,
        )
        trials = result.trials
        assert len(trials) == 4 and all(t.error is None and t.step == 40 for t in trials)
        best = result.best
        assert best is not None and best.schedule[0][0] == 1
        exp = c.get_experiment_by_name(exp_name).experiment_id
        parent = c.search_runs([exp], filter_string=f"tags.`ganflow.run_name` = '{name}'")[0]
        children = c.search_runs(
            [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert len(children) == 4  # one run per trial, kept across its exploits
        exploits = [
            (ch, k, v) for ch in children for k, v in ch.data.tags.items() if "pbt.exploit" in k
        ]
        if exploits:
            break
    assert exploits, "no exploit in a population of 4 with quantile 0.5"
    last_exploit: dict = {}
    for ch, key, line in exploits:
        step = int(key.rsplit(".", 1)[1])
        assert f"at step {step}:" in line and "from trial" in line
        if step >= last_exploit.get(ch.info.run_id, (-1,))[0]:
            last_exploit[ch.info.run_id] = (step, line)
    # The schedule is the final model's lineage: an exploit replaces the trial's history with
    # its donor's, so only a trial's last exploit is sure to start a segment (at step + 1).
    for run_id, (step, line) in last_exploit.items():
        sched = json.loads(Path(c.download_artifacts(run_id, "pbt_schedule.json")).read_text())
        if not line.endswith("no change"):  # the donor's own values: no new segment
            assert any(first == step + 1 for first, _ in sched), (line, sched)
    # The winner's run holds the schedule and its generator: that is the model, not a retrain.
    best_arts = {a.path for a in c.list_artifacts(best.run_id)}
    assert "pbt_schedule.json" in best_arts
    assert c.get_run(best.run_id).outputs.model_outputs, "no logged generator"
    assert "pbt_schedule.json" in {a.path for a in c.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_pbt_trials_on_two_workers_each_exploit_and_register(home):
    """--workers-per-trial 2: each trial is a Ray Train run of two data-parallel workers; its
    checkpoints come back to the trial, which reports them to Tune, so PBT exploits across
    trials as with one process, and the winner's generator is logged in its run."""
    from flows.tracking import client, tracking_uri
    from flows.tune.search import run_search

    base = apply_overrides(preset("gan", "tiny"), PBT_ARGS)
    space = validate_space({"lr_g": {"grid": [1e-3, 1e-6]}}, base)
    c = client(tracking_uri())
    name = "pbt-2w"
    result = run_search(
        search_request(
            "gan",
            "builtin:digits",
            base,
            space,
            scheduler="pbt",
            # One decision, at step 20, once both trials are there (synchronous PBT):
            # the worse of two always exploits the better.
            eval_every=20,
            quantile=0.5,
            synch=True,
            workers_per_trial=2,
            cpus_per_worker=0.45,
            name=name,
        ),
        progress=False,
    )
    assert len(result.trials) == 2
    assert all(t.error is None and t.step == 40 for t in result.trials), result.trials
    exp = c.get_experiment_by_name("ganflow-search").experiment_id
    parent = c.search_runs([exp], filter_string=f"tags.`ganflow.run_name` = '{name}'")[0]
    children = c.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    [(run, line)] = [
        (ch, v) for ch in children for k, v in ch.data.tags.items() if "pbt.exploit" in k
    ]
    assert line.startswith("exploit: from trial ") and " at step 20: " in line, line
    # The receiver's schedule: the donor's values up to step 20, its own from step 21.
    sched = json.loads(Path(c.download_artifacts(run.info.run_id, "pbt_schedule.json")).read_text())
    # (A mutation can land on the donor's own values: then no new segment.)
    assert [first for first, _ in sched] == ([1] if line.endswith("no change") else [1, 21])
    # Every trial's last report came from two workers.
    finals = [
        json.loads(line)
        for f in (home / "ray_results" / name).glob("*/result.json")
        for line in f.read_text().splitlines()
        if '"ray_workers"' in line
    ]
    assert finals and all(r["ray_workers"] == 2 for r in finals), finals
    best = result.best
    assert best is not None
    assert "pbt_schedule.json" in {a.path for a in c.list_artifacts(best.run_id)}
    assert c.get_run(best.run_id).outputs.model_outputs, "no logged generator"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_pbt_search_resumes_with_the_same_population(home):
    """The driver is SIGKILLed once a trial has reported a checkpoint; --resume finishes the
    same 4 trials (same ids), each once, at the last step."""
    env = {**os.environ, "GANFLOW_HOME": str(home)}
    args = [sys.executable, "-m", "flows.cli", "tune", "--family", "gan", "--name", "pbt-resume"]
    # The gan family's default space: k on a grid of 4, so a population of 4.
    args += ["--scheduler", "pbt", "--samples", "1", "--quantile", "0.5"]
    for k, v in PBT_ARGS.items():
        args += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    state = home / "ray_results" / "pbt-resume"
    # A first checkpoint needs the CLI's imports, Ray and a trial's data and judge: 400 s
    # was not enough on this 2-core machine under a load average of 30.
    deadline = time.time() + 900
    try:
        while time.time() < deadline:
            if state.exists() and list(state.glob("*/checkpoint_*")):
                break
            if proc.poll() is not None:
                pytest.fail(f"search ended before it could be killed (rc {proc.returncode})")
            time.sleep(1)
        else:
            pytest.fail("no trial checkpointed in time")
        first = {
            json.loads(line)["trial_id"]
            for p in state.glob("*/result.json")
            for line in p.read_text().splitlines()
            if line.strip()
        }
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = subprocess.run(
        [*args, "--resume", "--json"], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    trials = result["trials"]
    ids = [t["trial_id"] for t in trials]
    assert len(trials) == 4 and len(set(ids)) == 4, ids
    assert all(t["error"] is None and t["step"] == 40 for t in trials)
    assert first <= set(ids), (first, ids)  # the same population, not a new one
    assert result["best"]["schedule"]

"""Champions that MLflow itself loads and serves (issue 12), and ganflow's own loader.

Small models trained here in-process (seconds), registered against a SQLite MLflow in a temp
folder through the same code as the pipeline (the run's logged model, then the version).
Then: `mlflow.pyfunc.load_model("models:/NAME@champion")` for each family; MLflow's scoring
server (`mlflow models serve --env-manager local` on 127.0.0.1) answered over real HTTP, with
valid requests, malformed ones (4xx, one line, no traceback) and the cGAN's per-label samples
classified by the judge at the rate evaluation reported; a model logged with the old
models-from-code file (flows.registry.pyfunc) still loading; a planted pickle refused; the
promotion lock's race with a holder that outlives its TTL; and the bad inputs of
`ganflow generate/serve/rollback` (issue 16) answered in one line.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from flows import registry, tracking
from flows.package import MODEL_FORMAT, PACKAGE_ARTIFACT, write_package
from gan_core.data import load_builtin
from gan_core.evaluate import evaluate
from gan_core.judge import load_or_train_judge
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import init_state, train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge(classifier_cache):
    train_set = load_builtin("builtin:digits", 16, "train")
    heldout = load_builtin("builtin:digits", 16, "test")
    return heldout, load_or_train_judge("builtin-digits-16", train_set, classifier_cache)


@pytest.fixture(scope="module")
def store(tmp_path_factory, judge, trained_cgan):
    """One champion per family in a SQLite MLflow: (uri, {family: (name, cfg, metrics)}). The
    cGAN is conftest's (trained once per session), the others are trained here."""
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("serving", artifact_location=(tmp / "artifacts").as_uri())
    heldout, clf = judge
    out = {}
    configs = {
        "gan": apply_overrides(preset("gan", "tiny"), {"train.steps": 20}),
        "cgan": trained_cgan[0],
        "cyclegan": apply_overrides(preset("cyclegan", "tiny"), {"train.steps": 2}),
    }
    for family, cfg in configs.items():
        if family == "cgan":
            models = trained_cgan[1]
        else:
            data = load_builtin(cfg.data.dataset, cfg.data.image_size)
            models = train(init_state(cfg, data, "cpu"), data).models
        metrics = {"fd": 1.0}
        if family == "cgan":  # what the pipeline reports for a cGAN: the judge's verdict
            metrics = evaluate(cfg, models, heldout, clf, seed=0)
        run = client.create_run(exp, tags={"ganflow.snapshot_id": f"snap-{family}"})
        run_id = run.info.run_id
        tracking.log_metrics(uri, run_id, {f"eval.{k}": v for k, v in metrics.items()}, 0)
        # As the training worker does at the end of a run: the one logged model.
        tracking.log_generator(uri, run_id, cfg, models)
        name = f"ganflow-{family}-serve"
        version = registry.register(
            run_id, cfg, models, name, metrics, f"snap-{family}", "test", tracking_uri=uri
        )
        client.set_registered_model_alias(name, "champion", version)
        out[family] = (name, cfg, metrics)
    return uri, out


@pytest.fixture
def env_uri(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    return store[0]


# --- the registry version is the run's one logged model -----------------------------------


def test_one_logged_model_per_run_is_the_registered_version(store, server_procs):
    # server_procs: the scoring servers start booting now, for the HTTP tests at the end.
    uri, models = store
    client = MlflowClient(uri, registry_uri=uri)
    for family, (name, _, metrics) in models.items():
        mv = client.get_model_version_by_alias(name, "champion")
        run = client.get_run(mv.run_id)
        logged = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{mv.run_id}'",
        )
        assert len(logged) == 1, f"{family}: the generator is logged once per run"
        (lm,) = logged
        assert mv.source == f"models:/{lm.model_id}"  # the version is that logged model
        assert lm.tags["ganflow.snapshot_id"] == f"snap-{family}"
        assert lm.params["model.z_dim"] or lm.params  # the flat config as its params
        names = {m.key for m in lm.metrics}
        assert set(metrics) <= names, f"{family}: metrics linked to the logged model"
        linked = json.loads(lm.tags["mlflow.modelVersions"])
        assert {"name": name, "version": str(mv.version)} in linked


def test_mlflow_loads_and_predicts_each_champion(store):
    import mlflow

    uri, models = store
    mlflow.set_tracking_uri(uri)
    for family, (name, cfg, _) in models.items():
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        assert model.metadata.signature.inputs is not None
        s, ch = cfg.data.image_size, cfg.data.channels
        if family == "gan":
            out = model.predict({"n": 3, "seed": 1})
        elif family == "cgan":
            out = model.predict({"labels": [0, 7, 9], "seed": 1})
            assert out["labels"] == [0, 7, 9]
        else:
            x = np.zeros((2, ch, s, s), dtype=np.float32).tolist()
            out = model.predict({"images": x, "direction": "F"}, params={"format": "png"})
            assert len(out["images"]) == 2 and out["direction"] == "F"
            continue
        images = np.asarray(out["images"])
        assert images.shape == (3, ch, s, s) and images.min() >= -1 and images.max() <= 1


def test_a_model_logged_with_the_old_code_path_still_loads(tmp_path):
    # Models registered before the served class moved to flows.package carry their own copy
    # of the models-from-code file, which imports it from flows.registry.pyfunc; MLflow runs
    # that copy on every load, so the old import must keep answering.
    import mlflow

    from flows.package.pyfunc import GanflowGenerator
    from gan_core.models import build_models

    code = tmp_path / "pyfunc_model.py"
    code.write_text(
        "from mlflow.models import set_model\n\n"
        "from flows.registry.pyfunc import GanflowGenerator\n\n"
        "set_model(GanflowGenerator())\n"
    )
    cfg = preset("gan", "tiny")
    pkg = write_package(cfg, build_models(cfg), tmp_path / PACKAGE_ARTIFACT)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("old", artifact_location=(tmp_path / "artifacts").as_uri())
    with tracking.fluent_uri(uri):
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pyfunc.log_model(
                name="generator",
                python_model=str(code),
                artifacts={PACKAGE_ARTIFACT: str(pkg)},
                metadata={"ganflow.format": MODEL_FORMAT},
                pip_requirements=[],
            )
        model = mlflow.pyfunc.load_model(info.model_uri)
    assert type(model.unwrap_python_model()) is GanflowGenerator
    out = model.predict({"n": 2, "seed": 0})
    s, ch = cfg.data.image_size, cfg.data.channels
    assert np.asarray(out["images"]).shape == (2, ch, s, s)


# --- under load: slots, a quick 503, answers of bounded size -------------------------------


def test_ganflow_serve_answers_through_its_gate_and_passes_its_limits(store, env_uri):
    # The command `ganflow serve` runs (its plan's argv and environment), started for real
    # on loopback: uvicorn on MLflow's scoring app behind the gate, answering a request.
    from flows.registry.serve import plan
    from flows.registry.serve_app import ENV_MAX_CONCURRENCY, ENV_MODEL_URI, ENV_QUEUE_TIMEOUT

    name = store[1]["gan"][0]
    p = plan(name, port=_free_port(), max_concurrency=3, queue_timeout=7.5)
    assert p.env[ENV_MAX_CONCURRENCY] == "3" and p.env[ENV_QUEUE_TIMEOUT] == "7.5"
    assert p.env[ENV_MODEL_URI] == f"models:/{name}/{p.version}"
    assert p.argv[p.argv.index("--limit-concurrency") + 1] == "48"  # a backstop above it
    proc = subprocess.Popen(p.argv, env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                with urllib.request.urlopen(p.url.replace("invocations", "ping"), timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "ganflow serve did not come up"
                time.sleep(0.5)
        status, body = _post(p.port, {"inputs": {"n": 3, "seed": 1}})
        assert status == 200 and len(body["predictions"]["images"]) == 3, body
        _assert_one_line_4xx(*_post(p.port, {"inputs": {"n": 0}}), "n must be in")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_crowd_beyond_the_slots_waits_then_gets_a_quick_503(store):
    # The gate around MLflow's own scoring app (mlflow.pyfunc.scoring_server.init) on the
    # champion as served, driven over ASGI in process. One slot: a request holding it
    # (admitted, then held until released) makes the next one wait the queue timeout and
    # get 503 in one line, while /ping still answers; released, requests are answered 200,
    # and a bad request gives its slot back.
    import asyncio

    import httpx
    import mlflow
    from mlflow.pyfunc.scoring_server import init

    from flows.registry.serve_app import Admission

    uri, models = store
    mlflow.set_tracking_uri(uri)
    scoring = init(mlflow.pyfunc.load_model(f"models:/{models['gan'][0]}@champion"))
    body = {"inputs": {"n": 2, "seed": 0}}

    async def scenario() -> None:
        release = asyncio.Event()

        async def inner(scope, receive, send):  # MLflow's app; "x-hold" waits first
            if (b"x-hold", b"1") in scope.get("headers", []):
                await release.wait()
            await scoring(scope, receive, send)

        gate = Admission(inner, slots=1, timeout=0.3)
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as c:
            held = asyncio.create_task(c.post("/invocations", json=body, headers={"x-hold": "1"}))
            await asyncio.sleep(0.1)
            t0 = time.perf_counter()
            busy = await c.post("/invocations", json=body)
            waited = time.perf_counter() - t0
            assert busy.status_code == 503, busy.text
            assert busy.headers["retry-after"]
            message = busy.json()["message"]
            assert (
                message.startswith("server busy: 1 request(s) in progress") and "\n" not in message
            )
            assert 0.3 <= waited < 5  # it queued for the timeout, then was told at once
            assert (await c.get("/ping")).status_code == 200  # not gated
            release.set()
            assert (await held).status_code == 200
            assert (await c.post("/invocations", json={"inputs": {"n": 0}})).status_code == 400
            assert (await c.post("/invocations", json=body)).status_code == 200

    asyncio.run(scenario())


def test_json_array_answers_are_bounded_and_png_is_the_way_past(store):
    from flows.package.pyfunc import MAX_ARRAY_VALUES, BadRequest, GanflowGenerator

    model = GanflowGenerator()
    model.cfg = apply_overrides(preset("gan", "default", 64), {"data.channels": 3})
    most = MAX_ARRAY_VALUES // (3 * 64 * 64)
    model.check_answer(most, "array")
    model.check_answer(1024, "png")
    with pytest.raises(BadRequest, match=f"ask for at most {most} images or for PNG"):
        model.check_answer(most + 1, "array")
    # The digits models are far inside the bound: 1,024 images as arrays are answered.
    small = GanflowGenerator()
    small.cfg = store[1]["gan"][1]
    small.check_answer(1024, "array")


# --- no pickle from the registry ------------------------------------------------------------


def test_a_planted_pickle_is_refused_and_never_loaded(store, env_uri, tmp_path, capsys):
    import mlflow

    from flows.cli import main

    marker = tmp_path / "pickle-was-loaded"

    class Planted(mlflow.pyfunc.PythonModel):
        def __reduce__(self):  # unpickling this runs os.mkdir(marker)
            return (os.mkdir, (str(marker),))

        def predict(self, context, model_input, params=None):
            return model_input

    client = MlflowClient(env_uri, registry_uri=env_uri)
    name = store[1]["gan"][0]
    mlflow.set_tracking_uri(env_uri)
    exp = client.get_experiment_by_name("serving").experiment_id
    with mlflow.start_run(experiment_id=exp) as run:
        # Dressed up as a ganflow model: the marker and tags are there, the payload is a pickle.
        info = mlflow.pyfunc.log_model(
            name="generator",
            python_model=Planted(),
            metadata={"ganflow.format": MODEL_FORMAT},
            tags={"ganflow.format": MODEL_FORMAT},
            pip_requirements=[],
        )
    assert not marker.exists()
    lm = client.get_logged_model(info.model_id)
    mv = client.create_model_version(
        name,
        lm.artifact_location,
        run_id=run.info.run_id,
        tags={"ganflow.family": "gan"},
        model_id=info.model_id,
    )
    planted = f"{name}/{mv.version}"
    capsys.readouterr()  # MLflow's own logging while the pickle was logged
    with pytest.raises(registry.RegistryError, match="a pickled python_model"):
        registry.load_registered(planted)
    assert main(["generate", planted, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to load it" in err and len(err.splitlines()) == 1
    assert main(["serve", planted, "--dry-run"]) == 2
    heldout, clf = None, None
    with pytest.raises(registry.RegistryError, match="refusing"):
        registry.promote(name, str(mv.version), heldout, clf)
    assert not marker.exists(), "a pickle from the registry was loaded"
    client.delete_model_version(name, mv.version)


# --- the promotion lock ---------------------------------------------------------------------


def _lock_race(client, name, holders, before_inside=None):
    """Run holders (start delay, hold seconds, lock kwargs) as threads; each marks itself
    inside the critical section after check(). Returns (max inside at once, events).
    before_inside: {tag: fn(lock)} run once the hold is over, before check()."""
    inside, peak, events, lock = [0], [0], [], threading.Lock()

    def go(tag, delay, hold, kwargs):
        time.sleep(delay)
        try:
            with registry.promotion_lock(client, name, **kwargs) as lk:
                time.sleep(hold)
                if before_inside and tag in before_inside:
                    before_inside[tag](lk)
                lk.check()
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                events.append((tag, "in", time.monotonic()))
                time.sleep(0.3)
                with lock:
                    inside[0] -= 1
                events.append((tag, "out", time.monotonic()))
        except registry.RegistryError as exc:
            events.append((tag, str(exc), time.monotonic()))

    threads = [threading.Thread(target=go, args=h) for h in holders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return peak[0], events


def test_a_live_holder_past_the_ttl_keeps_the_lock(tmp_path):
    """A holds four times the TTL; its heartbeat keeps the lock, so B waits for it. Without
    ownership (the lock before issue 12), B broke A's 'stale' lock after the TTL and both
    were inside at once."""
    uri = f"sqlite:///{tmp_path}/lock.db"
    client = MlflowClient(uri, registry_uri=uri)
    # A TTL of 2 s (heartbeats every 0.5 s) leaves a loaded machine room for a late beat. The
    # failures once put on load were the lock's: a transient 'database is locked' on one beat
    # stopped the heartbeat (see the next test).
    peak, events = _lock_race(
        client,
        "ganflow-lock-live",
        [
            ("A", 0.0, 8.0, {"ttl_s": 2.0, "wait_s": 30}),
            ("B", 0.3, 0.0, {"ttl_s": 2.0, "wait_s": 30}),
        ],
    )
    order = [(tag, what) for tag, what, _ in sorted(events, key=lambda e: e[2])]
    assert peak == 1 and order == [("A", "in"), ("A", "out"), ("B", "in"), ("B", "out")]


def test_an_entry_abandoned_long_ago_is_broken_at_once_and_a_fresh_one_after_its_ttl(tmp_path):
    """A dead promoter's entry whose heartbeat is an hour old is broken at first sight; one
    whose beat is recent is watched for the holder's TTL first (a live holder would beat)."""
    from flows.registry.promote import LOCK_SOURCE, PromotionLock

    uri = f"sqlite:///{tmp_path}/lock.db"
    client = MlflowClient(uri, registry_uri=uri)
    for name, age, ttl, least, most in [
        ("ganflow-old", 3600.0, 60.0, 0.0, 15.0),  # watched: 60 s
        ("ganflow-recent", 0.0, 1.5, 1.5, 15.0),
    ]:
        PromotionLock(client, name)._ensure_container()
        client.create_model_version(
            f"{name}.promotion-lock",
            LOCK_SOURCE,
            tags={"owner": "dead", "heartbeat": f"{time.time() - age:.3f}", "ttl_s": f"{ttl:g}"},
        )
        t0 = time.monotonic()
        with registry.promotion_lock(client, name, ttl_s=60.0, wait_s=20.0) as lk:
            took = time.monotonic() - t0
            lk.check()
        assert least <= took < most, (name, took)


def test_a_holder_is_judged_by_its_own_ttl(tmp_path):
    """A holds with a 6 s TTL and beats every 1.5 s; B, configured with a 0.5 s TTL, must wait
    for A rather than judge A's beats by B's own TTL and break a live lock."""
    uri = f"sqlite:///{tmp_path}/lock.db"
    client = MlflowClient(uri, registry_uri=uri)
    peak, events = _lock_race(
        client,
        "ganflow-lock-ttl",
        [
            ("A", 0.0, 4.0, {"ttl_s": 6.0, "wait_s": 30, "heartbeat_s": 1.5}),
            ("B", 0.3, 0.0, {"ttl_s": 0.5, "wait_s": 30}),
        ],
    )
    order = [(tag, what) for tag, what, _ in sorted(events, key=lambda e: e[2])]
    assert peak == 1 and order == [("A", "in"), ("A", "out"), ("B", "in"), ("B", "out")], events


def test_a_locked_database_neither_breaks_the_holder_nor_fails_the_contender(tmp_path):
    """Another writer holds the registry's SQLite file past MLflow's 20 s busy timeout while A
    holds the lock and B arrives: A's heartbeat and B's first registry call fail with a
    transient error (TEMPORARILY_UNAVAILABLE), not a missing entry. A must keep the lock and
    beat again after (a stopped one would be 20 s old); B must try again, then wait for A. Before, the first such error stopped
    A's heartbeat for good and B broke A's live lock one TTL later (a CI run on a loaded
    machine failed so, by SQLite's immediate 'database is locked' when two writers'
    transactions cross, which cannot be produced on cue; a lock held past the timeout can)."""
    import sqlite3

    db = tmp_path / "lock.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri, registry_uri=uri)
    name, beats = "ganflow-lock-busy", []

    def hold_the_file():
        time.sleep(1.0)  # A is inside by then
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        time.sleep(21.0)  # A's beat and B's call wait out the busy timeout and fail
        con.execute("COMMIT")
        con.close()

    def a_checks(lk):
        time.sleep(1.5)
        lk.check()
        beat = float(client.get_model_version(lk.lock, lk.version).tags["heartbeat"])
        beats.append(time.time() - beat)

    outage = threading.Thread(target=hold_the_file)
    outage.start()
    peak, events = _lock_race(
        client,
        name,
        [
            ("A", 0.0, 23.0, {"ttl_s": 5.0, "wait_s": 60, "heartbeat_s": 0.3}),
            ("B", 1.5, 0.0, {"ttl_s": 3.0, "wait_s": 60}),
        ],
        before_inside={"A": a_checks},
    )
    outage.join()
    order = [(tag, what) for tag, what, _ in sorted(events, key=lambda e: e[2])]
    assert peak == 1 and order == [("A", "in"), ("A", "out"), ("B", "in"), ("B", "out")], events
    assert beats and beats[0] < 3.0, "A's heartbeat did not resume after the outage"


def test_a_stalled_holder_cannot_release_its_successors_lock(tmp_path):
    """A stalls with no heartbeat past the TTL: B breaks A's entry (that entry only) and
    enters. A's late release must not delete B's entry (C, arriving while B is inside, has
    to wait and times out), and A, finding its lock gone, never enters."""
    uri = f"sqlite:///{tmp_path}/lock.db"
    client = MlflowClient(uri, registry_uri=uri)
    name = "ganflow-lock-stalled"
    peak, events = _lock_race(
        client,
        name,
        [
            ("A", 0.0, 2.0, {"ttl_s": 0.5, "wait_s": 20, "heartbeat_s": 3600}),
            ("B", 0.2, 3.0, {"ttl_s": 0.5, "wait_s": 20}),
            ("C", 2.5, 0.0, {"ttl_s": 5.0, "wait_s": 0.8}),
        ],
    )
    got = {tag: [w for t, w, _ in events if t == tag] for tag in "ABC"}
    assert peak == 1, events
    assert got["B"] == ["in", "out"]
    assert len(got["A"]) == 1 and "lost the promotion lock" in got["A"][0]
    assert len(got["C"]) == 1 and "timed out" in got["C"][0], "A's release deleted B's lock"
    lock = f"{name}.promotion-lock"
    assert not client.search_model_versions(f"name = '{lock}'")  # everyone cleaned up
    assert lock not in [m["name"] for m in registry.list_models(uri)]


# --- bad input to generate / serve / rollback (issue 16) -----------------------------------


def test_generate_serve_rollback_bad_input_is_one_line(store, env_uri, tmp_path, capsys):
    from flows.cli import main

    gan, cyc = store[1]["gan"][0], store[1]["cyclegan"][0]
    out = str(tmp_path / "x.png")
    cases = [
        (["generate", gan, "--n", "10000000", "--out", out], "--n must be between 1 and 1024"),
        (["generate", f"{gan}/999", "--out", out], "has no version 999"),
        (["generate", f"{gan}/0", "--out", out], "has no version 0"),
        (["generate", f"{gan}@", "--out", out], "nothing after '@'"),
        (["generate", gan, "--out", str(tmp_path)], "is a directory"),
        (["generate", cyc, "--label", "3", "--out", out], "--label is for conditional"),
        (["generate", "ganflow-none", "--out", out], "no registered model named"),
        (["generate", f"{gan}.promotion-lock", "--out", out], ""),
        (["serve", f"{gan}@nope", "--dry-run"], "has no alias 'nope'"),
        (["serve", gan, "--port", "70000", "--dry-run"], "--port must be in"),
        (["serve", gan, "--max-concurrency", "0", "--dry-run"], "--max-concurrency must be"),
        (["serve", gan, "--queue-timeout", "-1", "--dry-run"], "--queue-timeout must be"),
        (["rollback", f"{gan}/1"], "names a version or alias"),
        (["rollback", f"{gan}@champion"], "names a version or alias"),
    ]
    for argv, phrase in cases:
        t0 = time.perf_counter()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert phrase in err and len(err.splitlines()) == 1, (argv, err)
        assert "Traceback" not in err and "MlflowException" not in err, (argv, err)
        assert time.perf_counter() - t0 < 10, argv  # answered at once, never after a lock wait
    assert not (tmp_path / "x.png").exists()
    assert main(["serve", gan, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["url"].startswith("http://127.0.0.1:") and plan["model"].startswith(
        f"models:/{gan}/"
    )
    assert "flows.registry.serve_app:from_env" in plan["argv"]


def test_unreachable_server_is_named_in_seconds(monkeypatch, tmp_path, capsys):
    from flows.cli import main
    from flows.registry import models as models_mod

    models_mod._check_server.cache_clear()
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setenv("GANFLOW_PREFLIGHT_TIMEOUT_S", "2")
    for argv in (
        ["generate", "ganflow-gan-x", "--out", str(tmp_path / "x.png")],
        ["rollback", "ganflow-gan-x"],
        ["serve", "ganflow-gan-x", "--dry-run"],
    ):
        t0 = time.perf_counter()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert time.perf_counter() - t0 < 10, argv
        assert dead in err and "unreachable" in err and len(err.splitlines()) == 1, err
        assert "no registered model" not in err
    models_mod._check_server.cache_clear()


# --- MLflow's scoring server over HTTP ------------------------------------------------------


def _post(port: int, body, timeout: float = 60.0) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, text


@pytest.fixture(scope="module")
def server_procs(store, tmp_path_factory):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` per family, on
    127.0.0.1, started as soon as the champions exist: they boot (import torch and MLflow,
    load the model) while the tests that need no server run."""
    uri, models = store
    logs = tmp_path_factory.mktemp("serve-logs")
    # MLflow runs `uvicorn` from PATH: the venv's, as `ganflow serve` arranges.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    procs, ports = {}, {}
    for family, (name, _, _) in models.items():
        ports[family] = _free_port()
        log = open(logs / f"{family}.log", "wb")  # noqa: SIM115 (closed below)
        procs[family] = (
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "mlflow", "models", "serve"),
                    *("-m", f"models:/{name}@champion", "--env-manager", "local"),
                    *("-h", "127.0.0.1", "-p", str(ports[family]), "-w", "1"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(ROOT),
            ),
            log,
        )
    try:
        yield procs, ports, logs
    finally:
        for proc, log in procs.values():
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


@pytest.fixture(scope="module")
def servers(server_procs, store):
    procs, ports, logs = server_procs
    deadline = time.monotonic() + 300
    for family, port in ports.items():
        while True:
            proc = procs[family][0]
            if proc.poll() is not None:
                raise AssertionError(
                    f"{family} server exited: {(logs / f'{family}.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{family} server did not come up"
                time.sleep(0.5)
    return ports, store[1]


def _png_b64(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _assert_one_line_4xx(status, body, phrase: str) -> None:
    assert 400 <= status < 500, (status, body)
    text = json.dumps(body)
    assert phrase in text, body
    assert "Traceback" not in text and "stack_trace" not in text, body


def test_served_gan_answers_and_refuses_bad_requests(servers):
    ports, models = servers
    port, (_, cfg, _) = ports["gan"], models["gan"]
    s, ch = cfg.data.image_size, cfg.data.channels
    status, body = _post(port, {"inputs": {"n": 5, "seed": 3}})
    assert status == 200, body
    images = np.asarray(body["predictions"]["images"])
    assert images.shape == (5, ch, s, s) and images.min() >= -1 and images.max() <= 1
    again = np.asarray(_post(port, {"inputs": {"n": 5, "seed": 3}})[1]["predictions"]["images"])
    np.testing.assert_array_equal(images, again)  # the seed fixes the samples
    status, body = _post(port, {"inputs": {"n": 2}, "params": {"format": "png"}})
    assert status == 200
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(body["predictions"]["images"][0]))) as im:
        assert im.size == (s, s)
    _assert_one_line_4xx(*_post(port, b"{not json"), "")
    _assert_one_line_4xx(*_post(port, {"inputs": {"n": 100000}}), "n must be in [1, 1024]")
    _assert_one_line_4xx(*_post(port, {"inputs": {"n": 0}}), "n must be in")
    _assert_one_line_4xx(*_post(port, {"inputs": {"n": "many"}}), "")
    _assert_one_line_4xx(
        *_post(port, {"inputs": {"n": 2}, "params": {"format": "gif"}}), "params.format"
    )


def test_served_cgan_samples_are_classified_at_the_reported_rate(servers, judge):
    ports, models = servers
    port, (_, cfg, metrics) = ports["cgan"], models["cgan"]
    clf = judge[1].net
    k = cfg.model.num_classes
    # The evaluation's own request (labels in turn, seed 0) over HTTP: the same samples, so
    # the same figure the registry reported.
    labels = [i % k for i in range(cfg.eval.samples)]
    status, body = _post(port, {"inputs": {"labels": labels, "seed": 0}})
    assert status == 200, body
    images = torch.tensor(body["predictions"]["images"], dtype=torch.float32)
    with torch.no_grad():
        pred = clf(images).argmax(1)
    served = (pred == torch.tensor(labels)).float().mean().item()
    reported = metrics["class_accuracy"]
    assert served == pytest.approx(reported, abs=1e-3)
    # One label per request, fresh seeds: each label is drawn as itself about as often.
    per_label = {}
    for y in range(k):
        status, body = _post(port, {"inputs": {"labels": [y] * 40, "seed": 100 + y}})
        assert status == 200 and body["predictions"]["labels"] == [y] * 40
        x = torch.tensor(body["predictions"]["images"], dtype=torch.float32)
        with torch.no_grad():
            per_label[y] = (clf(x).argmax(1) == y).float().mean().item()
    mean = sum(per_label.values()) / k
    print(
        f"cgan class accuracy: reported {reported:.3f}, served (same request) {served:.3f}, "
        f"per label (fresh seeds) {mean:.3f}: {per_label}"
    )
    assert mean == pytest.approx(reported, abs=0.1)
    assert reported > 0.5  # a model that learned its labels, or the comparison says little
    _assert_one_line_4xx(*_post(port, {"inputs": {"labels": [3, 12]}}), "unknown label(s) [12]")
    _assert_one_line_4xx(*_post(port, {"inputs": {"labels": [-1]}}), "unknown label(s) [-1]")
    _assert_one_line_4xx(
        *_post(port, {"inputs": {"labels": list(range(10)) * 200}}), "between 1 and 1024"
    )
    _assert_one_line_4xx(*_post(port, {"inputs": {"seed": 1}}), "")


def test_served_cyclegan_translates_and_refuses_wrong_images(servers):
    ports, models = servers
    port, (_, cfg, _) = ports["cyclegan"], models["cyclegan"]
    s, ch = cfg.data.image_size, cfg.data.channels
    grey = ((np.arange(s * s).reshape(s, s) * 3) % 256).astype(np.uint8)
    body = {"inputs": {"images": [_png_b64(grey), np.zeros((ch, s, s)).tolist()]}}
    status, out = _post(port, body)
    assert status == 200, out
    images = np.asarray(out["predictions"]["images"])
    assert images.shape == (2, ch, s, s) and out["predictions"]["direction"] == "G"
    body["inputs"]["direction"] = "F"
    status, out = _post(port, body)
    assert status == 200 and out["predictions"]["direction"] == "F"
    assert not np.allclose(np.asarray(out["predictions"]["images"]), images)  # F is not G
    big = _png_b64(np.zeros((s * 2, s * 2), dtype=np.uint8))
    _assert_one_line_4xx(*_post(port, {"inputs": {"images": [big]}}), f"must be {ch} x {s} x {s}")
    rgb = _png_b64(np.zeros((s, s, 3), dtype=np.uint8))
    _assert_one_line_4xx(*_post(port, {"inputs": {"images": [rgb]}}), "has mode RGB")
    _assert_one_line_4xx(
        *_post(port, {"inputs": {"images": [np.zeros((3, s, s)).tolist()]}}), "must be 1 x"
    )
    _assert_one_line_4xx(*_post(port, {"inputs": {"images": ["@@notbase64"]}}), "base64")
    _assert_one_line_4xx(
        *_post(port, {"inputs": {"images": [_png_b64(grey)], "direction": "up"}}), "direction"
    )

"""Registry and promotion against a real MLflow (SQLite backend, local artifact store)."""

from __future__ import annotations

import copy
import importlib
import json
import threading
import time

import pytest
import torch
from mlflow import MlflowClient

from flows import registry
from gan_core.data import load_builtin
from gan_core.evaluate import sample
from gan_core.judge import load_or_train_judge
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import init_state, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    """An untrained and a trained MLP GAN: the trained one is clearly better (lower FD)."""
    cfg = apply_overrides(preset("gan"), {"train.steps": 400})
    data = load_builtin(cfg.data.dataset, cfg.data.image_size)
    untrained = init_state(cfg, data, "cpu")
    trained = train(init_state(apply_overrides(cfg, {"train.seed": 1}), data, "cpu"), data)
    return cfg, untrained.models, trained.models


@pytest.fixture(scope="module")
def medium(models):
    """Between the two: better than untrained, worse than the 400-step model."""
    cfg = apply_overrides(models[0], {"train.steps": 60})
    data = load_builtin(cfg.data.dataset, cfg.data.image_size)
    return train(init_state(cfg, data, "cpu"), data).models


@pytest.fixture(scope="module")
def judge(classifier_cache):
    heldout = load_builtin("builtin:digits", 16, "test")
    train = load_builtin("builtin:digits", 16, "train")
    return heldout, load_or_train_judge("builtin-digits-16", train, classifier_cache)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment(
        "registry-test", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    return uri, client, exp


def _alias(client, name, alias):
    return str(client.get_model_version_by_alias(name, alias).version)


def _register(mlflow_uri, cfg, nets, name):
    uri, client, exp = mlflow_uri
    run = client.create_run(exp)
    return registry.register(run.info.run_id, cfg, nets, name, {"fd": 1.0}, "snap-123", "test")


def test_promotion_rejection_and_rollback(mlflow_uri, models, judge):
    cfg, worse, better = models
    heldout, clf = judge
    name = registry.model_name("gan", "builtin:digits")
    assert name == "ganflow-gan-builtin-digits"
    client = mlflow_uri[1]

    v1 = _register(mlflow_uri, cfg, worse, name)
    d1 = registry.promote(name, v1, heldout, clf)
    assert d1.decision == "champion" and d1.champion is None

    v2 = _register(mlflow_uri, cfg, better, name)
    d2 = registry.promote(name, v2, heldout, clf, margin=1.0)
    assert d2.decision == "champion" and d2.champion_version == v1
    assert d2.candidate < d2.champion - 1.0  # lower Fréchet distance is better
    assert _alias(client, name, "champion") == v2

    v3 = _register(mlflow_uri, cfg, worse, name)
    d3 = registry.promote(name, v3, heldout, clf)
    assert d3.decision == "rejected"
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion.decision"] == "rejected"
    assert float(tags["eval.fd"]) == pytest.approx(d3.candidate, rel=1e-5)
    assert float(tags["eval.champion.fd"]) == pytest.approx(
        d2.candidate, rel=1e-5
    )  # same conditions, same figure
    assert "does not beat champion" in tags["promotion.reason"]
    assert _alias(client, name, "challenger") == v3
    assert _alias(client, name, "champion") == v2

    out = registry.rollback(name)
    assert out == {"name": name, "champion": v1, "demoted": v2}
    assert _alias(client, name, "champion") == v1
    assert client.get_model_version(name, v2).tags["promotion.rolled_back"] == "true"
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback(name)


def test_registered_generator_round_trips_weights_only(mlflow_uri, models):
    cfg, _, better = models
    name = "ganflow-gan-roundtrip"
    v = _register(mlflow_uri, cfg, better, name)
    mlflow_uri[1].set_registered_model_alias(name, "champion", v)
    for ref in (name, f"{name}@champion", f"{name}/{v}"):
        cfg2, nets, meta = registry.load_registered(ref)
        assert cfg2 == cfg and meta["snapshot_id"] == "snap-123" and meta["version"] == v
        torch.testing.assert_close(
            sample(cfg2, nets["G"], 16, seed=3), sample(cfg, better["G"], 16, seed=3)
        )
    with pytest.raises(registry.RegistryError, match="no alias 'nope'"):
        registry.load_registered(f"{name}@nope")
    with pytest.raises(registry.RegistryError, match="no registered model"):
        registry.load_registered("ganflow-missing")


def test_registering_leaves_mlflows_global_uri_alone(mlflow_uri, models, monkeypatch):
    """register() points MLflow's global client at the store for one call only: left set, it
    repointed every later MLflow call of the process (seen in the suite: a later module's runs
    landed in this store after its own MLFLOW_TRACKING_URI was gone)."""
    import mlflow

    cfg, _, better = models
    _register(mlflow_uri, cfg, better, "ganflow-gan-leak")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the caller moves on
    assert mlflow.get_tracking_uri() != mlflow_uri[0]


def test_version_carries_the_runs_best_step(mlflow_uri):
    """The best-step tags training puts on the logged model (and the run) are on the version;
    a run from before has none, and its version none either."""
    from flows.tracking import log_generator

    uri, client, exp = mlflow_uri
    cfg = preset("gan")
    nets = init_state(cfg, load_builtin(cfg.data.dataset, cfg.data.image_size), "cpu").models
    lineage = {
        "ganflow.best_step": "300",
        "ganflow.best_metric": "val_fd",
        "ganflow.best_value": "12.5",
    }
    name = "ganflow-gan-lineage"
    logged = client.create_run(exp).info.run_id  # the tags on its logged model only
    log_generator(uri, logged, cfg, nets, tags=lineage)
    tagged = client.create_run(exp, tags=lineage).info.run_id  # on the run only
    older = client.create_run(exp).info.run_id
    for run_id, want in ((logged, lineage), (tagged, lineage), (older, {})):
        v = registry.register(run_id, cfg, nets, name, {"fd": 1.0}, "snap-123", "test")
        tags = client.get_model_version(name, v).tags
        assert {k: tags[k] for k in lineage if k in tags} == want


def test_concurrent_promotions_end_consistent(mlflow_uri, models, medium, judge, monkeypatch):
    """Both candidates beat the champion; the better one must win whatever the timing.
    The worse one is made slow to evaluate, so without the lock it would read the old
    champion, lose the race in time and overwrite the better winner (checked: it does)."""
    cfg, worse, better = models
    heldout, clf = judge
    name = "ganflow-gan-race"
    base = _register(mlflow_uri, cfg, worse, name)
    registry.promote(name, base, heldout, clf)
    va = _register(mlflow_uri, cfg, better, name)
    vb = _register(mlflow_uri, cfg, medium, name)
    # The submodule, not the function the package re-exports under the same name.
    promote_mod = importlib.import_module("flows.registry.promote")

    real_eval = promote_mod.evaluate_version

    def slow_for_vb(client, n, version, *a, **k):
        if version == vb:
            time.sleep(1.5)
        return real_eval(client, n, version, *a, **k)

    monkeypatch.setattr(promote_mod, "evaluate_version", slow_for_vb)
    results, errors = {}, []

    def go(v, delay):
        try:
            time.sleep(delay)
            results[v] = registry.promote(name, v, heldout, clf)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=go, args=(vb, 0.0)),
        threading.Thread(target=go, args=(va, 0.3)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    client = mlflow_uri[1]
    assert _alias(client, name, "champion") == va  # the better one, by the rule
    assert results[va].decision == "champion"
    history = json.loads(client.get_registered_model(name).tags[registry.HISTORY_TAG])
    assert history == [base, vb]  # vb was champion briefly, then beaten: a consistent chain
    # The lock is a registered model marked ganflow.lock, holding no entry once both are done,
    # and ganflow's own listing leaves it out.
    lock = client.get_registered_model(f"{name}.promotion-lock")
    assert lock.tags["ganflow.lock"] and "not a model" in lock.description
    assert not client.search_model_versions(f"name = '{name}.promotion-lock'")
    assert [m["name"] for m in registry.list_models()] == [name]


@pytest.fixture(scope="module")
def cgans(trained_cgan):
    """A cGAN that has learnt its labels (conftest's, 700 steps: class accuracy 0.96), its
    collapsed twin (the noise's inputs zeroed: one image per label, class accuracy 1.00) and
    an untrained one (about chance)."""
    cfg, trained = trained_cgan
    data = load_builtin(cfg.data.dataset, cfg.data.image_size)
    untrained = init_state(cfg, data, "cpu").models
    collapsed = copy.deepcopy(trained)
    first = next(m for m in collapsed["G"].modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first.weight[:, : cfg.model.z_dim] = 0
    return cfg, trained, collapsed, untrained


def test_cgan_promotion_is_gated_and_ranks_collapse_below(mlflow_uri, cgans, judge):
    """A cGAN whose samples ignore their labels is never promoted, not even as the first
    version; one that draws one image per label passes the gate (its class accuracy is
    perfect) but loses on the intra-class distance to a trained one."""
    cfg, trained, collapsed, untrained = cgans
    heldout = load_builtin("builtin:digits", 16, "val")
    _, clf = judge
    client = mlflow_uri[1]
    name = "ganflow-cgan-gate"

    v1 = _register(mlflow_uri, cfg, untrained, name)
    d1 = registry.promote(name, v1, heldout, clf)
    assert d1.decision == "rejected" and d1.metric == "intra_fd"
    assert d1.reason.startswith(f"v{v1} fails the gate: class_accuracy")
    assert "\n" not in d1.reason
    tags = client.get_model_version(name, v1).tags
    assert float(tags["eval.class_accuracy"]) < float(tags["eval.class_accuracy_floor"])
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias(name, "champion")

    v2 = _register(mlflow_uri, cfg, trained, name)
    d2 = registry.promote(name, v2, heldout, clf)
    assert d2.decision == "champion" and d2.reason == "no champion yet"

    v3 = _register(mlflow_uri, cfg, collapsed, name)
    d3 = registry.promote(name, v3, heldout, clf)
    print(f"intra_fd: trained {d2.candidate:.1f}, collapsed {d3.candidate:.1f}")
    tags = client.get_model_version(name, v3).tags
    assert float(tags["eval.class_accuracy"]) >= 0.95  # the old headline would promote it
    assert d3.decision == "rejected" and "does not beat champion" in d3.reason
    assert d3.candidate > d3.champion  # lower is better
    assert _alias(client, name, "champion") == v2


def test_stale_lock_is_broken(mlflow_uri):
    client = mlflow_uri[1]
    client.create_registered_model("ganflow-x.promotion-lock", tags={"created": "0"})
    with registry.promotion_lock(client, "ganflow-x", ttl_s=1.0, wait_s=5.0):
        pass
    with pytest.raises(registry.RegistryError, match="timed out"):
        client.create_registered_model("ganflow-y.promotion-lock", tags={"created": "9e12"})
        with registry.promotion_lock(client, "ganflow-y", ttl_s=600, wait_s=0.5):
            pass


def test_generate_command_for_each_family(mlflow_uri, models, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from flows.cli import main

    cfg, _, better = models
    _register(mlflow_uri, cfg, better, "ganflow-gan-gen")
    assert (
        main(
            [
                "generate",
                "ganflow-gan-gen/1",
                "--n",
                "12",
                "--out",
                str(tmp_path / "g.npz"),
                "--json",
            ]
        )
        == 0
    )
    arrays = np.load(tmp_path / "g.npz", allow_pickle=False)
    assert arrays["images"].shape == (12, 1, 16, 16) and "labels" not in arrays

    ccfg = preset("cgan", "tiny")
    cdata = load_builtin(ccfg.data.dataset, ccfg.data.image_size)
    _register(mlflow_uri, ccfg, init_state(ccfg, cdata, "cpu").models, "ganflow-cgan-gen")
    assert (
        main(
            [
                "generate",
                "ganflow-cgan-gen/1",
                "--n",
                "5",
                "--label",
                "7",
                "--out",
                str(tmp_path / "c.npz"),
            ]
        )
        == 0
    )
    arrays = np.load(tmp_path / "c.npz", allow_pickle=False)
    assert arrays["labels"].tolist() == [7] * 5
    assert (
        main(["generate", "ganflow-cgan-gen/1", "--label", "12", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "--label must be one of" in capsys.readouterr().err

    ycfg = preset("cyclegan", "tiny")
    ydata = load_builtin(ycfg.data.dataset, ycfg.data.image_size)
    _register(mlflow_uri, ycfg, init_state(ycfg, ydata, "cpu").models, "ganflow-cyclegan-gen")
    src = tmp_path / "digit.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(src)
    assert (
        main(
            [
                "generate",
                "ganflow-cyclegan-gen/1",
                "--input",
                str(src),
                "--out",
                str(tmp_path / "t.png"),
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "t.png") as im:
        assert im.size[0] > im.size[1]  # input and translation side by side
    assert main(["generate", "ganflow-cyclegan-gen/1", "--out", str(tmp_path / "t2.png")]) == 2
    assert "pass --input" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert (
        main(
            [
                "generate",
                "ganflow-cyclegan-gen/1",
                "--input",
                str(tmp_path / "bad.png"),
                "--out",
                str(tmp_path / "t3.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cannot decode input image" in err and "Traceback" not in err
    assert not (tmp_path / "t3.png").exists()

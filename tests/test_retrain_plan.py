"""What a retraining decides before it trains (issue 21), without services: keep or train
from the registered lineage, warm or scratch and why, and a warm start that really starts
from the champion's networks, moments and averages while keeping its own schedule."""

from __future__ import annotations

import pytest
import torch

from flows.orchestration.lineage import (
    Lineage,
    RetrainConfig,
    RetrainError,
    choose_start,
    code_digest,
    config_digest,
    finetune_config,
    plan_family,
    warm_fit,
)
from flows.orchestration.retraining import PipelineConfig, PipelineError
from gan_core.data import load_builtin
from gan_core.overrides import apply_overrides
from gan_core.presets import preset
from gan_core.train import init_state, plain, state_dict, train, warm_start


def _lineage(alias="champion", version="3", snapshot="s1", digest="d1", code=None) -> Lineage:
    code = code_digest() if code is None else code
    return Lineage(alias, version, "run3", snapshot, digest, code, "/ckpt/3")


def test_keep_only_when_snapshot_config_and_code_all_match():
    champ = _lineage()
    kept = plan_family(champ, None, "s1", "d1", force=False)
    assert kept.action == "keep" and kept.kept is champ
    assert kept.why == "champion v3 already trained on snapshot s1 with this config"
    assert plan_family(champ, None, "s1", "d1", force=True).why == "--force"
    for snapshot, digest, code, why in [
        ("s2", "d1", None, "snapshot s1 -> s2"),
        ("s1", "d2", None, "config changed"),
        ("s1", "d1", "other", "gan_core code changed"),
    ]:
        c = _lineage(code=code) if code else champ
        plan = plan_family(c, None, snapshot, digest, force=False)
        assert plan.action == "train" and plan.why == why
    # No lineage recorded (registered by hand, or by an older ganflow): never a match.
    bare = Lineage("champion", "1", "r", "s1", "", "", "")
    assert plan_family(bare, None, "s1", "", force=False).action == "train"
    assert plan_family(None, None, "s1", "d1", force=False).why == "no champion yet"


def test_a_candidate_that_already_lost_on_this_data_is_not_trained_again():
    champ = _lineage(snapshot="s0")
    lost = _lineage("challenger", "4", "s1", "d1")
    plan = plan_family(champ, lost, "s1", "d1", force=False)
    assert plan.action == "keep"
    assert plan.why.startswith("challenger v4 already trained on snapshot s1") and "v3" in plan.why


def test_choose_start_modes_and_reasons():
    plan = plan_family(_lineage(snapshot="s0"), None, "s1", "d1", force=False)
    champ = _lineage(snapshot="s0")
    warm = choose_start(plan, champ, "auto", lambda c: None)
    assert (warm.start, warm.warm_from, warm.start_why) == ("warm", champ, "from champion v3")
    s = choose_start(plan, champ, "scratch", lambda c: pytest.fail("not asked"))
    assert (s.start, s.start_why) == ("scratch", "retrain.mode is scratch")
    s = choose_start(plan, champ, "auto", lambda c: "its G has other shapes (model.hidden)")
    assert (s.start, s.start_why) == ("scratch", "its G has other shapes (model.hidden)")
    assert choose_start(plan, None, "auto", None).start_why == "there is no champion to start from"
    with pytest.raises(RetrainError, match="retrain.mode is warm but its G has other shapes"):
        choose_start(plan, champ, "warm", lambda c: "its G has other shapes")


def test_retrain_section_is_validated_in_the_pipeline_config():
    assert PipelineConfig().retrain == RetrainConfig("auto", None)
    pc = PipelineConfig(retrain={"mode": "warm", "finetune_steps": 300})
    assert pc.retrain.mode == "warm" and pc.retrain.steps_for(preset("gan")) == 300
    assert PipelineConfig().retrain.steps_for(preset("gan")) == preset("gan").train.steps // 4
    for bad, msg in [
        ({"mode": "hot"}, "retrain.mode: must be one of auto, warm, scratch"),
        ({"finetune_steps": 0}, "retrain.finetune_steps: must be an integer >= 1"),
        ({"steps": 5}, "retrain: unknown keys"),
        ("warm", "retrain: must be a mapping"),
    ]:
        with pytest.raises(PipelineError, match=msg):
            PipelineConfig(retrain=bad)


def test_config_digest_follows_config_and_pipeline_settings():
    cfg = preset("gan")
    assert config_digest(cfg, workers=1) == config_digest(cfg, workers=1)
    assert config_digest(cfg, workers=1) != config_digest(cfg, workers=2)
    other = apply_overrides(cfg, {"train.d_steps": 2})
    assert config_digest(cfg, workers=1) != config_digest(other, workers=1)
    assert len(code_digest()) == 12
    # The snapshot is compared on its own: a new one alone does not change the digest.
    moved = apply_overrides(cfg, {"data.dataset": "another-snapshot"})
    assert config_digest(moved, workers=1) == config_digest(cfg, workers=1)


def test_finetune_config_keeps_evaluations_inside_the_shorter_run():
    cfg = finetune_config(preset("gan"), 500)
    assert (cfg.train.steps, cfg.train.log_every, cfg.eval.every) == (500, 100, 100)
    cfg = finetune_config(preset("gan"), 2000)
    assert (cfg.train.steps, cfg.eval.every) == (2000, 200)
    short = finetune_config(apply_overrides(preset("gan"), {"train.log_every": 100}), 30)
    assert short.train.steps == 30 and short.train.log_every == 30 and short.eval.every == 30


def _tiny(family="gan", **over):
    cfg = apply_overrides(preset(family, "tiny"), {"train.device": "cpu", **over})
    return cfg


@pytest.mark.parametrize("family", ["gan", "cyclegan"])
def test_warm_start_loads_networks_moments_and_averages_not_the_schedule(family):
    split = "train"
    data = load_builtin(
        "builtin:digits" if family == "gan" else "builtin:digits-unpaired", 16, split
    )
    champ_cfg = _tiny(family, **{"train.ema_half_life": 100, "optim.decay_start": 0.0})
    champ = init_state(champ_cfg, data, "cpu")
    train(champ, data)  # the schedule decays the champion's lr to 0 by its last step
    assert champ.opt_g.param_groups[0]["lr"] == 0.0
    sd = state_dict(champ)
    cand_cfg = _tiny(family, **{"train.ema_half_life": 100, "train.seed": 7})
    assert warm_fit(cand_cfg, sd) is None
    cand = init_state(cand_cfg, data, "cpu")
    warm_start(cand, sd)
    assert cand.step == 0
    for k, net in cand.models.items():  # step 0: the champion's parameters, exactly
        for (n, p), q in zip(plain(net).named_parameters(), champ.models[k].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{k}.{n}")
    for k, avg in cand.ema.items():
        torch.testing.assert_close(avg.state_dict(), champ.ema[k].state_dict(), rtol=0, atol=0)
    first = next(iter(cand.opt_g.state.values()))
    torch.testing.assert_close(
        first["exp_avg"], next(iter(champ.opt_g.state.values()))["exp_avg"], rtol=0, atol=0
    )
    # Its own learning rate, not the champion's decayed one; and it trains from there.
    assert cand.opt_g.param_groups[0]["lr"] == cand_cfg.optim.lr_g
    train(cand, data, until=2)
    assert cand.step == 2


def test_warm_fit_names_what_changed_shape():
    data = load_builtin("builtin:digits", 16, "train")
    sd = state_dict(init_state(_tiny(), data, "cpu"))
    why = warm_fit(_tiny(**{"model.hidden": 48}), sd)
    assert why is not None and "model.hidden 32 -> 48" in why and "other shapes" in why
    assert warm_fit(_tiny("cgan"), sd) == "the champion is a gan model"


def test_summary_and_retraining_run_show_kept_trained_and_unmeasured(tmp_path, monkeypatch):
    from dataclasses import replace

    from flows.orchestration.retraining import FamilyOutcome, summary_markdown
    from flows.registry.promote import ChampionMeasure, Decision
    from flows.tracking import RETRAINING_EXPERIMENT, client, log_retraining

    why = "champion v3 already trained on snapshot s1 with this config"
    kept = FamilyOutcome("gan", "s1", "m-gan", why, "kept", version="3")
    reason = "fd 30 beats champion v3 41 by more than 0 (min)"
    promotion = Decision("m-cgan", "4", "champion", "fd", 30.0, 41.0, "3", 0.0, reason)
    figures = {"fd": 41.0, "coverage": 0.8}
    measured = ChampionMeasure("3", "fd", "min", 41.0, 35.5, figures)
    warm = FamilyOutcome(
        "cgan", "s2", "m-cgan", "snapshot s1 -> s2", "champion",
        start="warm", start_why="from champion v3", version="4", run_id="r4",
        promotion=promotion, warm_from="3",
        champion_on_snapshot=measured,
    )  # fmt: skip
    broken = replace(warm, family="cyclegan", champion_on_snapshot=ChampionMeasure(error="E: x"))
    md = summary_markdown([kept, warm, broken], "sqlite:///x", "rr")
    assert "| gan | m-gan | **kept** |" in md and "- gan: kept: champion v3 already" in md
    assert "| warm from v3 | 4 | fd | 30 | 41 (v3) | 41 (v3; at promotion 35.5) |" in md
    assert "not measured (E: x)" in md and "run rr in ganflow-retraining" in md
    kept, warm, broken = (r.to_dict() for r in (kept, warm, broken))  # MLflow's edge: dicts
    assert list(kept) == [
        *("family", "snapshot_id", "name", "why", "decision", "start", "start_why", "version"),
        *("run_id", "run_name", "metrics", "promotion", "warm_from", "champion_on_snapshot"),
        "search",
    ]  # `ganflow run --json`'s keys, in their order (no seconds: decided without a chain)
    assert broken["champion_on_snapshot"] == {"error": "E: x", "figures": {}}
    assert list(warm["champion_on_snapshot"]) == [
        *("version", "metric", "mode", "value", "at_promotion", "figures")
    ]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("GANFLOW_HOME", str(tmp_path))
    first = log_retraining(uri, [kept, warm, broken])
    second = log_retraining(uri, [warm])
    c = client(uri)
    run = c.get_run(first)
    assert run.data.tags["gan.decision"] == "kept" and run.data.tags["cgan.start"] == "warm"
    assert run.data.metrics["cgan.champion.val_fd"] == 41.0
    assert run.data.metrics["cgan.candidate.val_fd"] == 30.0
    assert run.data.tags["cyclegan.champion_error"] == "E: x"
    # One run per retraining, the step its sequence number: a series across runs.
    assert [m.step for m in c.get_metric_history(second, "cgan.champion.val_fd")] == [1]
    exp = c.get_experiment_by_name(RETRAINING_EXPERIMENT)
    assert len(c.search_runs([exp.experiment_id])) == 2


def test_warm_start_carries_adas_p_not_its_draws():
    """With ADA, D was trained against reals augmented at the champion's p; the candidate
    starts from that p (a fresh p of 0 changes what D sees at once), with its own draws."""
    data = load_builtin("builtin:digits", 16, "train")
    conv = {"model.arch": "conv", "model.ngf": 8, "model.ndf": 8}
    over = {**conv, "augment.policy": "translation", "augment.ada": True}
    champ = init_state(_tiny("gan", **over), data, "cpu")
    champ.augment.p.fill_(0.7)
    sd = state_dict(champ)
    cand = init_state(_tiny("gan", **over, **{"train.seed": 7}), data, "cpu")
    assert float(cand.augment.p) == 0.0  # ADA starts from p = 0
    draws = cand.augment.generator.get_state()
    warm_start(cand, sd)
    assert float(cand.augment.p) == pytest.approx(0.7)
    assert torch.equal(cand.augment.generator.get_state(), draws)
    # A fixed p (no ADA) is the candidate's config's, whatever the champion's was.
    fixed_p = {**conv, "augment.policy": "translation", "augment.p": 0.2}
    fixed = init_state(_tiny("gan", **fixed_p), data, "cpu")
    warm_start(fixed, sd)
    assert float(fixed.augment.p) == pytest.approx(0.2)

"""What a retraining decides before it trains anything, from the registry alone.

A family is **kept** (no Ray job, no new version) when the current champion, or the latest
candidate that lost to it (alias ``challenger``), was trained on the same snapshot with the
same effective config by the same gan_core code: training again would register the same
model. Otherwise it is trained, and it **starts** warm (from the champion's last checkpoint:
G, D, the optimisers' moments, the moving averages) or from scratch, by ``retrain.mode``:

- ``scratch``: always from random weights;
- ``warm``: from the champion, and an error when there is none or it does not fit;
- ``auto`` (default): warm when the champion's networks have the shapes the new config
  builds, scratch otherwise, with the reason.

The lineage a version carries (tags written at registration by the retraining pipeline):
``ganflow.snapshot_id``, ``ganflow.config_digest`` (the requested config, before a warm
start shortens it to ``retrain.finetune_steps``), ``ganflow.code_digest`` (gan_core's source),
``ganflow.checkpoint`` (the run's last Ray checkpoint, what a warm start reads) and, for a
warm-started candidate, ``ganflow.warm_from`` (the champion version and run it started from).
A version registered without them (by an older ganflow) is never taken to match: it is
retrained, from scratch unless its run's checkpoint is recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gan_core.config import ConfigError, GanConfig

CONFIG_DIGEST_TAG = "ganflow.config_digest"
CODE_DIGEST_TAG = "ganflow.code_digest"
CHECKPOINT_TAG = "ganflow.checkpoint"
WARM_FROM_TAG = "ganflow.warm_from"
WARM_FROM_RUN_TAG = "ganflow.warm_from_run"
MODES = ("auto", "warm", "scratch")


class RetrainError(ValueError):
    """A retraining cannot start as asked (``retrain.mode: warm`` without a usable
    champion); one line."""


@dataclass(frozen=True)
class RetrainConfig:
    """The pipeline's ``retrain:`` section (pipeline-only: a training run never reads it)."""

    mode: str = "auto"
    """warm | scratch | auto: where a candidate starts when the data or config changed."""
    finetune_steps: int | None = None
    """Iterations of a warm-started candidate; null: a quarter of the config's
    ``train.steps`` (the README's measurement: warm reaches the champion's figure in a
    fraction of that)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RetrainError(
                f"retrain.mode: must be one of {', '.join(MODES)}, got {self.mode!r}"
            )
        n = self.finetune_steps
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise RetrainError(f"retrain.finetune_steps: must be an integer >= 1, got {n!r}")

    @classmethod
    def from_mapping(cls, raw) -> RetrainConfig:
        if isinstance(raw, RetrainConfig):
            return raw
        if not isinstance(raw, dict):
            raise RetrainError(f"retrain: must be a mapping (mode, finetune_steps), got {raw!r}")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise RetrainError(f"retrain: unknown keys {unknown}; known: mode, finetune_steps")
        return cls(**raw)

    def steps_for(self, cfg: GanConfig) -> int:
        return self.finetune_steps or max(1, cfg.train.steps // 4)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """gan_core's source, hashed (12 hex digits): any change to the models, losses, loop or
    metrics makes the champion's training stale. About a millisecond."""
    import gan_core

    h = hashlib.sha256()
    for path in sorted(Path(gan_core.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def config_digest(cfg: GanConfig, **pipeline) -> str:
    """The effective config and the pipeline's settings that change what is trained
    (workers: the global batch; the search). ``data.dataset`` is left out: it names the
    snapshot, which is compared on its own (so a new snapshot alone is not "config
    changed")."""
    flat = {k: v for k, v in cfg.to_flat_dict().items() if k != "data.dataset"}
    payload = {"config": flat, "pipeline": pipeline}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Lineage:
    """A registered version as the retraining reads it."""

    alias: str
    version: str
    run_id: str
    snapshot_id: str
    config_digest: str
    code_digest: str
    checkpoint: str
    reason: str = ""
    """promotion.reason (why a challenger lost)."""

    def same_training(self, snapshot_id: str, cfg_digest: str, code: str) -> bool:
        return bool(self.config_digest) and (
            self.snapshot_id,
            self.config_digest,
            self.code_digest,
        ) == (
            snapshot_id,
            cfg_digest,
            code,
        )


def read_lineage(client, name: str, alias: str) -> Lineage | None:
    """The version under alias, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    t = mv.tags or {}
    return Lineage(
        alias=alias,
        version=str(mv.version),
        run_id=mv.run_id or "",
        snapshot_id=t.get("ganflow.snapshot_id", ""),
        config_digest=t.get(CONFIG_DIGEST_TAG, ""),
        code_digest=t.get(CODE_DIGEST_TAG, ""),
        checkpoint=t.get(CHECKPOINT_TAG, ""),
        reason=t.get("promotion.reason", ""),
    )


@dataclass(frozen=True)
class Plan:
    """What the pipeline does for one family: keep, or train from scratch or warm."""

    action: str  # "keep" | "train"
    why: str
    """Why kept, or what changed since the champion."""
    start: str = "scratch"  # "warm" | "scratch"
    start_why: str = ""
    warm_from: Lineage | None = None
    kept: Lineage | None = None
    """The version that already holds this training (champion or challenger)."""


def what_changed(champion: Lineage | None, snapshot_id: str, cfg_digest: str, code: str) -> str:
    if champion is None:
        return "no champion yet"
    if not champion.config_digest:
        return f"champion v{champion.version} has no lineage tags"
    changed = []
    if champion.snapshot_id != snapshot_id:
        changed.append(f"snapshot {champion.snapshot_id[:12]} -> {snapshot_id[:12]}")
    if champion.config_digest != cfg_digest:
        changed.append("config changed")
    if champion.code_digest != code:
        changed.append("gan_core code changed")
    return ", ".join(changed) or "forced"


def plan_family(
    champion: Lineage | None,
    challenger: Lineage | None,
    snapshot_id: str,
    cfg_digest: str,
    force: bool,
) -> Plan:
    """Keep or train one family (where a candidate starts is :func:`choose_start`)."""
    code = code_digest()
    if not force:
        for held, what in ((champion, "champion"), (challenger, "challenger")):
            if held is not None and held.same_training(snapshot_id, cfg_digest, code):
                why = f"{what} v{held.version} already trained on snapshot {snapshot_id[:12]} with this config"
                if what == "challenger" and champion is not None:
                    why += f" and lost to champion v{champion.version}"
                return Plan("keep", why, kept=held)
    why = "--force" if force else what_changed(champion, snapshot_id, cfg_digest, code)
    return Plan("train", why)


def choose_start(plan: Plan, champion: Lineage | None, mode: str, fits) -> Plan:
    """Warm or scratch for a candidate about to be trained. ``fits(champion) -> str | None``:
    why the champion's networks cannot start it (None: they can); called only when a warm
    start is wanted. ``mode`` warm with no usable champion is an error, not a fallback."""
    if mode == "scratch":
        return dataclasses.replace(plan, start="scratch", start_why="retrain.mode is scratch")
    problem = "there is no champion to start from" if champion is None else fits(champion)
    if problem is None:
        return dataclasses.replace(
            plan, start="warm", start_why=f"from champion v{champion.version}", warm_from=champion
        )
    if mode == "warm":
        raise RetrainError(f"retrain.mode is warm but {problem}")
    return dataclasses.replace(plan, start="scratch", start_why=problem)


def warm_fit(cfg: GanConfig, sd: dict) -> str | None:
    """Why a checkpoint's state dict cannot start a run of cfg (None: it can): another
    family, or networks of other shapes (the config fields that differ are named)."""
    from gan_core.models import build_models

    old = sd.get("config") or {}
    if old.get("family") != cfg.family:
        return f"the champion is a {old.get('family')} model"
    try:
        built = build_models(cfg)
    except ConfigError as exc:  # pragma: no cover - cfg was validated before
        return str(exc)
    for key, net in built.items():
        have = sd.get("models", {}).get(key)
        want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in (have or {}).items()}
        if want != got:
            new = cfg.to_flat_dict()
            fields = [
                f"{k} {old.get(k)!r} -> {new[k]!r}"
                for k in sorted(new)
                if k.split(".")[0] in ("model", "data")
                and k != "data.dataset"
                and old.get(k) != new[k]
            ]
            return f"its {key} has other shapes ({', '.join(fields) or 'architecture changed'})"
    return None


def finetune_config(cfg: GanConfig, steps: int) -> GanConfig:
    """cfg shortened to ``steps`` iterations, with ten evaluations on val as the presets
    set them (at log points), so the best step is still chosen."""
    from gan_core.overrides import apply_overrides

    log_every = min(cfg.train.log_every, steps)
    every = max(log_every, steps // 10 // log_every * log_every)
    return apply_overrides(
        cfg, {"train.steps": steps, "train.log_every": log_every, "eval.every": every}
    )

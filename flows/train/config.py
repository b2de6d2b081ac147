"""The command line's config for a training job: preset < snapshot facts < --config FILE <
--set, built on a snapshot its caller resolved (flows.orchestration.inputs)."""

from __future__ import annotations

from collections.abc import Mapping

from flows.settings import read_yaml_mapping
from flows.snapshots.manifest import Manifest
from flows.train.spec import TrainError
from gan_core.config import GanConfig

# --- command line ---------------------------------------------------------------------------


def user_overrides(config_file: str | None, overrides: list[str]) -> dict[str, object]:
    """--config FILE (flat or nested JSON/YAML key: value) < --set key=value, as
    {'section.field': value} with leaf names resolved (unknown keys fail here)."""
    from gan_core.overrides import normalise_overrides, parse_pairs

    flat: dict[str, object] = {}
    if config_file:
        flat = _flatten(read_yaml_mapping(config_file, "--config file", TrainError))
    # --set after the file: for one field written two ways, the later (--set) one wins.
    return normalise_overrides({**flat, **parse_pairs(overrides)})


def requested_image_size(user: Mapping[str, object]) -> int | None:
    """The image size the user's overrides ask for: a source is ingested at it."""
    size = user.get("data.image_size")
    return int(size) if size is not None else None


def build_config(
    family: str, user: Mapping[str, object], manifest: Manifest
) -> tuple[GanConfig, bool]:
    """The config for family on a snapshot: the preset for its image size, its facts, then
    the user's overrides (:func:`user_overrides`). Returns it and whether the user set
    train.precision (else GPUs default to bf16)."""
    from flows.train.data_config import config_for_snapshot

    return config_for_snapshot(family, manifest, dict(user)), "train.precision" in user


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out

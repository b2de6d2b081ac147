"""The command line's config for a training job: preset < snapshot facts < --config FILE <
--set, built after the dataset reference is resolved into a snapshot."""

from __future__ import annotations

from flows.ingest.resolve import ensure_snapshot
from flows.settings import read_yaml_mapping, snapshot_root
from flows.train.spec import TrainError
from gan_core.config import DEFAULT_DATASET, GanConfig

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


def build_config(
    family: str, config_file: str | None, overrides: list[str], dataset: str | None = None
) -> tuple[GanConfig, bool]:
    """The config for family on a dataset (default: the family's built-in): the preset for
    the snapshot's image size, the snapshot's facts, --config FILE, then --set. Returns it
    and whether the user set train.precision (else GPUs default to bf16). Resolves the
    dataset on this machine (a built-in is ingested), before any Ray work."""
    from flows.train.data_config import config_for_snapshot

    user = user_overrides(config_file, overrides)
    ref = dataset or DEFAULT_DATASET[family]
    size = user.get("data.image_size")
    manifest = ensure_snapshot(ref, snapshot_root(), int(size) if size is not None else None)
    return config_for_snapshot(family, manifest, user), "train.precision" in user


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out

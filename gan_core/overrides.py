"""Configs from text: flat dicts (MLflow params, checkpoints, packages) read back, and the
command line's ``key=value`` overrides, where a leaf name (``d_steps``) stands for its
dotted field (``train.d_steps``) when unambiguous. Values are parsed to the field's type."""

from __future__ import annotations

import dataclasses
import types
import typing

from gan_core.config import _SECTIONS, ConfigError, GanConfig, _field_type_owner, _is_int

# Keys a flat config written before they existed lacks, with the values that rebuild the
# networks it describes: packages registered by older versions still load.
_BEFORE_0_9 = {
    "model.g_layout": "wide",
    "model.spectral_norm": False,
    "model.conditioning": "concat",
    "model.d_batchnorm": False,
}


def _field_type(section: str, name: str) -> type:
    hints = typing.get_type_hints(_field_type_owner(section))
    t = hints[name]
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _coerce(key: str, t: type, value: object) -> object:
    if not isinstance(value, str):
        if t is float and _is_int(value):
            return float(value)
        return value
    try:
        if t is int:
            return int(value)
        if t is float:
            return float(value)
        if t is bool:
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
    except ValueError:
        raise ConfigError(f"{key}: expected {t.__name__}, got {value!r}") from None
    return value


def replace_fields(cfg: GanConfig, values: dict[str, object]) -> GanConfig:
    """A new, re-validated config with {'section.name': value} set ('family' too); string
    values are parsed to the field's type. Leaf names and key=value lists:
    :func:`gan_core.overrides.apply_overrides`."""
    family = str(values.get("family", cfg.family))
    sections: dict[str, dict] = {s: {} for s in _SECTIONS}
    for key, value in values.items():
        if key == "family":
            continue
        if key == "preset":
            raise ConfigError(
                "preset: chosen when the config is built for a dataset (ganflow train, tune, "
                "run: --set preset=NAME); set the preset's fields here instead"
            )
        section, _, name = key.partition(".")
        known = section in _SECTIONS and name in {
            f.name for f in dataclasses.fields(_field_type_owner(section))
        }
        if not known:
            raise ConfigError(f"{key}: unknown config field")
        sections[section][name] = _coerce(key, _field_type(section, name), value)
    kwargs = {s: dataclasses.replace(getattr(cfg, s), **sections[s]) for s in _SECTIONS}
    return GanConfig(family=family, **kwargs)


def from_flat_dict(flat: dict[str, object]) -> GanConfig:
    """Inverse of GanConfig.to_flat_dict; values may be strings (as MLflow returns params).
    A flat dict written by an older version gets the values that rebuild its networks."""
    flat = dict(flat)
    if "model.g_layout" not in flat:
        flat = {**_BEFORE_0_9, **flat}
    return replace_fields(GanConfig(), flat)


def resolve_key(key: str) -> tuple[str, str]:
    """'d_steps' or 'train.d_steps' -> ('train', 'd_steps'); unknown/ambiguous keys fail."""
    if "." in key:
        section, _, name = key.partition(".")
        if section in _SECTIONS and name in {
            f.name for f in dataclasses.fields(_field_type_owner(section))
        }:
            return section, name
        raise ConfigError(f"{key}: unknown config field")
    matches = [
        (s, key)
        for s in _SECTIONS
        if key in {f.name for f in dataclasses.fields(_field_type_owner(s))}
    ]
    if not matches:
        raise ConfigError(f"{key}: unknown config field")
    if len(matches) > 1:
        raise ConfigError(
            f"{key}: ambiguous, use one of {', '.join(f'{s}.{n}' for s, n in matches)}"
        )
    return matches[0]


def parse_pairs(items: list[str]) -> dict[str, object]:
    """The command line's ['d_steps=3', 'train.steps=500'] as {'d_steps': '3', ...}."""
    pairs: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item}: overrides must look like key=value")
        pairs[key.strip()] = value.strip()
    return pairs


def normalise_overrides(overrides: dict[str, object] | list[str]) -> dict[str, object]:
    """key=value list or dict -> {'section.name': value} with leaf names resolved (unknown or
    ambiguous keys fail here); 'family' is dropped (the family is chosen elsewhere);
    'preset' is kept as it is: the config built for a dataset starts from that preset
    (:func:`gan_core.presets.config_for_data`)."""
    if isinstance(overrides, list):
        overrides = parse_pairs(overrides)
    out: dict[str, object] = {}
    for key, value in overrides.items():
        if key == "family":
            continue
        if key == "preset":
            out[key] = value
            continue
        section, name = resolve_key(key)
        out[f"{section}.{name}"] = value
    return out


def apply_overrides(cfg: GanConfig, overrides: dict[str, object] | list[str]) -> GanConfig:
    """Return a new, re-validated config with overrides applied.

    overrides: {'train.d_steps': 3} or ['d_steps=3', 'lambda_cyc=10', 'family=cgan'].
    """
    values = normalise_overrides(overrides)
    if isinstance(overrides, dict) and "family" in overrides:
        values["family"] = overrides["family"]
    elif isinstance(overrides, list):
        family = parse_pairs(overrides).get("family")
        if family is not None:
            values["family"] = family
    return replace_fields(cfg, values)

"""Search spaces over config fields (λ, k and any other): defaults per family, files, validation
against a base config, and Ray Tune's form."""

from __future__ import annotations

import math

from flows.settings import read_yaml_mapping
from gan_core.config import ConfigError, GanConfig
from gan_core.overrides import apply_overrides, resolve_key

SEARCHER_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
PBT_SCHEDULERS = ("pbt", "pb2")
SCHEDULERS = ("asha", "fifo", *PBT_SCHEDULERS)


class SearchError(ValueError):
    """The search cannot run as asked; one line for the command line."""


def default_space(family: str) -> dict[str, dict]:
    """λ on a grid like the paper's neighbourhood (CycleGAN only), k over {1, 2, 3, 5}."""
    if family == "cyclegan":
        return {
            "loss.lambda_cyc": {"grid": [1.0, 3.0, 10.0, 30.0]},
            "train.d_steps": {"choice": [1, 2, 3, 5]},
        }
    return {"train.d_steps": {"grid": [1, 2, 3, 5]}}


def load_space(path: str | None, family: str) -> dict[str, dict]:
    if not path:
        return default_space(family)
    raw = read_yaml_mapping(path, "search space file", SearchError)
    if not raw:
        raise SearchError(f"search space file {path} must map config fields to {{kind: values}}")
    return raw


def validate_space(space: dict[str, dict], base: GanConfig) -> dict[str, dict]:
    """Normalise names to dotted form and check every value/bound against the config's own
    validation, before anything runs. Returns {dotted_name: {kind: values}}."""
    out: dict[str, dict] = {}
    for key, spec in space.items():
        try:
            section, name = resolve_key(key)
        except ConfigError as exc:
            raise SearchError(f"search space: {exc}") from None
        dotted = f"{section}.{name}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCHER_KINDS:
            raise SearchError(
                f"search space: {dotted}: expected one of {{{', '.join(SEARCHER_KINDS)}: ...}}, got {spec!r}"
            )
        kind, values = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                raise SearchError(f"search space: {dotted}: {kind} needs a non-empty list")
            probes = values
        else:
            if not (
                isinstance(values, list)
                and len(values) == 2
                and all(isinstance(v, (int, float)) for v in values)
                and values[0] < values[1]
            ):
                raise SearchError(
                    f"search space: {dotted}: {kind} needs [low, high] with low < high"
                )
            if kind == "loguniform" and values[0] <= 0:
                raise SearchError(f"search space: {dotted}: loguniform needs low > 0")
            is_int = _is_int(getattr(getattr(base, section), name))
            if kind != "randint" and is_int:
                # Every draw would be a float the integer field refuses: every trial would fail.
                raise SearchError(
                    f"search space: {dotted} is an integer field; {kind} draws floats "
                    "(use randint, grid or choice)"
                )
            if kind == "randint" and not all(_is_int(v) for v in values):
                raise SearchError(f"search space: {dotted}: randint needs integer [low, high]")
            # randint's high is exclusive: probe the values a trial can really draw.
            probes = [values[0], values[1] - 1] if kind == "randint" else values
        for v in probes:
            try:
                apply_overrides(base, {dotted: v})
            except ConfigError as exc:
                raise SearchError(f"search space: {exc}") from None
        out[dotted] = {kind: values}
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def to_tune_space(space: dict[str, dict]) -> dict:
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {
        name: make[kind](values) for name, spec in space.items() for kind, values in spec.items()
    }


def count_trials(space: dict[str, dict], samples: int) -> int:
    grid = math.prod(len(v) for s in space.values() for k, v in s.items() if k == "grid")
    return grid * samples


def check_pbt_args(*, quantile: float, resample_probability: float) -> None:
    if not isinstance(quantile, (int, float)) or not 0 < quantile <= 0.5:
        raise SearchError(f"--quantile must be in (0, 0.5], got {quantile!r}")
    if not isinstance(resample_probability, (int, float)) or not 0 <= resample_probability <= 1:
        raise SearchError(f"--resample-probability must be in [0, 1], got {resample_probability!r}")


def check_args(
    *,
    samples: int,
    scheduler: str,
    max_concurrent: int | None,
    workers_per_trial: int,
    gpus_per_worker: float,
    name: str | None,
    resume: bool,
) -> None:
    """The command line's numbers and --name (a folder under the Ray storage root)."""
    from flows.settings import check_name

    if scheduler not in SCHEDULERS:
        raise SearchError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if not _is_int(samples) or samples < 1:
        raise SearchError(f"--samples must be >= 1, got {samples!r}")
    if max_concurrent is not None and (not _is_int(max_concurrent) or max_concurrent < 1):
        raise SearchError(f"--max-concurrent must be >= 1, got {max_concurrent!r}")
    if not _is_int(workers_per_trial) or workers_per_trial < 1:
        raise SearchError(f"--workers-per-trial must be >= 1, got {workers_per_trial!r}")
    if not isinstance(gpus_per_worker, (int, float)) or not gpus_per_worker >= 0:
        raise SearchError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker!r}")
    if name is not None:
        check_name(name, "--name", SearchError)
    if resume and not name:
        raise SearchError("--resume needs the --name of the search to resume")

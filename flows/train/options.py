"""The options of a training job, declared once: `ganflow train`'s flags, their checks, and
the request they fill. The command line and the Prefect flow both build that request here,
so adding an option is one entry in :data:`TRAIN_OPTIONS` (and, for a cluster or storage
option, the field it fills in :mod:`flows.train.spec`).

The Prefect flow keeps explicit parameters, because Prefect derives a flow's parameter
schema from its signature; tests/test_options.py holds them equal to these declarations.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from flows.settings import check_name
from flows.snapshots.manifest import Manifest
from flows.train.spec import ClusterSpec, StorageSpec, TrainError, TrainRequest
from gan_core.config import FAMILIES, GanConfig

Check = Callable[[str, object], None]
"""(flag, value) -> None, or a one-line TrainError naming the flag."""

Part = Literal["input", "cluster", "storage", "run"]


@dataclass(frozen=True)
class Option:
    name: str
    """The flow's parameter and the parsed argument's dest."""
    part: Part
    """What it fills: the config and snapshot (input), ClusterSpec, StorageSpec or the
    TrainRequest itself (run)."""
    type: type = str
    default: object = None
    help: str | None = None
    default_help: str | None = None
    """What "(default: ...)" in the help says; a number says itself, so the help cannot
    drift from the value."""
    flag: str | None = None
    """Default: --name with dashes."""
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False
    repeated: bool = False
    """A flag given once per value: a list on the command line, None (no values) in the
    flow, where a mutable default would be shared between runs."""
    check: Check | None = None
    """Per-value rule, skipped for None (not given). Cluster options have none here:
    ClusterSpec.check holds their rules, as one of them spans two fields and Tune and the
    retraining pipeline build a ClusterSpec without this table."""
    field: str | None = None
    """Its field in the ClusterSpec, StorageSpec or TrainRequest, where that name differs."""

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def target(self) -> str:
        return self.field or self.name

    @property
    def help_text(self) -> str | None:
        said = self.default_help
        if said is None and isinstance(self.default, (int, float)):
            said = f"{self.default:g}"
        if said is None:
            return self.help
        return f"{self.help} (default: {said})"

    @property
    def annotation(self) -> object:
        """The flow parameter's type."""
        kind = list[self.type] if self.repeated else self.type
        return kind if self.required or self.default is not None else kind | None


def _at_least(low: int, rule: str | None = None) -> Check:
    def check(flag: str, value: object) -> None:
        if value < low:
            raise TrainError(f"{flag} must be {rule or f'>= {low}'}, got {value}")

    return check


def _folder_name(flag: str, value: object) -> None:
    # A run name names a folder under the Ray storage root, so never a path.
    check_name(value, flag, TrainError)


TRAIN_OPTIONS: tuple[Option, ...] = (
    # In the order of `ganflow train --help`.
    Option("family", "input", required=True, choices=FAMILIES),
    Option(
        "dataset",
        "input",
        metavar="SNAPSHOT",
        help="snapshot id or name, or builtin:digits / builtin:digits-unpaired",
        default_help="the family's built-in",
    ),
    Option("workers", "cluster", int, 1, "Ray Train workers"),
    Option("gpus_per_worker", "cluster", float, 0.0, "GPUs per worker", "0, CPU"),
    Option("cpus_per_worker", "cluster", float, 1.0, "CPUs reserved per worker"),
    Option("threads", "cluster", int, 1, "torch intra-op threads per worker"),
    Option(
        "overrides",
        "input",
        flag="--set",
        metavar="KEY=VALUE",
        repeated=True,
        help="override a config field, e.g. d_steps=3 or lambda_cyc=10 (repeatable); "
        "train.batch_size is per worker",
    ),
    Option(
        "config_file",
        "input",
        flag="--config",
        metavar="FILE",
        help="YAML/JSON file of config fields",
    ),
    Option(
        "storage",
        "storage",
        metavar="URL",
        field="url",
        help="checkpoint storage: a folder or s3://bucket/prefix",
        default_help="GANFLOW_RAY_STORAGE, else GANFLOW_HOME/ray_results",
    ),
    Option(
        "s3_endpoint_url",
        "storage",
        metavar="URL",
        field="endpoint_url",
        help="S3-compatible endpoint for s3:// storage",
        default_help="GANFLOW_S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL",
    ),
    Option(
        "run_name",
        "run",
        help="Ray run name; rerunning an existing name resumes it",
        default_help="new",
        check=_folder_name,
    ),
    Option(
        "checkpoint_every",
        "run",
        int,
        help="iterations between checkpoints",
        default_help="5 x log_every; always at the end",
        check=_at_least(1),
    ),
    Option(
        "max_failures",
        "run",
        int,
        3,
        "worker-group restarts allowed",
        check=_at_least(-1, ">= 0 (or -1: no limit)"),
    ),
)

OPTIONS: Mapping[str, Option] = {o.name: o for o in TRAIN_OPTIONS}


def add_arguments(parser: argparse.ArgumentParser, options: Iterable[Option] = TRAIN_OPTIONS):
    for o in options:
        kwargs: dict[str, object] = {"dest": o.name, "help": o.help_text}
        if o.metavar:
            kwargs["metavar"] = o.metavar
        if o.choices:
            kwargs["choices"] = o.choices
        if o.required:
            kwargs["required"] = True
        if o.repeated:
            kwargs.update(action="append", default=[])
        else:
            kwargs.update(type=o.type, default=o.default)
        parser.add_argument(o.cli_flag, **kwargs)


def option_values(source: argparse.Namespace | Mapping[str, object]) -> dict[str, object]:
    """The declared options out of parsed arguments (which carry other flags too) or the
    flow's parameters; an option not given takes its declared default."""
    given = vars(source) if isinstance(source, argparse.Namespace) else source
    return {o.name: given.get(o.name, o.default) for o in TRAIN_OPTIONS}


def _part(values: Mapping[str, object], part: Part) -> dict[str, object]:
    return {o.target: values[o.name] for o in TRAIN_OPTIONS if o.part == part}


def check_options(values: Mapping[str, object]) -> ClusterSpec:
    """Every option's rule before the dataset is resolved (an ingest) or Ray starts, each a
    one-line TrainError: the cluster's first, then the others in flag order."""
    cluster = ClusterSpec(**_part(values, "cluster")).check()
    for o in TRAIN_OPTIONS:
        if o.check is not None and values[o.name] is not None:
            o.check(o.cli_flag, values[o.name])
    return cluster


def train_request(cfg: GanConfig, manifest: Manifest, values: Mapping[str, object]) -> TrainRequest:
    """The request the options ask for, on a config and snapshot already resolved from
    the input options."""
    return TrainRequest(
        cfg=cfg,
        manifest=manifest,
        cluster=ClusterSpec(**_part(values, "cluster")),
        storage=StorageSpec(**_part(values, "storage")),
        **_part(values, "run"),
    )

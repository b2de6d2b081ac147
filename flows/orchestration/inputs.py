"""The edge where what a user wrote becomes what training and search take: a dataset
reference (snapshot id or name, builtin:NAME, or a source, ingested here) resolved once into
a snapshot's manifest, and the config built on it. Commands and flows call this; training,
search and their workers then use that manifest or its id and never resolve again (a name
resolved twice could name two snapshots, were an ingest to land in between).

No Prefect here: the command line imports it without starting one.
"""

from __future__ import annotations

from flows.ingest.resolve import ensure_snapshot
from flows.snapshots.manifest import Manifest
from flows.train.config import build_config, requested_image_size, user_overrides
from gan_core.config import DEFAULT_DATASET, GanConfig


def config_and_snapshot(
    family: str, config_file: str | None, overrides: list[str], dataset: str | None = None
) -> tuple[GanConfig, Manifest]:
    """The config for family (--config FILE < --set) on the snapshot dataset names (default:
    the family's built-in), resolved on this machine before any Ray work. The overrides are
    read first: a bad --set fails before anything is ingested."""
    user = user_overrides(config_file, overrides)
    ref = dataset or DEFAULT_DATASET[family]
    manifest = ensure_snapshot(ref, image_size=requested_image_size(user))
    cfg, _ = build_config(family, user, manifest)
    return cfg, manifest

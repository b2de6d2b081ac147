"""Where local state lives. Read at call time, never at import (no import-time side effects)."""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

# The one rule for names that become parts of storage paths (snapshot, run, search and model
# names): a single path component, so no name can reach outside its root ("..", "/", "\\").
NAME_RULE = "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def ganflow_home() -> Path:
    """All local state (MLflow database and artifacts, snapshots, Ray storage, caches) lives
    under GANFLOW_HOME, default ./.ganflow in the working directory."""
    return Path(os.environ.get("GANFLOW_HOME", ".ganflow")).absolute()


def cache_dir() -> Path:
    return ganflow_home() / "cache"


def runs_dir() -> Path:
    return ganflow_home() / "runs"


def snapshot_root() -> str:
    """Where dataset snapshots live: GANFLOW_STORAGE_ROOT (a local path or s3://bucket/prefix),
    default GANFLOW_HOME/snapshots."""
    return os.environ.get("GANFLOW_STORAGE_ROOT") or str(ganflow_home() / "snapshots")


def ray_storage() -> str:
    """Where Ray Train and Tune keep checkpoints and run state: GANFLOW_RAY_STORAGE (a folder
    or s3://bucket/prefix), default GANFLOW_HOME/ray_results."""
    return os.environ.get("GANFLOW_RAY_STORAGE") or str(ganflow_home() / "ray_results")


def check_name(name: str, what: str, error: type[Exception] = ValueError) -> str:
    """name, or ``error`` in one line when it is not NAME_RULE (what: "--run-name" ...)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise error(f"{what} {name!r} must be {NAME_RULE} (it names a folder)")
    return name


def inside(root: str | Path, path: str | Path) -> Path:
    """path resolved, or ValueError when it resolves outside root (links followed): the
    last check before a local write whose path was built from names."""
    base, target = Path(root).resolve(), Path(path).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{path} resolves outside {root}; refused")
    return target


def mlflow_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file under GANFLOW_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ganflow_home() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    """Artifact location for experiments this project creates (never ./mlruns)."""
    return (
        os.environ.get("GANFLOW_MLFLOW_ARTIFACT_ROOT") or (ganflow_home() / "mlartifacts").as_uri()
    )


def redact(uri: str) -> str:
    """The URI without user:password (safe to print)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, "", ""))


def read_yaml_mapping(path: str, what: str, error: type[Exception]) -> dict:
    """A YAML (or JSON) file that must hold a mapping; an empty file is {}. Every failure is
    ``error`` with one line naming the file: missing, unreadable, not YAML, not a mapping."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{what} {path} must be a mapping of key: value")
    return raw


# Settings every Ray process of a job (training workers, Tune trials) must see as the driver
# does: where things live, never credentials (those come from each node's own environment or
# instance role, never through Ray's runtime env). The one list, for train and tune alike.
FORWARDED_ENV = (
    "GANFLOW_HOME",
    "GANFLOW_STORAGE_ROOT",
    "GANFLOW_RAY_STORAGE",
    "GANFLOW_MLFLOW_ARTIFACT_ROOT",
    "GANFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "GANFLOW_TRACKING_PROBE_S",  # how often rank 0 asks whether a lost server is back
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "GANFLOW_FID_WEIGHTS",
    "GANFLOW_FID_WEIGHTS_SHA256",
    "GANFLOW_FID_DOWNLOAD",
)


def forwarded_env() -> dict[str, str]:
    """FORWARDED_ENV's values that are set here."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}

"""Serve a registered generator with MLflow's own scoring server (`ganflow serve`).

The alias is resolved and the version checked (ganflow's models-from-code generator, no
pickle) before the server starts, and the server is started on that version, so what was
checked is what is served. After a promotion or a rollback, a restart serves the new
champion: the alias is resolved again at every start.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flows.registry.models import _client, _download, _resolve, check_mlmodel, parse_model_ref
from flows.registry.package import RegistryError

DEFAULT_PORT = 5001  # 5000 is the MLflow tracking server's (infra/compose.yaml)


@dataclass(frozen=True)
class ServePlan:
    name: str
    version: str
    alias: str | None
    host: str
    port: int
    argv: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/invocations"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plan(
    ref: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    workers: int = 1,
    tracking_uri: str | None = None,
) -> ServePlan:
    """What `ganflow serve` runs: `mlflow models serve -m models:/NAME/VERSION --env-manager
    local` (the ganflow environment serves its own model code), after the checks."""
    if not 1 <= port <= 65535:
        raise RegistryError(f"--port must be in 1..65535, got {port}")
    if not 1 <= workers <= 64:
        raise RegistryError(f"--workers must be in 1..64, got {workers}")
    name, sel = parse_model_ref(ref)
    client = _client(tracking_uri)
    version = _resolve(client, name, sel)
    root = client.get_model_version_download_uri(name, version).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mlmodel = _download(client, f"{root}/MLmodel", tmp)
        except Exception:
            raise RegistryError(
                f"{name} v{version} has no MLmodel (registered before ganflow logged MLflow "
                "models); retrain or roll back to a newer version to serve it"
            ) from None
        check_mlmodel(Path(mlmodel).parent, f"{name} v{version}")
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{name}/{version}",
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(workers),
    ]
    # MLflow starts `uvicorn` from PATH: this interpreter's own, even when PATH lacks its venv.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": client.tracking_uri, "PATH": path}
    alias = None if (sel or "").isdigit() else (sel or "champion")
    return ServePlan(name, version, alias, host, port, argv, env)

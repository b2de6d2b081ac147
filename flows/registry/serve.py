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
from flows.registry.serve_app import ENV_MAX_CONCURRENCY, ENV_MODEL_URI, ENV_QUEUE_TIMEOUT

DEFAULT_PORT = 5001  # 5000 is the MLflow tracking server's (infra/compose.yaml)
# Requests one server process generates at once (the model's slots, flows.package.pyfunc);
# the others wait up to the queue timeout, then get HTTP 503. On a CPU two at once already
# fill the cores, and each answer in flight holds its images (and, as JSON arrays, their
# encoding: ~200 MB at the largest answer), so the limit also bounds memory. The timeout
# stays below MLflow's own 60 s request timeout (a 504 whose work would go on anyway).
DEFAULT_MAX_CONCURRENCY = 2
DEFAULT_QUEUE_TIMEOUT = 20.0
# Connections one process holds (uvicorn's limit_concurrency): beyond it HTTP 503 at once,
# before a request body is even read. A backstop for crowds far beyond what the slots queue.
CONNECTIONS_PER_SLOT = 16


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
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
) -> ServePlan:
    """What `ganflow serve` runs, after the checks: uvicorn on MLflow's own scoring app for
    models:/NAME/VERSION (what `mlflow models serve --env-manager local` runs: the ganflow
    environment serves its own model code) behind ganflow's admission gate
    (flows.registry.serve_app)."""
    if not 1 <= port <= 65535:
        raise RegistryError(f"--port must be in 1..65535, got {port}")
    if not 1 <= workers <= 64:
        raise RegistryError(f"--workers must be in 1..64, got {workers}")
    if not 1 <= max_concurrency <= 256:
        raise RegistryError(f"--max-concurrency must be in 1..256, got {max_concurrency}")
    if not 0 < queue_timeout <= 3600:
        raise RegistryError(f"--queue-timeout must be in (0, 3600] seconds, got {queue_timeout}")
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
        *(sys.executable, "-m", "uvicorn", "--factory", "flows.registry.serve_app:from_env"),
        *("--host", host, "--port", str(port), "--workers", str(workers)),
        # Beyond this many connections per process, 503 before a request is even read: a
        # backstop for crowds far beyond what the gate queues.
        *("--limit-concurrency", str(CONNECTIONS_PER_SLOT * max_concurrency)),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": client.tracking_uri}
    env[ENV_MODEL_URI] = f"models:/{name}/{version}"
    env[ENV_MAX_CONCURRENCY] = str(max_concurrency)
    env[ENV_QUEUE_TIMEOUT] = f"{queue_timeout:g}"
    alias = None if (sel or "").isdigit() else (sel or "champion")
    return ServePlan(name, version, alias, host, port, argv, env)

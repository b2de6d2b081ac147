"""The remote configuration of infra/README.md, stood up for real on loopback without
containers, and the retraining pipeline run against it through environment variables alone:

- PostgreSQL (Debian's package: initdb/postgres run as the `postgres` user, data in a temp
  folder, 127.0.0.1 on a free port) with the `mlflow`, `mlflow_auth` and `prefect` databases;
- an S3 API (moto's server as a subprocess) holding the `ganflow` bucket;
- `mlflow server` with basic auth, its backend on PostgreSQL and its artifacts proxied to the
  bucket (`--serve-artifacts --artifacts-destination s3://...`);
- `prefect server start` with its database on PostgreSQL;
- a Ray cluster of two processes (`ray start --head` and `ray start --address`), one CPU
  each; the nodes carry the AWS and MLflow credentials in their own environment.

`ganflow run --config tiny.yaml --json` then runs ingest -> train -> register -> promote, and
the test checks the champion in the MLflow registry, the objects in the bucket (snapshot
manifest, Ray checkpoint, MLflow artifacts with the registered generator package) and the
completed flow run in Prefect. The preflight checks are exercised against the live services
too (a wrong MLflow password is rejected by the real basic-auth server).

Everything listens on 127.0.0.1; every process started here is stopped by its process group
(never `ray stop`, which would stop other Ray clusters on the machine).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from home_cache import seed_judges

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "ganflow"
PG_PASSWORD = "pg-live-test-password"
ADMIN_PASSWORD = "mlflow-admin-live-test"
AWS = {
    "AWS_ACCESS_KEY_ID": "live-test-key",
    "AWS_SECRET_ACCESS_KEY": "live-test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_SERVICE_VARS = (
    "RAY_ADDRESS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "GANFLOW_STORAGE_ROOT",
    "GANFLOW_RAY_STORAGE",
    "GANFLOW_S3_ENDPOINT_URL",
    "GANFLOW_MLFLOW_ARTIFACT_ROOT",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
)


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip(
            "PostgreSQL binaries missing: no /usr/lib/postgresql/*/bin/initdb "
            "(apt-get install postgresql; .ci/run does this)"
        )
    bindir = Path(found[-1]).parent
    for tool in ("postgres", "createdb"):
        if not (bindir / tool).exists():
            pytest.skip(f"PostgreSQL binary missing: {bindir / tool}")
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float, procs: Procs | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        if procs is not None:
            procs.raise_if_dead()
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready in {timeout:.0f}s")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def _port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


class Procs:
    """Long-running services, each in its own process group, logs in one folder."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.may_have_exited: set[str] = set()  # replaced ones; their groups are still stopped

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path | None = None):
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.procs.append((name, p))
        return p

    def raise_if_dead(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None and name not in self.may_have_exited:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 4000) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 20
        for _, p in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.time()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


def _kill_marked(marker: str) -> None:
    """Processes whose command line names marker (Ray workers that left their group)."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _start_postgres(procs: Procs, bindir: Path, datadir: Path, port: int, env: dict) -> None:
    pwfile = datadir.parent / "pwfile"
    pwfile.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(datadir.parent, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    r = subprocess.run(
        _as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-sync",
            ]
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    procs.start(
        "postgres",
        _as_postgres(
            [
                str(bindir / "postgres"),
                "-D",
                str(datadir),
                "-p",
                str(port),
                "-k",
                str(datadir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ]
        ),
        env,
    )


@pytest.fixture
def live(tmp_path, classifier_cache):
    """All services up; yields the environment `ganflow run` gets (services only)."""
    bindir = _pg_bindir()
    pytest.importorskip("psycopg2", reason="psycopg2-binary (dev extra) is not installed")
    base = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARS}
    base.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    ports = {
        k: _free_port()
        for k in (
            "pg",
            "s3",
            "mlflow",
            "prefect",
            "ray",
            "ray_client",
            "head_agent",
            "head_metrics",
            "dashboard",
            "worker_agent",
            "worker_metrics",
        )
    }
    # Short, world-traversable folders: PostgreSQL runs as another user, and Ray's socket
    # paths must stay under the 107-byte limit.
    pg_root = Path(tempfile.mkdtemp(prefix="gf-pg-"))
    ray_root = Path(tempfile.mkdtemp(prefix="gf-ray-"))
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Procs(logs)
    s3 = f"http://127.0.0.1:{ports['s3']}"
    pg = f"postgres:{PG_PASSWORD}@127.0.0.1:{ports['pg']}"
    try:
        t0 = time.time()
        _start_postgres(procs, bindir, pg_root / "data", ports["pg"], base)
        procs.start(
            "s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])], base
        )
        # Ray: the nodes carry the credentials (as on a real cluster), not the service URLs.
        node_env = {
            **base,
            **AWS,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
            "RAY_TMPDIR": str(ray_root),
        }
        # `ray start` for both nodes: what they share, then each node's own ports.
        ray_start = [str(BIN / "ray"), "start", "--temp-dir", str(ray_root), "--block"]
        ray_start += ["--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
        ray_start += ["--disable-usage-stats"]
        procs.start(
            "ray-head",
            [
                *ray_start,
                "--head",
                "--port",
                str(ports["ray"]),
                "--ray-client-server-port",
                str(ports["ray_client"]),
                "--dashboard-agent-listen-port",
                str(ports["head_agent"]),
                "--metrics-export-port",
                str(ports["head_metrics"]),
                "--include-dashboard",
                "false",
                # Not Ray's default 8265: without the dashboard Ray still binds it, and another
                # Ray instance on the machine (a parallel test, another job) may hold it.
                "--dashboard-port",
                str(ports["dashboard"]),
            ],
            node_env,
        )
        # An open port is not enough: during recovery PostgreSQL listens but answers "the
        # database system is starting up" (seen once in CI); pg_isready waits for connections.
        pg_ready = [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(ports["pg"])]
        _wait(
            lambda: (
                subprocess.run(pg_ready, env=base, capture_output=True, timeout=10).returncode == 0
            ),
            "PostgreSQL",
            60,
            procs,
        )
        pg_env = {**base, "PGPASSWORD": PG_PASSWORD}
        for db in ("mlflow", "mlflow_auth", "prefect"):
            r = subprocess.run(
                [
                    str(bindir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(ports["pg"]),
                    "-U",
                    "postgres",
                    db,
                ],
                env=pg_env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
        _wait(lambda: _http_ok(f"{s3}/moto-api/"), "moto S3", 60, procs)
        import boto3

        boto3.client("s3", endpoint_url=s3, **_boto_kw()).create_bucket(Bucket=BUCKET)

        auth_ini = (
            Path(__import__("mlflow.server.auth", fromlist=["x"]).__file__).parent
            / "basic_auth.ini"
        ).read_text()
        auth_ini = "\n".join(
            f"database_uri = postgresql+psycopg2://{pg}/mlflow_auth"
            if line.startswith("database_uri")
            else line
            for line in auth_ini.splitlines()
        )
        (tmp_path / "auth.ini").write_text(auth_ini + "\n")
        mlflow_env = {
            **base,
            **AWS,
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "live-test-flask-secret",
            # MLflow's job runner (GenAI jobs: 7 more Python processes) is not what this
            # test is about, and ganflow runs no MLflow jobs: 2 cores are better spent.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        procs.start(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["mlflow"]),
                "--workers",
                "1",
                "--backend-store-uri",
                f"postgresql+psycopg2://{pg}/mlflow",
                "--serve-artifacts",
                "--artifacts-destination",
                f"s3://{BUCKET}/mlflow",
                "--app-name",
                "basic-auth",
            ],
            mlflow_env,
            cwd=tmp_path,
        )
        prefect_env = {
            **base,
            "PREFECT_HOME": str(tmp_path / "prefect-server"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg}/prefect",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
        }
        procs.start(
            "prefect",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["prefect"]),
            ],
            prefect_env,
        )
        _wait(lambda: _port_open(ports["ray"]), "Ray head", 90, procs)
        # The worker node joins once the servers are up: `ray start` gives a new node 30 s
        # (fixed in ray._private.node) to register with the GCS, and a fresh-clone CI run's
        # worker node missed it while PostgreSQL, both servers' migrations and the other
        # test worker shared the two cores. Once more if it still does.
        _wait(lambda: _http_ok(f"http://127.0.0.1:{ports['prefect']}/api/health"), "Prefect", 180, procs)  # fmt: skip
        _wait(lambda: _http_ok(f"http://127.0.0.1:{ports['mlflow']}/health"), "MLflow", 180, procs)  # fmt: skip
        worker_node = [
            *ray_start,
            "--address",
            f"127.0.0.1:{ports['ray']}",
            "--dashboard-agent-listen-port",
            str(ports["worker_agent"]),
            "--metrics-export-port",
            str(ports["worker_metrics"]),
        ]
        worker = procs.start("ray-worker", worker_node, node_env)
        try:
            _wait(lambda: _ray_nodes(ports["ray"], base) >= 2, "Ray worker node", 120, procs)
        except RuntimeError:
            if worker.poll() is None or "timed out during startup" not in procs.tail("ray-worker"):
                raise
            procs.may_have_exited.add("ray-worker")
            procs.start("ray-worker-again", worker_node, node_env)
            _wait(lambda: _ray_nodes(ports["ray"], base) >= 2, "Ray worker node", 120, procs)
        print(f"services up in {time.time() - t0:.1f}s", file=sys.stderr)

        home = tmp_path / "home"
        seed_judges(home, classifier_cache)
        env = {
            **base,
            **AWS,
            "GANFLOW_HOME": str(home),
            "RAY_ADDRESS": f"127.0.0.1:{ports['ray']}",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
            "PREFECT_HOME": str(tmp_path / "prefect-client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "GANFLOW_STORAGE_ROOT": f"s3://{BUCKET}/snapshots",
            "GANFLOW_RAY_STORAGE": f"s3://{BUCKET}/ray",
            "GANFLOW_S3_ENDPOINT_URL": s3,
            "GANFLOW_MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/ganflow",
            # The checks' logic is under test, not this machine's speed: the basic-auth MLflow
            # server's first API answers took over the default 5 s on a loaded 2-core machine
            # (another test file's services beside it under make test's two workers).
            "GANFLOW_PREFLIGHT_TIMEOUT_S": "30",
        }
        yield {"env": env, "s3": s3, "procs": procs}
    except BaseException:
        for name, _ in procs.procs:
            print(f"--- {name} log tail ---\n{procs.tail(name, 2000)}", file=sys.stderr)
        raise
    finally:
        procs.stop()
        _kill_marked(str(ray_root))
        shutil.rmtree(pg_root, ignore_errors=True)
        shutil.rmtree(ray_root, ignore_errors=True)


def _boto_kw() -> dict:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS["AWS_DEFAULT_REGION"],
    }


def _ray_nodes(port: int, env: dict) -> int:
    r = subprocess.run(
        [str(BIN / "ray"), "status", "--address", f"127.0.0.1:{port}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    active = r.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))


def _post_json(url: str, body: dict) -> object:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_pipeline_against_live_services(live, tmp_path, monkeypatch):
    from flows.preflight import PreflightError, check_services

    env = live["env"]
    bucket_ref = f"s3://{BUCKET}"
    assert check_services(env) == ["mlflow", "prefect", bucket_ref, "ray"]
    with pytest.raises(PreflightError, match="MLflow at .*: credentials rejected \\(HTTP 401\\)"):
        check_services({**env, "MLFLOW_TRACKING_PASSWORD": "wrong-password"})

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "families: [gan]\noverrides: {gan: {train.steps: 100, train.log_every: 50}}\n"
    )
    t0 = time.time()
    r = subprocess.run(
        [str(BIN / "ganflow"), "run", "--config", str(config), "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=420,
    )
    print(f"ganflow run took {time.time() - t0:.1f}s", file=sys.stderr)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    (result,) = json.loads(r.stdout.strip().splitlines()[-1])["results"]
    assert result["family"] == "gan" and result["promotion"]["decision"] == "champion"
    assert result["metrics"]["ray_workers"] == 1

    # MLflow: the registered version carries the champion alias, on the live server.
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(k, env[k])
    from mlflow import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    mv = c.get_model_version_by_alias(result["name"], "champion")
    assert str(mv.version) == str(result["version"]) == "1"
    assert mv.run_id == result["run_id"]
    # The version is the run's logged model, whose artifacts live in the server's store.
    assert mv.source.startswith("models:/m-"), mv.source
    logged = c.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.source_run_id == result["run_id"]
    assert logged.artifact_location.startswith("mlflow-artifacts:/ganflow/"), logged

    run = c.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/ganflow/")

    # Object store: snapshot, Ray checkpoint, MLflow artifacts (the registered package too).
    import boto3

    s3 = boto3.client("s3", endpoint_url=live["s3"], **_boto_kw())
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    snap = result["snapshot_id"]
    assert f"snapshots/{snap}/manifest.json" in keys or any(
        k.startswith("snapshots/") and k.endswith("manifest.json") and snap in k for k in keys
    ), [k for k in keys if k.startswith("snapshots/")][:20]
    ray_keys = [k for k in keys if k.startswith(f"ray/{result['run_name']}/")]
    assert any(k.endswith("/state.pt") and "/checkpoint-" in k for k in ray_keys), ray_keys[:20]
    ml_keys = [k for k in keys if k.startswith("mlflow/ganflow/")]
    # The generator package inside the run's logged model (models/m-.../artifacts/package/).
    assert any(k.endswith("/package/generator.safetensors") for k in ml_keys), ml_keys
    assert any(k.endswith("/MLmodel") for k in ml_keys), ml_keys
    assert any(k.endswith(".png") for k in ml_keys), ml_keys

    # Prefect: the flow run completed on the live server.
    api = env["PREFECT_API_URL"]
    runs = _post_json(f"{api}/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 10})
    flows = {f["id"]: f["name"] for f in _post_json(f"{api}/flows/filter", {})}
    done = [x for x in runs if flows.get(x["flow_id"]) == "ganflow-retraining"]
    assert done and done[0]["state_type"] == "COMPLETED", runs

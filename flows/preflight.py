"""Preflight: before any work starts, check every remote service the environment configures.

`ganflow run` calls :func:`check_services` right after loading its config, so a typo in a URL,
a stopped server, a missing bucket or a rejected password is one line in seconds, not a
failure after ingestion or an hour of training. Only what is configured is checked:

- MLflow: ``MLFLOW_TRACKING_URI`` when http(s): ``/health`` answers, and one cheap
  authenticated API call (``experiments/search``, one result) is accepted, with
  ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``) when set.
- Prefect: ``PREFECT_API_URL``: ``<url>/health`` (with ``PREFECT_API_AUTH_STRING`` or
  ``PREFECT_API_KEY`` when set).
- Object store: ``GANFLOW_STORAGE_ROOT`` and ``GANFLOW_RAY_STORAGE`` when ``s3://``: the bucket
  exists and the credentials work (one ``ListObjectsV2`` of one key), through
  :func:`flows.storage.get_filesystem`, so the endpoint variables apply as everywhere else.
- Ray: ``RAY_ADDRESS`` when set and not ``auto``/``local``: a TCP connection to host:port.

Local stores are checked by every command before it starts (:func:`check_local_stores`):
GANFLOW_HOME and, per command, the snapshot root, the Ray storage and a SQLite or file MLflow
store, by creating and removing a file there.

:func:`ensure_ray` is the one way ganflow connects to Ray (training, search, and ingest on the
cluster): RAY_ADDRESS when set, else a local Ray started for the process, whose processes are
all given its address (so two ganflow jobs on one machine never mistake each other's).

Each check has a timeout of ``GANFLOW_PREFLIGHT_TIMEOUT_S`` seconds (default 5) and no retries.
Messages name the service and never carry secrets (URL userinfo and AWS keys are masked).
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from flows.errors import first_line
from flows.settings import redact

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 5.0

_S3_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
    "403",
}


class PreflightError(ValueError):
    """A configured service cannot be used; one line naming it and why, no secrets."""


def _mask(text: str, env: Mapping[str, str]) -> str:
    for var in (
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_API_KEY",
    ):
        value = env.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(text.split())


def _strip_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """(URL without userinfo, username, password)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    return url, user, password


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _get(url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """(HTTP status, first bytes of the body); raises OSError/URLError when nothing answers."""
    req = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 (http(s) only)
            return r.status, r.read(300).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(300).decode("utf-8", "replace")
        except Exception:
            body = ""
        return exc.code, body


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, TimeoutError | socket.timeout):
        return "timed out"
    return str(reason) or type(reason).__name__


# --- the checks ------------------------------------------------------------------------------


def check_mlflow(uri: str, env: Mapping[str, str], timeout_s: float) -> None:
    shown = redact(uri)
    base, url_user, url_password = _strip_userinfo(uri)
    base = base.rstrip("/")
    user = env.get("MLFLOW_TRACKING_USERNAME") or url_user
    password = env.get("MLFLOW_TRACKING_PASSWORD") or url_password
    token = env.get("MLFLOW_TRACKING_TOKEN")
    headers: dict[str, str] = {}
    if user and password is not None:
        headers["Authorization"] = _basic(user, password)
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        status, _ = _get(f"{base}/health", {}, timeout_s)
    except (urllib.error.URLError, OSError) as exc:
        raise PreflightError(
            f"MLflow at {shown}: unreachable ({_mask(_reason(exc), env)}); "
            "start the server or fix MLFLOW_TRACKING_URI"
        ) from None
    if status >= 500:
        raise PreflightError(f"MLflow at {shown}: /health answered HTTP {status}")
    try:
        status, body = _get(
            f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers, timeout_s
        )
    except (urllib.error.URLError, OSError) as exc:
        raise PreflightError(
            f"MLflow at {shown}: no answer to an API call ({_mask(_reason(exc), env)})"
        ) from None
    if status in (401, 403):
        if headers:
            raise PreflightError(
                f"MLflow at {shown}: credentials rejected (HTTP {status}); check "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
            )
        detail = _mask(body, env)[:160]
        raise PreflightError(
            f"MLflow at {shown}: HTTP {status} without credentials; set "
            f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD ({detail})"
        )
    if status >= 400:
        detail = _mask(body, env)[:160]
        raise PreflightError(
            f"MLflow at {shown}: API call answered HTTP {status}; is this an MLflow server? "
            f"({detail})"
        )


def check_prefect(api_url: str, env: Mapping[str, str], timeout_s: float) -> None:
    shown = redact(api_url)
    base, url_user, url_password = _strip_userinfo(api_url)
    headers: dict[str, str] = {}
    auth = env.get("PREFECT_API_AUTH_STRING")
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    elif env.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {env['PREFECT_API_KEY']}"
    elif url_user:
        headers["Authorization"] = _basic(url_user, url_password or "")
    try:
        status, body = _get(f"{base.rstrip('/')}/health", headers, timeout_s)
    except (urllib.error.URLError, OSError) as exc:
        raise PreflightError(
            f"Prefect API at {shown}: unreachable ({_mask(_reason(exc), env)}); "
            "start the server or fix PREFECT_API_URL"
        ) from None
    if status in (401, 403):
        what = "credentials rejected" if headers else "credentials required"
        raise PreflightError(
            f"Prefect API at {shown}: {what} (HTTP {status}); check PREFECT_API_AUTH_STRING"
        )
    if status == 404:
        raise PreflightError(
            f"Prefect API at {shown}: no /health there (HTTP 404); PREFECT_API_URL should end in /api"
        )
    if status >= 400:
        raise PreflightError(f"Prefect API at {shown}: /health answered HTTP {status}")


def _with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """fn() in a daemon thread, given up after timeout_s (a hung endpoint never blocks us)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True, name=f"preflight-{what}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"no answer in {timeout_s:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _s3_filesystem(url: str, env: Mapping[str, str], timeout_s: float):
    if env is os.environ:
        from flows.storage import get_filesystem

        fs, _ = get_filesystem(url)
    else:  # an explicit mapping: the same endpoint order as flows.storage, from that mapping
        import s3fs

        from flows.storage import s3_endpoint

        endpoint = s3_endpoint(env)
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            key=env.get("AWS_ACCESS_KEY_ID"),
            secret=env.get("AWS_SECRET_ACCESS_KEY"),
            token=env.get("AWS_SESSION_TOKEN"),
            skip_instance_cache=True,
        )
    # One attempt, short timeouts: a preflight reports, the pipeline's own calls retry.
    fs.retries = 1
    fs.connect_timeout = timeout_s
    fs.read_timeout = timeout_s
    fs.config_kwargs = {**fs.config_kwargs, "retries": {"max_attempts": 1, "mode": "standard"}}
    return fs


def _s3_endpoint(env: Mapping[str, str]) -> str:
    from flows.storage import s3_endpoint

    endpoint = s3_endpoint(env)
    return redact(endpoint) if endpoint else "AWS S3"


def check_bucket(url: str, var: str, env: Mapping[str, str], timeout_s: float) -> None:
    """The bucket of an s3:// URL exists and the credentials may list it."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    where = f"object store at {_s3_endpoint(env)}"
    if not bucket:
        raise PreflightError(f"{where}: {var}={url} names no bucket")

    def call():
        fs = _s3_filesystem(url, env, timeout_s)
        return fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)

    try:
        _with_deadline(call, timeout_s * 2 + 1, "s3")
    except Exception as exc:
        raise PreflightError(_mask(_describe_s3(exc, where, bucket, var), env)) from None


def _describe_s3(exc: BaseException, where: str, bucket: str, var: str) -> str:
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        code = str(err.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if not code and exc.__cause__ is not None:  # s3fs's translated errors keep boto's
        inner = getattr(exc.__cause__, "response", None)
        if isinstance(inner, dict):
            code = str((inner.get("Error") or {}).get("Code") or "")
    if code in ("NoSuchBucket", "404") or (
        isinstance(exc, FileNotFoundError) and "bucket" in text.lower()
    ):
        return f"{where}: bucket '{bucket}' does not exist (from {var}); create it first"
    if code in _S3_AUTH_CODES or isinstance(exc, PermissionError):
        return (
            f"{where}: credentials rejected for bucket '{bucket}' ({code or text[:120] or name}); check "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            f"{where}: no credentials for bucket '{bucket}'; set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile or instance role)"
        )
    if (
        name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError")
        or isinstance(exc, ConnectionError | TimeoutError)
        or "connect" in text.lower()
    ):
        return (
            f"{where}: unreachable ({name}: {text}); start it or fix "
            "GANFLOW_S3_ENDPOINT_URL/AWS_ENDPOINT_URL"
        )
    return f"{where}: bucket '{bucket}' (from {var}) cannot be listed ({code or name}: {text})"


def ray_host_port(address: str) -> tuple[str, int] | None:
    """host and port of RAY_ADDRESS, None for auto/local (nothing remote to check)."""
    address = address.strip()
    if address.lower() in ("", "auto", "local"):
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    default = {"ray": 10001, "http": 8265, "https": 443}.get(scheme, 6379)
    if rest.startswith("["):  # [ipv6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:
        host, port = rest, ""
    try:
        return host, int(port) if port else default
    except ValueError:
        raise PreflightError(f"Ray: RAY_ADDRESS={address!r} is not host:port") from None


def check_ray(address: str, timeout_s: float) -> None:
    hp = ray_host_port(address)
    if hp is None:
        return
    host, port = hp
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise PreflightError(
            f"Ray cluster at {host}:{port}: unreachable ({reason}); start it or fix RAY_ADDRESS"
        ) from None


def ensure_ray(log_to_driver: bool = True) -> None:
    """Connect to RAY_ADDRESS when set, else start a local Ray instance for this process
    (:func:`_start_local_ray`). Never ray.init()'s own fallback, which joins whatever cluster
    `ray start` last left on this machine. Here, not in flows.train, because ingest (a lower
    layer) runs on the cluster too."""
    import ray  # noqa: F401 (importing it configures its loggers, which reapply then routes)

    from flows import console

    console.reapply()
    with _RAY_INIT_LOCK:  # flow tasks run in threads; os.environ changes during the start
        _init_ray(log_to_driver)
    console.reapply()


_RAY_INIT_LOCK = threading.Lock()


def _init_ray(log_to_driver: bool) -> None:
    import ray

    from flows import console

    if not ray.is_initialized():
        kwargs = {}
        if console.quiet():
            # Workers' and the Train controller's INFO chatter stays in Ray's session logs;
            # ganflow's own progress lines (plain prints on rank 0) still reach the console.
            kwargs["logging_config"] = ray.LoggingConfig(log_level="WARNING")
        address = os.environ.get("RAY_ADDRESS", "").strip()
        if address and address.lower() != "local":
            try:
                ray.init(address=address, log_to_driver=log_to_driver, **kwargs)
            except Exception as exc:  # a version mismatch, a cluster gone since the check
                _shutdown_quietly()
                raise PreflightError(
                    f"Ray cluster at {address}: could not connect ({first_line(exc)}); "
                    "start it or fix RAY_ADDRESS"
                ) from None
        else:
            _start_local_ray(log_to_driver=log_to_driver, **kwargs)


def _shutdown_quietly() -> None:
    """Stop what a failed ray.init started (its GCS or raylet may be up)."""
    import ray

    with contextlib.suppress(Exception):
        ray.shutdown()


def _start_local_ray(**init_kwargs) -> str:
    """Start a Ray instance owned by this process (it stops when the process ends) whose every
    process is told its address; returns that address.

    Ray's state API (Ray Train's PlacementGroupCleaner and TrainStateActor, ganflow's search
    reaper) finds "the" local cluster by looking at the machine when it is given no address.
    With a second Ray instance on the machine (another ganflow job) it raised "Found multiple
    active Ray instances", or, with a `ray start` cluster there, queried that one; the cleaner
    stopped watching and placement groups could stay reserved. So the GCS port is chosen
    here (RAY_GCS_SERVER_PORT, which Ray's head node reads) and RAY_ADDRESS is in the
    environment while ray.init spawns the raylet, whose environment every worker, actor and
    Tune trial inherits. The driver's own environment is left as it was: a RAY_ADDRESS there
    means "a cluster the user configured" (ingest's auto mode reads it), and this process is
    connected by ray.init anyway."""
    import ray

    for _ in range(3):
        with socket.socket() as s:  # a free port; the GCS binds it a second or two later
            s.bind(("", 0))
            port = s.getsockname()[1]
        # The host Ray's node uses for its GCS address (the same lookup ray.init makes).
        host = ray.util.get_node_ip_address()
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            with _environ({"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": address}):
                ray.init(address="local", **init_kwargs)
        except Exception as exc:
            # Seen: Ray's start-up timeout on a machine loaded by other jobs, a RAY_TMPDIR
            # that is not a folder. One line naming Ray, not Ray's traceback.
            _shutdown_quietly()
            logs = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
            raise PreflightError(
                f"Ray: the local instance did not start ({first_line(exc)}); check free "
                f"memory, disk and RAY_TMPDIR (Ray's logs: {logs}/session_latest/logs), or set "
                "RAY_ADDRESS to a running cluster"
            ) from None
        if ray.get_runtime_context().gcs_address == address:
            return address
        # Another process took the port first, or Ray chose another host: the raylet's
        # RAY_ADDRESS would name something else. Start again.
        ray.shutdown()
    raise PreflightError("Ray: could not start a local instance on a free port (3 tries)")


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with ``values`` set inside the block, as it was after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- local stores ----------------------------------------------------------------------------

# What each command writes locally beside GANFLOW_HOME itself (its log file, caches, temporary
# files): "snapshots" (the snapshot root), "ray" (Ray Train and Tune storage), "tracking" (a
# SQLite or file MLflow store). Remote stores are check_services' business.
_STORES_BY_COMMAND = {
    "ingest": ("snapshots",),
    "train": ("snapshots", "ray", "tracking"),
    "tune": ("snapshots", "ray", "tracking"),
    "run": ("snapshots", "ray", "tracking"),
    "schedule": ("snapshots", "ray", "tracking"),
    "generate": ("tracking",),
    "rollback": ("tracking",),
    "serve": ("tracking",),
    "models": ("tracking",),
}
PROBE_PREFIX = ".ganflow-write-check-"
SQLITE_HEADER = b"SQLite format 3\x00"


def local_stores(command: str, args: object = None) -> list[tuple[str, Path, str, bool]]:
    """(what, local path, how to change it, whether it is a file) for everything local
    ``command`` will write: GANFLOW_HOME always, then its stores, with the command's own
    --root/--storage first."""
    from flows.settings import ganflow_home, mlflow_tracking_uri, ray_storage, snapshot_root

    home = ganflow_home()
    stores = [("GANFLOW_HOME", str(home), "set GANFLOW_HOME to a folder you can write", False)]
    wanted = _STORES_BY_COMMAND.get(command, ())
    for key, what, flag, var, default in (
        ("snapshots", "snapshot root", "root", "GANFLOW_STORAGE_ROOT", snapshot_root),
        ("ray", "Ray storage", "storage", "GANFLOW_RAY_STORAGE", ray_storage),
    ):
        if key in wanted:
            given = getattr(args, flag, None)
            fix = f"set {f'--{flag}' if given else var}"
            stores.append((what, given or default(), fix, False))
    if "tracking" in wanted:
        uri = mlflow_tracking_uri()
        path = tracking_path(uri)
        if path is not None:
            is_db = uri.startswith("sqlite:")
            stores.append(("MLflow tracking store", path, "set MLFLOW_TRACKING_URI", is_db))
    return [
        (w, Path(p.removeprefix("file://")).expanduser().absolute(), f, is_file)
        for w, p, f, is_file in stores
        if _is_local(p)
    ]


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def tracking_path(uri: str) -> str | None:
    """The database file of a sqlite:/// URI, the folder of a file: (or plain path) store;
    None for a tracking server or an in-memory database."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "sqlite":
        db = uri.split(":///", 1)[1].split("?", 1)[0] if ":///" in uri else ""
        return None if db in ("", ":memory:") else db
    if scheme == "file":
        return urllib.parse.unquote(urllib.parse.urlsplit(uri).path)
    return uri if uri and not scheme else None


def check_writable(what: str, path: Path, fix: str, is_file: bool = False) -> None:
    """PreflightError in one line naming ``path`` unless this process can write there: by
    creating (and removing) a file in it, or, when it does not exist yet, in the nearest
    folder above it that does. Permission bits alone would not say (root ignores them, a
    read-only mount has them set). Nothing is left behind and no folder is created.
    With ``is_file`` (a SQLite database) the file must open for writing and its folder must
    take new files (SQLite writes a journal beside it)."""
    existing = path
    try:
        if is_file and path.is_dir():
            raise _NotWritable("is a folder, not a database file")
        if is_file and path.exists():
            with open(path, "r+b") as db:
                head = db.read(16)
            # An empty file is a new database to SQLite; anything else must say it is one
            # (a damaged or foreign file was MLflow's raw 'file is not a database' traceback).
            if head and head != SQLITE_HEADER:
                raise PreflightError(
                    f"{what} {path} is not an SQLite database (damaged, or another kind of "
                    f"file); {fix}"
                )
        folder = path.parent if is_file else path
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            named = "it" if existing == path else str(existing)
            raise _NotWritable(f"{named} is a file, not a folder")
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except _NotWritable as exc:
        raise PreflightError(f"{what} {path} cannot be written: {exc}; {fix}") from None
    except OSError as exc:
        where = f" to create a file in {existing}" if existing != path else ""
        reason = (exc.strerror or type(exc).__name__).lower()
        raise PreflightError(f"{what} {path} cannot be written ({reason}{where}); {fix}") from None


class _NotWritable(Exception):
    pass


def check_local_stores(command: str, args: object = None) -> list[Path]:
    """Check every local folder and file ``command`` writes (:func:`local_stores`) before it
    starts; returns them. Raises PreflightError (one line) at the first it cannot write."""
    stores = local_stores(command, args)
    for what, path, fix, is_file in stores:
        check_writable(what, path, fix, is_file)
    return [store[1] for store in stores]


# --- the entry point -------------------------------------------------------------------------


def check_services(env: Mapping[str, str] = os.environ) -> list[str]:
    """Check every configured remote service; returns what was checked, e.g.
    ``["mlflow", "prefect", "s3://ganflow", "ray"]``. Raises :class:`PreflightError` (one
    line) at the first one that cannot be used."""
    timeout_s = float(env.get("GANFLOW_PREFLIGHT_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    checked: list[str] = []
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        check_mlflow(uri, env, timeout_s)
        checked.append("mlflow")
    api = env.get("PREFECT_API_URL", "")
    if api:
        check_prefect(api, env, timeout_s)
        checked.append("prefect")
    buckets: set[str] = set()
    for var in ("GANFLOW_STORAGE_ROOT", "GANFLOW_RAY_STORAGE"):
        url = env.get(var, "")
        if not (url.startswith("s3://") or url.startswith("s3a://")):
            continue
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        if bucket in buckets:
            continue
        check_bucket(url, var, env, timeout_s)
        buckets.add(bucket)
        checked.append(f"s3://{bucket}")
    address = env.get("RAY_ADDRESS", "")
    if ray_host_port(address) is not None:
        check_ray(address, timeout_s)
        checked.append("ray")
    return checked

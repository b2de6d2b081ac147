"""MLflow helpers for training runs: where the tracking server is, a fail-fast reachability
check, experiments with an explicit artifact location, and what a run logs (flat config as
params, metrics per interval, sample grids as images, the dataset snapshot as its input, the
final generator with a signature and an input example).

The driver checks reachability and creates (or, on a rerun of the same run name, finds) the
MLflow run before any cluster work; rank 0 of the Ray job logs into that run by id. MLflow is
imported inside the functions: importing it costs about a second and starts nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flows.package import (
    META_FILE,
    MODEL_CODE,
    MODEL_FORMAT,
    MODEL_NAME,
    PACKAGE_ARTIFACT,
    PIP_REQUIREMENTS,
    serving_signature,
    write_package,
)
from flows.package import generator_keys as generator_keys  # flows.bench.retrain imports it here
from flows.settings import ganflow_home, mlflow_artifact_root, mlflow_tracking_uri, redact
from gan_core.config import GanConfig
from gan_core.viz import grid_array

RUN_NAME_TAG = "ganflow.run_name"
"""Tag holding the Ray run name, so a rerun of the same name resumes the same MLflow run."""


class TrackingError(ValueError):
    """The tracking server cannot be used (unreachable, bad URI); one line, no secrets."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file under GANFLOW_HOME."""
    return mlflow_tracking_uri()


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model) pointed at uri for the block, then the
    process's tracking URI and MLFLOW_TRACKING_URI as they were. mlflow.set_tracking_uri
    also exports the variable: left set, a library call would repoint every later call of
    its caller (a test suite's next module read a stopped server's address)."""
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None clears the variable too: restored below
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when the tracking server cannot be reached.

    MLflow's own client retries a dead server with backoff for minutes; this is called on the
    driver before any training so an hour of training is never lost to a typo in the URI."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 (http(s) only)
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # it answered: reachable (auth or routing is MLflow's business)
                return
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} answered HTTP {exc.code}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} is unreachable ({reason}); "
                "start it or set MLFLOW_TRACKING_URI"
            ) from None
    if scheme == "sqlite":
        path = Path(urllib.parse.urlsplit(uri).path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow database folder: {exc}") from None
        return
    if scheme in ("", "file"):
        return
    # databricks, other plugins: let MLflow report its own errors.


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """One client per URI and process: building one opens a database engine (about 0.1 s)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, created with an explicit artifact location (never ./mlruns)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = f"{mlflow_artifact_root().rstrip('/')}/{name}"
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # a concurrent creator won the race
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_or_create_run(uri: str, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """The unfinished MLflow run tagged with this Ray run name (a resumed job), else a new one."""
    c = client(uri)
    found = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found and found[0].info.status != "FINISHED":
        return found[0].info.run_id
    run = c.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    return run.info.run_id


def log_config(uri: str, run_id: str, cfg: GanConfig, extra: dict[str, object]) -> None:
    """The flat config as params (idempotent: a resumed run logs the same values again)."""
    from mlflow.entities import Param

    c = client(uri)
    have = c.get_run(run_id).data.params
    params = {**{k: str(v) for k, v in cfg.to_flat_dict().items()}, **extra}
    new = [Param(k, str(v)) for k, v in params.items() if k not in have]
    for i in range(0, len(new), 100):  # MLflow's per-batch limit
        c.log_batch(run_id, params=new[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    c = client(uri)
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def grid_pixels(images: torch.Tensor, nrow: int) -> np.ndarray:
    """A sample grid as uint8 pixels. Small images are upscaled (nearest) to about 64 px a
    tile so they are readable in the UI (16-px digits 4x); 64 px and larger stay as they are."""
    pixels = grid_array(images, nrow=nrow)
    k = max(1, 64 // images.shape[-1])
    return np.kron(pixels, np.ones((k, k) + (1,) * (pixels.ndim - 2), dtype=np.uint8))


def log_grid(
    uri: str, run_id: str, images: torch.Tensor, nrow: int, step: int, key: str = "samples"
) -> None:
    """Sample grid as an MLflow image series (``key``), so the UI shows it step by step;
    through the run's RunLogger (spooled while a tracking server is away)."""
    run_logger(uri, run_id).log_image(grid_pixels(images, nrow), key, step)


def log_dataset_input(
    uri: str, run_id: str, snapshot_id: str, name: str, storage_url: str, attempts: int = 3
) -> None:
    """The snapshot as the run's dataset input (name, id as digest, where it lives). Takes
    the id and name, not the manifest: this shared module sits below flows.snapshots.

    Safe when several runs of one experiment log the same snapshot at once (Tune trials that
    start together): MLflow's store reads "is the dataset there?" and inserts it if not, in
    two statements, so two runs can both read "absent" and the second insert breaks the
    datasets table's (experiment, name, digest) key. The winner's row is there by then: a
    retry finds it and only links this run (the whole failed insert was rolled back)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    source = CodeDatasetSource({"ganflow.snapshot_id": snapshot_id, "ganflow.storage": storage_url})
    ds = MetaDataset(source, name=name or snapshot_id, digest=snapshot_id)
    inp = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
    c = client(uri)
    for attempt in range(attempts):
        try:
            c.log_inputs(run_id, datasets=[inp])
            return
        except MlflowException as exc:
            text = str(exc).lower()  # SQLite "UNIQUE constraint", Postgres/MySQL "duplicate"
            if attempt == attempts - 1 or ("unique" not in text and "duplicate" not in text):
                raise
            linked = c.get_run(run_id).inputs.dataset_inputs
            if any(d.dataset.digest == snapshot_id for d in linked):
                return
            time.sleep(0.05 * (attempt + 1))


# --- the logged model ------------------------------------------------------------------------
#
# One model per run: the chosen generator(s) (a training run's best step on val, EMA weights
# when kept) as an MLflow logged model with a python_function flavor (models-from-code: the
# class is shipped as code, never pickled) whose payload is the weights-only package. The
# package format, the served class and its models-from-code file live in flows.package; this
# module writes the package and logs the model. The registry registers that logged model;
# `ganflow generate`, `ganflow serve` and `mlflow models serve` all load the same artifacts.


def _run_snapshot(c, run_id: str) -> tuple[str, object | None]:
    """The run's snapshot id (tag) and its dataset input, if logged (for metric lineage)."""
    run = c.get_run(run_id)
    snapshot = run.data.tags.get("ganflow.snapshot_id", "")
    for inp in run.inputs.dataset_inputs if run.inputs else []:
        if snapshot and inp.dataset.digest == snapshot:
            return snapshot, inp.dataset
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return snapshot or (inputs[0].dataset.digest if inputs else ""), (
        inputs[0].dataset if inputs else None
    )


def log_generator(
    uri: str,
    run_id: str,
    cfg: GanConfig,
    models: dict[str, nn.Module],
    extra: dict | None = None,
    tags: dict[str, str] | None = None,
) -> list[str]:
    """Log the run's chosen generator(s) once, as the run's logged model ``generator``: a
    python_function model from code whose payload is the weights-only package, with the
    serving signature and an input example, the flat config as its params, the run's final
    figures as its metrics (linked to the snapshot's dataset) and the snapshot as a tag.
    ``models``: the networks to serve (a training run passes its best step's EMA
    generator); ``tags``: more logged-model tags (a training run: ``ganflow.best_step`` and
    the val figure that chose it). Returns [models:/<model_id>]."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pkg = write_package(cfg, models, Path(tmp) / PACKAGE_ARTIFACT, extra)
        return log_package(uri, run_id, cfg, pkg, tags)


def log_package(
    uri: str, run_id: str, cfg: GanConfig, pkg: Path, tags: dict[str, str] | None = None
) -> list[str]:
    """The second half of :func:`log_generator`, from a package already written: also what a
    replayed spool logs (the package was kept on disk while the server was away). The
    run's snapshot and final figures are read from the server now and added to the
    package's description (values ``write_package``'s ``extra`` set are kept)."""
    import mlflow
    from mlflow.entities import Metric

    c = client(uri)
    snapshot, dataset = _run_snapshot(c, run_id)
    run_metrics = c.get_run(run_id).data.metrics
    figures = {
        k.removeprefix("eval."): v
        for k, v in run_metrics.items()
        if k.startswith("eval.") and not k.startswith("eval.val_")
    }
    meta_path = pkg / META_FILE
    meta = json.loads(meta_path.read_text())
    for k, v in {"snapshot_id": snapshot, "run_id": run_id, "metrics": figures}.items():
        meta.setdefault(k, v)
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    signature, example = serving_signature(cfg)
    with fluent_uri(uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # MLflow suggests type hints on predict; the signature here is explicit instead.
        warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(MODEL_CODE),
            artifacts={PACKAGE_ARTIFACT: str(pkg)},
            signature=signature,
            input_example=example,
            pip_requirements=PIP_REQUIREMENTS,
            metadata={"ganflow.format": MODEL_FORMAT, "ganflow.family": cfg.family},
            params={k: str(v) for k, v in cfg.to_flat_dict().items()},
            tags={
                **(tags or {}),
                "ganflow.family": cfg.family,
                "ganflow.snapshot_id": snapshot,
                "ganflow.format": MODEL_FORMAT,
            },
            model_type=f"ganflow-{cfg.family}",
        )
    if figures:
        now = int(time.time() * 1000)
        link = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset else {}
        c.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), now, 0, model_id=info.model_id, **link)
                for k, v in figures.items()
            ],
        )
    return [info.model_uri]


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """End the run. Against a tracking server, records a training run spooled while the
    server was away are sent first; when it is still away, the status joins the spool and
    one line says how to replay it (nothing raises: the work itself is done)."""
    if not is_remote(uri):
        client(uri).set_terminated(run_id, status=status)
        return
    run_logger(uri, run_id).end(status)


# --- rank 0's tracking through a tracking-server outage ------------------------------------
#
# A training run's rank 0 logs through a RunLogger. With a local store (SQLite, files) it is
# the plain client: nothing here runs. Against an http(s) server, each call gets short HTTP
# settings (MLflow's defaults retry a dead server for minutes, per call); a call that fails
# for want of the server starts an outage: one warning line, and this and every later record
# go to a spool on local disk, in order. At a later log point (at most every
# GANFLOW_TRACKING_PROBE_S seconds, one /health request of 2 s at most) a server that
# answers gets the spool, in order, and the run goes on logging directly. The run's end
# (finish_run) sends what is left, or keeps the spool and names the command that replays it.

SPOOL_FOLDER = "tracking-spool"
# The spool's bounds. Metric and tag records: 1,000,000 lines (about 100 MB; a log point is
# one line, so this is a million log points, far beyond any outage); past it new metric
# records are counted and dropped (tags, the end status and the model are always kept).
# Image and artifact files (sample grids, losses.png): 256 MiB; past it the oldest are
# deleted first (their records are then skipped and counted as dropped on replay).
SPOOL_MAX_RECORDS = 1_000_000
SPOOL_MAX_FILE_BYTES = 256 * 2**20
PROBE_ENV = "GANFLOW_TRACKING_PROBE_S"
DEFAULT_PROBE_S = 10.0
# At the run's end with the server away, it is waited for this long (probed every few
# seconds) before the spool is kept for a replay: a restart or a short blip at the end
# should not leave a run for a person to replay. 0: keep the spool at once.
END_WAIT_ENV = "GANFLOW_TRACKING_END_WAIT_S"
DEFAULT_END_WAIT_S = 60.0
PROBE_TIMEOUT_S = 2.0
# MLflow reads these per request (mlflow.utils.rest_utils.http_request), so they can be set
# around rank 0's calls alone: one retry, no long backoff, 10 s without a byte is an outage
# (a timeout is per socket read, so a large upload still goes through).
SHORT_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_BATCH_METRICS = 900  # MLflow takes at most 1,000 entities a log_batch, 100 of them tags
_BATCH_TAGS = 90


def is_remote(uri: str | None) -> bool:
    """Whether uri is a tracking server (http or https): only a server can go away."""
    return urllib.parse.urlsplit(uri or "").scheme in ("http", "https")


def without_credentials(uri: str) -> str:
    """uri without user:password or a query, still usable (MLflow takes credentials from
    the environment); what a spool stores on disk."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _shown(uri: str) -> str:
    """uri as the outage lines print it: credentials masked, no query (a token could be
    there)."""
    parts = urllib.parse.urlsplit(uri)
    return redact(urllib.parse.urlunsplit((*parts[:3], "", "")))


def spool_dir(run_id: str) -> Path:
    return ganflow_home() / SPOOL_FOLDER / run_id


def _seconds(name: str, default: float) -> float:
    """A number of seconds from the environment (at least 0), or one line naming it."""
    raw = os.environ.get(name)
    try:
        return max(0.0, float(raw)) if raw else default
    except ValueError:
        raise TrackingError(f"{name} must be a number of seconds, got {raw!r}") from None


def probe_interval() -> float:
    return _seconds(PROBE_ENV, DEFAULT_PROBE_S)


def end_wait() -> float:
    return _seconds(END_WAIT_ENV, DEFAULT_END_WAIT_S)


@contextlib.contextmanager
def short_http() -> Iterator[None]:
    """MLflow's HTTP settings shortened for the calls inside (restored after)."""
    saved = {k: os.environ.get(k) for k in SHORT_HTTP}
    os.environ.update(SHORT_HTTP)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_outage(exc: BaseException) -> bool:
    """Whether exc says the server is away (no connection, a timeout, a 5xx after retries)
    rather than that the request was wrong (a 4xx: a bug that buffering would hide)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, OSError)  # requests' own exceptions are OSErrors too


def reachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    try:
        check_reachable(uri, timeout_s)
    except TrackingError:
        return False
    return True


class Spool:
    """One run's records kept on local disk while its tracking server is away.

    ``records.jsonl``: one JSON object a line, in the order they were logged (``t``: metrics,
    tags, image, artifact, loss_plot, generator, end); ``sent``: how many lines the server
    already has (a replay cut off midway goes on from there); ``files/<n>/``: images and
    artifacts (bounded, see SPOOL_MAX_FILE_BYTES); ``generator/``: the run's model package;
    ``spool.json``: the run id and the server's URI without credentials (never a secret)."""

    def __init__(
        self,
        path: Path,
        max_records: int = SPOOL_MAX_RECORDS,
        max_file_bytes: int = SPOOL_MAX_FILE_BYTES,
    ):
        self.path = Path(path)
        self.max_records, self.max_file_bytes = max_records, max_file_bytes
        self.dropped = 0
        self._lines: int | None = None

    @property
    def records_file(self) -> Path:
        return self.path / "records.jsonl"

    def _read_lines(self) -> list[str]:
        """Complete lines only: a process killed mid-write leaves a partial last line."""
        if not self.records_file.exists():
            return []
        text = self.records_file.read_text()
        lines = text.split("\n")
        return [line for line in lines[:-1] if line.strip()]

    def sent(self) -> int:
        try:
            return int((self.path / "sent").read_text())
        except (OSError, ValueError):
            return 0

    def mark_sent(self, n: int) -> None:
        tmp = self.path / "sent.tmp"
        tmp.write_text(str(n))
        tmp.replace(self.path / "sent")

    def pending(self) -> int:
        """Records not yet sent (0: nothing to send, or no spool)."""
        return max(0, len(self._read_lines()) - self.sent())

    def unsent(self) -> list[tuple[int, dict]]:
        lines = self._read_lines()
        return [(i, json.loads(lines[i])) for i in range(self.sent(), len(lines))]

    def meta(self) -> dict:
        return json.loads((self.path / "spool.json").read_text())

    def open(self, uri: str, run_id: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "spool.json"
        if not meta.exists():
            meta.write_text(json.dumps({"run_id": run_id, "uri": without_credentials(uri)}))

    def append(self, record: dict) -> bool:
        """Add a record; False when it was dropped (a metric record past the bound)."""
        if self._lines is None:
            self._lines = len(self._read_lines())
        if record["t"] == "metrics" and self._lines >= self.max_records:
            self.dropped += 1
            return False
        with self.records_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._lines += 1
        return True

    def new_file_dir(self, kind: str = "files") -> Path:
        """A fresh numbered folder under files/ (bounded) or generator/ (kept)."""
        root = self.path / kind
        root.mkdir(parents=True, exist_ok=True)
        n = max((int(d.name) for d in root.iterdir() if d.name.isdigit()), default=-1) + 1
        d = root / str(n)
        d.mkdir()
        return d

    def trim_files(self) -> None:
        """Delete the oldest files/ folders until they fit SPOOL_MAX_FILE_BYTES."""
        root = self.path / "files"
        if not root.exists():
            return
        dirs = sorted((d for d in root.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
        sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in dirs]
        total = sum(sizes)
        for d, size in zip(dirs, sizes):
            if total <= self.max_file_bytes:
                break
            shutil.rmtree(d, ignore_errors=True)
            total -= size

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._lines = None


def _say(line: str) -> None:
    # sys.__stderr__: Ray Train patches print() on workers into its logger; "[ganflow]" lines
    # are the ones a quiet console streams from workers (flows.console).
    print(f"[ganflow] {line}", file=sys.__stderr__, flush=True)


Handler = Callable[[str, str, dict], None]


def send_spool(
    spool: Spool, uri: str, run_id: str, handlers: dict[str, Handler] | None = None
) -> tuple[int, int]:
    """Send the spool's unsent records in order (metrics and tags batched), marking progress
    as it goes, then delete the spool. Returns (records sent, records dropped: by the bounds,
    or a kind with no handler here). Raises what the client raises (the spool keeps what is
    left)."""
    from mlflow.entities import Metric, RunTag

    c = client(uri)
    metrics: list[Metric] = []
    tags: list[RunTag] = []
    done = sent = dropped = 0

    def flush() -> None:
        nonlocal metrics, tags
        if metrics or tags:
            c.log_batch(run_id, metrics=metrics, tags=tags)
            metrics, tags = [], []
        spool.mark_sent(done)

    for i, rec in spool.unsent():
        kind = rec["t"]
        if kind == "metrics":
            metrics += [Metric(k, float(v), rec["ts"], rec["step"]) for k, v in rec["m"].items()]
        elif kind == "tags":
            tags += [RunTag(k, str(v)) for k, v in rec["tags"].items()]
        if kind in ("metrics", "tags"):
            done, sent = i + 1, sent + 1
            if len(metrics) >= _BATCH_METRICS or len(tags) >= _BATCH_TAGS:
                flush()
            continue
        flush()
        file = spool.path / rec["file"] if "file" in rec else None
        if file is not None and not file.exists():
            dropped += 1  # an old grid deleted to keep the spool within its bound
        elif kind == "image":
            c.log_image(
                run_id, np.load(file), key=rec["key"], step=rec["step"], timestamp=rec["ts"]
            )
        elif kind == "artifact":
            c.log_artifact(run_id, str(file), rec.get("path"))
        elif kind == "generator":
            from gan_core.overrides import from_flat_dict

            log_package(uri, run_id, from_flat_dict(rec["config"]), file, rec.get("tags"))
        elif kind == "end":
            c.set_terminated(run_id, status=rec["status"])
        elif handlers and kind in handlers:
            handlers[kind](uri, run_id, rec)
        else:
            dropped += 1
        done, sent = i + 1, sent + 1
        spool.mark_sent(done)
    flush()
    spool.remove()
    return sent, dropped + spool.dropped


class RunLogger:
    """Rank 0's tracking of one run (see the notes above): the plain client on a local store;
    against a server, short HTTP settings and a spool while the server is away."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        spool: Spool | None = None,
        say: Callable[[str], None] = _say,
        probe_s: float | None = None,
    ):
        self.uri, self.run_id, self.say = uri, run_id, say
        self.spool = (spool or Spool(spool_dir(run_id))) if is_remote(uri) else None
        self.probe_s = probe_interval() if probe_s is None else probe_s
        self.end_wait_s = end_wait()  # read now: a bad value is one line at the start
        self.down_since: int | None = None
        self._last_probe = float("-inf")
        # Deferred record kinds this process can run when it sends the spool (the worker's
        # loss plot: drawing it needs flows.train, above this layer); one without a handler
        # is counted as dropped (the driver's end, when the server is back by then).
        self.handlers: dict[str, Handler] = {}
        # Records left by an earlier process of this run (a worker restarted from its
        # checkpoint): later records wait behind them, in order.
        self.buffering = self.spool is not None and self.spool.pending() > 0

    # -- what rank 0 logs ----------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call(
            step,
            lambda: client(self.uri).log_batch(
                self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
            ),
            lambda: self.spool.append(
                {
                    "t": "metrics",
                    "step": step,
                    "ts": now,
                    "m": {k: float(v) for k, v in metrics.items()},
                }
            ),
        )

    def set_tags(self, tags: dict[str, str], step: int) -> None:
        from mlflow.entities import RunTag

        self._call(
            step,
            lambda: client(self.uri).log_batch(
                self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]
            ),
            lambda: self.spool.append({"t": "tags", "step": step, "tags": dict(tags)}),
        )

    def log_image(self, pixels: np.ndarray, key: str, step: int) -> None:
        now = int(time.time() * 1000)

        def keep() -> None:
            d = self.spool.new_file_dir()
            np.save(d / "image.npy", pixels, allow_pickle=False)
            self.spool.append(
                {
                    "t": "image",
                    "key": key,
                    "step": step,
                    "ts": now,
                    "file": f"files/{d.name}/image.npy",
                }
            )
            self.spool.trim_files()

        self._call(
            step,
            lambda: client(self.uri).log_image(
                self.run_id, pixels, key=key, step=step, timestamp=now
            ),
            keep,
        )

    def log_artifact(self, path: Path, step: int) -> None:
        def keep() -> None:
            d = self.spool.new_file_dir()
            shutil.copy2(path, d / path.name)
            self.spool.append(
                {"t": "artifact", "step": step, "file": f"files/{d.name}/{path.name}"}
            )
            self.spool.trim_files()

        self._call(step, lambda: client(self.uri).log_artifact(self.run_id, str(path)), keep)

    def deferred(self, kind: str, args: dict, direct: Callable[[], None], step: int) -> None:
        """direct() now, or a ``kind`` record that the replay command runs (a loss plot
        drawn from the server's history, which the server must hold first)."""
        self._call(step, direct, lambda: self.spool.append({"t": kind, "step": step, **args}))

    def log_generator(
        self,
        cfg: GanConfig,
        models: dict[str, nn.Module],
        step: int,
        extra: dict | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """The run's model (:func:`log_generator`), or its package kept in the spool."""

        def keep() -> None:
            d = self.spool.new_file_dir("generator")
            write_package(cfg, models, d / PACKAGE_ARTIFACT, extra)
            record = {"t": "generator", "step": step, "config": cfg.to_flat_dict()}
            rel = f"generator/{d.name}/{PACKAGE_ARTIFACT}"
            self.spool.append({**record, "file": rel, "tags": tags or {}})

        self._call(
            step, lambda: log_generator(self.uri, self.run_id, cfg, models, extra, tags), keep
        )

    def end(self, status: str) -> None:
        """The run's terminal status, after any spooled record; or, with the server still
        away, the status spooled too and one line naming the replay command."""
        assert self.spool is not None, "a local store has no outage (finish_run ends it)"
        if self.buffering or self.spool.pending():
            self.buffering = True
            self._last_probe = float("-inf")  # the end is worth a probe whatever the interval
            if not self._recover(None, announce=False) and not self._wait_at_end():
                self._keep_end(status)
                return
        try:
            with short_http():
                client(self.uri).set_terminated(self.run_id, status=status)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._keep_end(status)

    # -- the outage ------------------------------------------------------------------------

    def _call(self, step: int, direct: Callable[[], object], keep: Callable[[], object]) -> None:
        if self.spool is None:  # a local store: as fast as the plain client
            direct()
            return
        if self.buffering and not self._recover(step):
            keep()
            return
        try:
            with short_http():
                direct()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._start_outage(step)
            keep()

    def _start_outage(self, step: int | None) -> None:
        self.spool.open(self.uri, self.run_id)
        self.buffering = True
        self._last_probe = time.monotonic()  # it just failed: the next probe waits
        if self.down_since is None:
            self.down_since = step if step is not None else -1
            self.say(
                f"MLflow server at {_shown(self.uri)} unreachable since step {step}: "
                f"buffering to {self.spool.path}; training goes on"
            )

    def _recover(self, step: int | None, announce: bool = True) -> bool:
        """Whether the spool has been sent (the server answered a probe); False while it is
        away or before the probe interval has passed since the last try."""
        now = time.monotonic()
        if now - self._last_probe < self.probe_s:
            return False
        self._last_probe = now
        if not reachable(self.uri):
            if announce and self.down_since is None:  # a spool left by an earlier process
                self._start_outage(step)
            return False
        try:
            with short_http():
                sent, dropped = send_spool(self.spool, self.uri, self.run_id, self.handlers)
        except Exception as exc:
            if not is_outage(exc):
                raise
            return False  # away again midway: the spool keeps the rest, in order
        self.buffering, self.down_since = False, None
        lost = (
            f" ({dropped} dropped: the spool's bounds, or a plot drawn only by the replay)"
            if dropped
            else ""
        )
        self.say(f"MLflow server at {_shown(self.uri)} back: sent {sent} buffered records{lost}")
        return True

    def _wait_at_end(self) -> bool:
        """Whether the server came back (and got the spool) within the end's wait."""
        wait = self.end_wait_s
        if wait <= 0:
            return False
        self.say(
            f"MLflow server at {_shown(self.uri)} unreachable at the end of run "
            f"{self.run_id}: waiting up to {wait:g} s for it ({END_WAIT_ENV})"
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            self._last_probe = float("-inf")
            if self._recover(None, announce=False):
                return True
        return False

    def _keep_end(self, status: str) -> None:
        self.spool.open(self.uri, self.run_id)
        self.spool.append({"t": "end", "status": status})
        self.say(
            f"MLflow server at {_shown(self.uri)} still unreachable at the end of run "
            f"{self.run_id}: {self.spool.pending()} records (status {status} last) kept in "
            f"{self.spool.path}; send them with: ganflow tracking replay {self.spool.path}"
        )


@functools.lru_cache(maxsize=8)
def run_logger(uri: str, run_id: str) -> RunLogger:
    """One RunLogger per run and process: its outage state lives across log points."""
    return RunLogger(uri, run_id)


def replay_spool(
    path: Path, uri: str | None = None, handlers: dict[str, Handler] | None = None
) -> dict:
    """Send a kept spool (``ganflow tracking replay``): every record in order, the run's
    status last. uri: MLFLOW_TRACKING_URI, else the one the spool was written for."""
    spool = Spool(path)
    if not (spool.path / "spool.json").exists():
        raise TrackingError(f"{spool.path} is not a tracking spool (no spool.json)")
    meta = spool.meta()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or meta["uri"]
    check_reachable(uri)
    records = spool.unsent()
    status = next((r["status"] for _, r in reversed(records) if r["t"] == "end"), None)
    sent, dropped = send_spool(spool, uri, meta["run_id"], handlers)
    return {"run_id": meta["run_id"], "sent": sent, "dropped": dropped, "status": status}


# --- the retraining's own run ------------------------------------------------------------------

RETRAINING_EXPERIMENT = "ganflow-retraining"


def log_retraining(uri: str, rows: list[dict]) -> str:
    """One MLflow run per retraining (experiment ``ganflow-retraining``): per family what was
    decided (tags ``<family>.decision``, ``<family>.snapshot_id``, ``<family>.start``) and,
    where the data changed, the champion's figures on the new snapshot's val split as
    ``<family>.champion.val_<metric>`` (with the candidate's as ``<family>.candidate.*``).
    The step is the retraining's sequence number in the experiment, so the experiment's
    chart view over step (or over time) shows the champion's figure snapshot after
    snapshot: a drop is a drift of the data away from the model in use. Returns the run id."""
    from mlflow.entities import Metric

    c = client(uri)
    exp = ensure_experiment(uri, RETRAINING_EXPERIMENT)
    # Sequence number: runs before this one (a few hundred a year on a weekly schedule).
    step = len(c.search_runs([exp], max_results=50_000))
    run = c.create_run(exp, run_name=f"retraining-{time.strftime('%Y%m%d-%H%M%S')}")
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    for r in rows:
        fam = r["family"]
        tags = {
            f"{fam}.decision": r["decision"],
            f"{fam}.model": r["name"],
            f"{fam}.snapshot_id": r["snapshot_id"],
            f"{fam}.start": r.get("start") or "-",
            f"{fam}.why": (r.get("why") or "")[:500],
        }
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
        measured = r.get("champion_on_snapshot")
        if measured and "error" in measured:
            c.set_tag(run_id, f"{fam}.champion_error", measured["error"][:500])
        elif measured:
            c.set_tag(run_id, f"{fam}.champion_version", measured["version"])
            for k, v in measured["figures"].items():
                metrics.append(Metric(f"{fam}.champion.val_{k}", float(v), now, step))
        promotion = r.get("promotion") or {}
        if promotion.get("candidate") is not None:
            name = f"{fam}.candidate.val_{promotion['metric']}"
            metrics.append(Metric(name, float(promotion["candidate"]), now, step))
    for i in range(0, len(metrics), 500):
        c.log_batch(run_id, metrics=metrics[i : i + 500])
    c.set_terminated(run_id, "FINISHED")
    return run_id

"""Registered models on MLflow: register a run's logged generator as a new version, resolve
NAME[@alias|/version], load it back (weights only, no code or pickle from the store).

A version is the run's MLflow logged model (``models:/<model_id>``, logged once by
:func:`flows.tracking.log_generator`), so ``mlflow.pyfunc.load_model("models:/NAME@champion")``
and ``mlflow models serve`` use it as it is. ganflow's own loader reads the same model but
trusts less: it reads ``MLmodel`` (YAML), refuses anything that is not ganflow's
models-from-code generator (a pickled ``python_model``, another flavor), and then reads only
the package (JSON + safetensors) into the installed :class:`GanflowGenerator`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from flows.package import MODEL_FORMAT, MODEL_NAME, PACKAGE_ARTIFACT, load_package
from flows.registry.package import RegistryError
from flows.tracking import fluent_uri
from gan_core.config import GanConfig
from gan_core.evaluate import primary_metric

LOCK_SUFFIX = ".promotion-lock"
LOCK_TAG = "ganflow.lock"
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")
# MLflow's names are free text; ganflow's (model_name) are [a-z0-9-]. This is looser, to
# accept names given in pipeline configs, but it keeps '@' and '/' for aliases and versions.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@functools.lru_cache(maxsize=8)
def _check_server(uri: str) -> None:
    """An http(s) tracking server answers within seconds, else one line naming it (MLflow's
    own client retries a dead server for minutes). Checked once per process and URI."""
    import os
    import urllib.parse

    from flows.preflight import DEFAULT_TIMEOUT_S, PreflightError, check_mlflow

    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return
    timeout = float(os.environ.get("GANFLOW_PREFLIGHT_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    try:
        check_mlflow(uri, os.environ, timeout)
    except PreflightError as exc:
        raise RegistryError(str(exc)) from None


def _client(tracking_uri: str | None = None):
    """The one MLflow client factory (flows.tracking.client), for the configured URI, after
    checking that a tracking server answers."""
    from flows.settings import mlflow_tracking_uri
    from flows.tracking import client

    uri = tracking_uri or mlflow_tracking_uri()
    _check_server(uri)
    return client(uri)


def _mlflow_error(client, exc) -> RegistryError:
    """An MLflow failure that is not 'not found' as one line naming the server."""
    from flows.errors import first_line
    from flows.settings import redact

    return RegistryError(f"MLflow at {redact(client.tracking_uri)}: {first_line(exc)}")


def is_lock(model) -> bool:
    """The promotion lock is a registered model too; it is not a generator."""
    return model.name.endswith(LOCK_SUFFIX) or LOCK_TAG in (model.tags or {})


def list_models(tracking_uri: str | None = None) -> list[dict]:
    """ganflow's registered generators (the promotion locks left out), with their aliases."""
    client = _client(tracking_uri)
    out = []
    for m in client.search_registered_models(max_results=1000):
        if is_lock(m):
            continue
        aliases = {a: str(v) for a, v in (m.aliases or {}).items()}
        out.append({"name": m.name, "family": m.tags.get("ganflow.family", ""), "aliases": aliases})
    return sorted(out, key=lambda r: r["name"])


def _find_logged_model(client, run_id: str):
    """The ganflow generator the run logged (the latest, if logged more than once)."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=10,
    )
    for m in found:
        if m.tags.get("ganflow.format") == MODEL_FORMAT:
            return m
    return None


# Which step of the run the registered generator is, and the val figure that chose it:
# training tags the logged model and the run with these (runs from before have neither).
LINEAGE_TAGS = ("ganflow.best_step", "ganflow.best_metric", "ganflow.best_value")


def _lineage(client, run_id: str, logged) -> dict[str, str]:
    """The best-step tags for the version: the logged model's, as they describe the weights
    registered; the run's where the model has none (one that register logged itself)."""
    run_tags = client.get_run(run_id).data.tags
    model_tags = logged.tags or {}
    return {
        k: model_tags.get(k) or run_tags[k]
        for k in LINEAGE_TAGS
        if model_tags.get(k) or run_tags.get(k)
    }


def register(
    run_id: str,
    cfg: GanConfig,
    models: dict[str, nn.Module],
    name: str,
    metrics: dict[str, float],
    snapshot_id: str,
    code_version: str = "",
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Register run_id's logged generator as a new version of name (logging it first if the
    run has none, e.g. a run from before models were logged this way). The version carries
    the run's best step (:data:`LINEAGE_TAGS`) when training recorded one. Returns the
    version number (as a string, MLflow's type)."""
    from mlflow.exceptions import MlflowException

    from flows.tracking import log_generator

    client = _client(tracking_uri)
    logged = _find_logged_model(client, run_id)
    if logged is None:
        extra = {"snapshot_id": snapshot_id, "metrics": metrics, "code_version": code_version}
        log_generator(client.tracking_uri, run_id, cfg, models, extra)
        logged = _find_logged_model(client, run_id)
        if logged is None:
            raise RegistryError(f"run {run_id} logged no ganflow generator")
    with contextlib.suppress(MlflowException):  # already exists: fine
        client.create_registered_model(
            name, tags={"ganflow.family": cfg.family}, description=f"ganflow {cfg.family} generator"
        )
    primary, _ = primary_metric(cfg, has_truth="truth_error_ratio" in metrics)
    tags = {
        "ganflow.family": cfg.family,
        "ganflow.snapshot_id": snapshot_id,
        "ganflow.code_version": code_version,
        "ganflow.config": json.dumps(cfg.to_flat_dict(), sort_keys=True)[:5000],
        "ganflow.primary_metric": primary,
        "ganflow.model_id": logged.model_id,
        **{f"train_metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
        **_lineage(client, run_id, logged),
        **(tags or {}),
    }
    # The source is models:/<model_id>, as MLflow's register_model writes it: that is how the
    # version links to the logged model (its params, metrics and dataset) in MLflow's UI and
    # API. A SQL registry resolves it with MLflow's global client, so that must be ours for
    # the call, and only for the call: left set, it would repoint the caller's later calls.
    with fluent_uri(client.tracking_uri):
        mv = client.create_model_version(
            name, f"models:/{logged.model_id}", run_id=run_id, tags=tags, model_id=logged.model_id
        )
    versions = json.loads(logged.tags.get("mlflow.modelVersions", "[]"))
    versions.append({"name": name, "version": str(mv.version)})
    client.set_logged_model_tags(logged.model_id, {"mlflow.modelVersions": json.dumps(versions)})
    return str(mv.version)


def _resolve(client, name: str, ref: str | None) -> str:
    """'3' -> '3' (if it exists); 'champion' (alias) -> its version; None -> champion."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            raise RegistryError(f"no registered model named {name!r}") from None
        raise _mlflow_error(client, exc) from None
    if is_lock(model):
        raise RegistryError(f"{name!r} is ganflow's promotion lock, not a model")
    ref = ref or "champion"
    if ref.isdigit():
        try:
            client.get_model_version(name, ref)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                raise RegistryError(f"model {name!r} has no version {ref}") from None
            raise _mlflow_error(client, exc) from None
        return str(int(ref))
    try:
        return str(client.get_model_version_by_alias(name, ref).version)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            raise RegistryError(f"model {name!r} has no alias {ref!r}") from None
        raise _mlflow_error(client, exc) from None


def parse_model_ref(text: str) -> tuple[str, str | None]:
    """NAME, NAME@alias or NAME/version -> (name, alias-or-version or None); anything else
    (an empty name or alias, a path) is one line."""
    if "@" in text:
        name, _, alias = text.partition("@")
        if not alias:
            raise RegistryError(f"{text!r}: nothing after '@'; write NAME@ALIAS or just NAME")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", alias):
            raise RegistryError(f"{text!r}: alias {alias!r} is not an alias name")
    else:
        m = re.fullmatch(r"(.*)/(\d+)", text)
        name, alias = (m.group(1), m.group(2)) if m else (text, None)
    if not _NAME_RE.fullmatch(name):
        raise RegistryError(
            f"{text!r} is not a model reference; write NAME, NAME@ALIAS or NAME/VERSION"
        )
    return name, alias


def check_model_name(text: str) -> str:
    """A bare model name, as rollback takes (NAME@x or NAME/3 answered at once)."""
    if "@" in text or re.fullmatch(r".*/\d+", text):
        name = parse_model_ref(text)[0]
        raise RegistryError(
            f"{text!r} names a version or alias; this takes the model name ({name!r})"
        )
    parse_model_ref(text)
    return text


def _download(client, uri: str, dst: str) -> str:
    import os

    import mlflow

    # No progress bars: a command's output is its result line (small files, fast anyway).
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=dst, tracking_uri=client.tracking_uri
        )
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def check_mlmodel(path: str | Path, where: str) -> str:
    """The package's path inside a logged model, after checking from MLmodel (YAML) that it
    is ganflow's models-from-code generator. Anything else (a pickled python_model, cloudpickle
    or another flavor) is refused before a byte of it is loaded."""
    from mlflow.models import Model

    try:
        mlmodel = Model.load(str(path))
    except Exception as exc:
        raise RegistryError(f"{where}: unreadable MLmodel ({type(exc).__name__})") from None
    flavors = mlmodel.flavors or {}
    pyfunc = flavors.get("python_function") or {}
    model_meta = mlmodel.metadata or {}
    problems = []
    if set(flavors) != {"python_function"}:
        problems.append(f"flavors {sorted(flavors)}")
    if (
        "python_model" in pyfunc
        or pyfunc.get("loader_module") != "mlflow.pyfunc.loaders.code_model"
    ):
        problems.append("a pickled python_model" if "python_model" in pyfunc else "no model code")
    elif not pyfunc.get("model_code_path"):
        problems.append("not a models-from-code model")
    if model_meta.get("ganflow.format") != MODEL_FORMAT:
        problems.append(f"format {model_meta.get('ganflow.format')!r}")
    artifact = ((pyfunc.get("artifacts") or {}).get(PACKAGE_ARTIFACT) or {}).get("path")
    if not artifact or Path(artifact).is_absolute() or ".." in Path(artifact).parts:
        problems.append("no package artifact")
    if problems:
        raise RegistryError(
            f"{where} is not a ganflow generator ({', '.join(problems)}); refusing to load it"
        )
    return artifact


def load_generator(client, name: str, version: str):
    """The version as a loaded :class:`GanflowGenerator` (weights only, nothing executed or
    unpickled from the store). Versions registered before models were logged (a loose
    package folder) load as well."""
    from mlflow.exceptions import MlflowException

    from flows.package.pyfunc import GanflowGenerator

    where = f"{name} v{version}"
    try:
        root = client.get_model_version_download_uri(name, version).rstrip("/")
    except MlflowException as exc:
        raise _mlflow_error(client, exc) from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mlmodel = _download(client, f"{root}/MLmodel", str(Path(tmp) / "m"))
        except (MlflowException, OSError):
            mlmodel = None
        if mlmodel is None:  # a legacy version: the package folder itself
            try:
                local = _download(client, root, str(Path(tmp) / "legacy"))
            except (MlflowException, OSError) as exc:
                raise RegistryError(f"{where}: cannot download ({type(exc).__name__})") from None
            gen = GanflowGenerator()
            gen.cfg, gen.nets, gen.meta = load_package(local)
            return gen
        artifact = check_mlmodel(Path(mlmodel).parent, where)
        try:
            local = _download(client, f"{root}/{artifact}", str(Path(tmp) / "pkg"))
        except (MlflowException, OSError) as exc:
            raise RegistryError(f"{where}: cannot download its package ({exc})") from None
        return GanflowGenerator().load_package(local)


def load_registered_generator(ref: str, tracking_uri: str | None = None):
    """NAME[@alias|/version] (default @champion) -> (GanflowGenerator, name, version)."""
    name, sel = parse_model_ref(ref)
    client = _client(tracking_uri)
    version = _resolve(client, name, sel)
    return load_generator(client, name, version), name, version


def load_registered(
    ref: str, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> tuple[GanConfig, dict[str, nn.Module], dict]:
    """Load NAME[@alias|/version] (default @champion) from the registry, weights only."""
    gen, name, version = load_registered_generator(ref, tracking_uri)
    nets = {k: v.to(device) for k, v in gen.nets.items()}
    meta = dict(gen.meta, name=name, version=version)
    return gen.cfg, nets, meta

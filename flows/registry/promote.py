"""Model registry and promotion on MLflow: register a trained generator, gate its promotion
to `champion` on a fair comparison with the current champion, roll back, and load it again.

What is registered: a folder with the generator's weights as safetensors and a JSON file
with everything needed to use them (family, the flat config, image size, label set,
dataset snapshot, metrics). Loading reads those two files only, so nothing from the store
is ever unpickled. Aliases and tags are used throughout (MLflow stages are deprecated):

- alias ``champion``: the model in use; ``challenger``: the latest candidate that lost.
- registered-model tag ``ganflow.champion_history``: JSON list of past champions, newest
  last, so ``rollback`` can move ``champion`` back.
- version tags ``promotion.decision`` / ``promotion.reason`` and ``eval.<metric>`` /
  ``eval.champion.<metric>``: the decision with both figures.

Two promotions racing on one model are serialised by a lock that is itself a registered
model (``<name>.promotion-lock``): creating a registered model is atomic in every MLflow
backend (a unique key in its database), so exactly one promoter holds it. A lock older than
its TTL is considered abandoned (the holder crashed) and is broken.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from flows.registry.models import _client, _resolve
from flows.registry.package import HISTORY_TAG, RegistryError, load_package
from gan_core.config import GanConfig, apply_overrides
from gan_core.evaluate import evaluate, primary_metric


@contextlib.contextmanager
def promotion_lock(
    client, name: str, ttl_s: float = 600.0, wait_s: float = 120.0
) -> Iterator[None]:
    """Mutual exclusion across processes and machines through the registry itself."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}.promotion-lock"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"owner": token, "created": f"{time.time():.3f}"},
                description="ganflow promotion lock (safe to delete if stale)",
            )
            break
        except MlflowException:
            with contextlib.suppress(MlflowException):
                held = client.get_registered_model(lock)
                if time.time() - float(held.tags.get("created", "0")) > ttl_s:
                    client.delete_registered_model(lock)  # abandoned by a crashed promoter
                    continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"timed out waiting for the promotion lock of {name!r}"
                ) from None
            time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


@dataclass
class Decision:
    name: str
    version: str
    decision: str  # "champion" | "rejected"
    metric: str
    candidate: float
    champion: float | None
    champion_version: str | None
    margin: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _is_better(candidate: float, champion: float, mode: str, margin: float) -> bool:
    return candidate < champion - margin if mode == "min" else candidate > champion + margin


def evaluate_version(
    client, name: str, version: str, heldout, judge, seed: int = 0, inception=None
) -> tuple[GanConfig, dict[str, float]]:
    """The version's config and figures under fixed conditions: the given held-out data,
    judge, seed and metric code (FID/KID exactly when ``inception`` is given)."""
    import mlflow

    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=tmp, tracking_uri=client.tracking_uri
        )
        cfg, models, _ = load_package(local)
    cfg = apply_overrides(cfg, {"eval.inception": inception is not None})
    return cfg, evaluate(cfg, models, heldout, judge, seed=seed, inception=inception)


def promote(
    name: str,
    version: str,
    heldout,
    judge,
    margin: float = 0.0,
    seed: int = 0,
    tracking_uri: str | None = None,
    inception=None,
) -> Decision:
    """Make version the champion if it beats the current champion by more than margin on
    the primary metric, both evaluated here on the same data (the snapshot's validation
    split, in the pipeline) with the same judge and seed."""
    client = _client(tracking_uri)
    mv = client.get_model_version(name, version)
    family = mv.tags.get("ganflow.family")
    if family not in ("gan", "cgan", "cyclegan"):
        raise RegistryError(f"{name} v{version} is not a ganflow model (no ganflow.family tag)")
    has_truth = getattr(heldout, "x_truth", None) is not None
    with promotion_lock(client, name):
        cfg, figures = evaluate_version(client, name, version, heldout, judge, seed, inception)
        metric, mode = primary_metric(cfg, has_truth)
        cand = figures[metric]
        client.set_model_version_tag(name, version, f"eval.{metric}", f"{cand:.6g}")
        try:
            champ_version = _resolve(client, name, "champion")
        except RegistryError:
            champ_version = None
        champ = None
        if champ_version is not None and champ_version != version:
            _, champ_figures = evaluate_version(
                client, name, champ_version, heldout, judge, seed, inception
            )
            champ = champ_figures[metric]
        if (
            champ_version is None
            or champ_version == version
            or _is_better(cand, champ, mode, margin)
        ):
            if champ_version == version:
                reason = f"v{version} is already the champion ({metric} {cand:.4g})"
            elif champ is None:
                reason = "no champion yet"
            else:
                reason = f"{metric} {cand:.4g} beats champion v{champ_version} {champ:.4g} by more than {margin:g} ({mode})"
            history = json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))
            if champ_version is not None and champ_version != version:
                history.append(champ_version)
            client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
            client.set_registered_model_alias(name, "champion", version)
            decision = "champion"
        else:
            reason = f"{metric} {cand:.4g} does not beat champion v{champ_version} {champ:.4g} by more than {margin:g} ({mode})"
            client.set_registered_model_alias(name, "challenger", version)
            decision = "rejected"
        tags = {"promotion.decision": decision, "promotion.reason": reason}
        if champ is not None:
            tags[f"eval.champion.{metric}"] = f"{champ:.6g}"
            tags["eval.champion.version"] = str(champ_version)
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
    return Decision(name, version, decision, metric, cand, champ, champ_version, margin, reason)


def rollback(name: str, tracking_uri: str | None = None) -> dict:
    """Move `champion` back to the previous champion; the demoted version is tagged."""
    client = _client(tracking_uri)
    with promotion_lock(client, name):
        current = _resolve(client, name, "champion")
        history = json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))
        if not history:
            raise RegistryError(
                f"{name} has no previous champion to roll back to (champion is v{current})"
            )
        previous = history.pop()
        client.set_registered_model_alias(name, "champion", previous)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        client.set_model_version_tag(name, current, "promotion.rolled_back", "true")
    return {"name": name, "champion": previous, "demoted": current}

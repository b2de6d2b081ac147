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

Two promotions (or a promotion and a rollback) on one model are serialised by a lock kept in
the registry itself, so it works across processes and machines with any MLflow backend:

- the lock is a registered model ``<name>.promotion-lock`` (tagged ``ganflow.lock``, left out
  of ganflow's listings); each contender adds a version to it, and MLflow numbers versions
  atomically and never reuses a number (deleted versions are kept, marked deleted);
- the live entry with the lowest number holds the lock (first come, first served);
- the holder renews a heartbeat tag on its entry while it works; an entry whose heartbeat a
  contender has watched stay unchanged for the holder's TTL (a tag on the entry; the
  contender's own TTL for entries from before) belongs to a crashed holder and is deleted by
  that contender. Staleness is timed on the contender's own clock from when it first saw that
  heartbeat: no clocks are compared across machines, and a registry outage, during which no
  holder can beat, is not counted against a live holder. Only a beat older than 10 minutes
  (or 10 TTLs) by the clock is taken as abandoned at first sight;
- every delete names one entry by its number: releasing deletes only one's own entry, and
  breaking a stale lock deletes only the stale entry, so a late holder can never delete its
  successor's lock (compare-and-delete by identity);
- a holder whose entry was broken (its process stalled past the TTL) finds out at its next
  heartbeat or at ``check()``, which promotion calls before it moves an alias.

A decision's writes (the history tag, the alias, the version's decision tags) are several
calls, and a process can die between any two. So the whole decision is first recorded as one
registered-model tag, ``ganflow.promotion_pending`` (one atomic write), then applied, then the
tag is deleted. Every write is idempotent: the next promotion or rollback of the model, under
the lock, finds a pending decision and completes it before anything else (a crash before the
record leaves the registry as it was; after it, as if the process had not died). A version
registered by a process that died before its promotion keeps no alias and no decision tag.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

from flows.registry.models import (
    LOCK_SUFFIX,
    LOCK_TAG,
    _client,
    _resolve,
    check_model_name,
    load_generator,
)
from flows.registry.package import HISTORY_TAG, RegistryError
from flows.storage import with_retries
from gan_core.config import GanConfig
from gan_core.evaluate import evaluate, gate_failure, primary_metric
from gan_core.overrides import apply_overrides

# Figures the gate reads, tagged on the version beside the primary metric so a rejection by
# the gate can be checked from the registry alone.
GATE_FIGURES = ("class_accuracy", "class_accuracy_floor")
PENDING_TAG = "ganflow.promotion_pending"
ABANDONED_AFTER_S = 600.0  # see PromotionLock._stale
LOCK_SOURCE = "ganflow:/promotion-lock"  # no artifacts behind it; an absolute path, as
# MLflow's server requires of any model version source (a relative one is refused)


def _transient(exc) -> bool:
    """A registry error worth one more try: MLflow's name for a locked SQLite file (past its
    20 s busy timeout, or at once when two writers' transactions cross) and a server's 503."""
    return getattr(exc, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


def _retrying(call, *args, **kwargs):
    """call(*args, **kwargs), tried again (4 tries in all) on a transient registry error (a
    failed SQLite write is rolled back, so a retry does it once). For the lock's calls and the
    decision's writes, which are idempotent: on one SQLite file, another model's promotion or
    a training run's logging can cross them (the pipeline promotes its families side by
    side)."""
    return with_retries(call, *args, attempts=4, transient=_transient, **kwargs)


class PromotionLock:
    """One contender for ``<name>.promotion-lock`` (see the module notes)."""

    def __init__(
        self, client, name: str, ttl_s: float = 60.0, wait_s: float = 120.0, heartbeat_s=None
    ) -> None:
        self.client, self.name, self.ttl_s, self.wait_s = client, name, ttl_s, wait_s
        self.lock = f"{name}{LOCK_SUFFIX}"
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, ttl_s / 4)
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None
        self._seen: dict[str, tuple[str, float]] = {}  # entry -> (heartbeat, first seen)

    # --- the registry side --------------------------------------------------------------

    def _ensure_container(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            held = _retrying(self.client.get_registered_model, self.lock)
        except MlflowException as exc:
            if _transient(exc):
                raise
            held = None
        if held is not None and LOCK_TAG not in held.tags:
            self._wait_for_legacy(held)
            held = None
        if held is None:
            with contextlib.suppress(MlflowException):  # a concurrent contender made it
                _retrying(
                    self.client.create_registered_model,
                    self.lock,
                    tags={LOCK_TAG: "2"},
                    description="ganflow promotion lock (internal; not a model)",
                )

    def _wait_for_legacy(self, held) -> None:
        """A lock taken by an older ganflow (the whole registered model, deleted on release):
        wait for it, or break it once older than the TTL."""
        from mlflow.exceptions import MlflowException

        while True:
            created = float(held.tags.get("created", "0") or 0)
            if time.time() - created > self.ttl_s:
                with contextlib.suppress(MlflowException):
                    self.client.delete_registered_model(self.lock)
                return
            self._sleep_or_time_out()
            try:
                held = self.client.get_registered_model(self.lock)
            except MlflowException:
                return  # released
            if LOCK_TAG in held.tags:
                return

    def _entries(self) -> list:
        """Live entries, lowest number first."""
        found = _retrying(self.client.search_model_versions, f"name = '{self.lock}'")
        return sorted(found, key=lambda mv: int(mv.version))

    def _stale(self, mv) -> bool:
        # Timed from when this contender first saw the entry's current heartbeat (see the
        # module notes): the beat's own timestamp is another machine's clock, and right after
        # an outage every holder's beat is old. The holder's own TTL, which its heartbeat is
        # paced for: judged by a contender's shorter one, a live holder was broken.
        beat, now = mv.tags.get("heartbeat", ""), time.monotonic()
        seen = self._seen.get(str(mv.version))
        if seen is None or seen[0] != beat:
            self._seen[str(mv.version)] = (beat, now)
            seen = (beat, now)
        try:
            ttl = float(mv.tags.get("ttl_s") or self.ttl_s)
        except ValueError:
            ttl = self.ttl_s
        # A beat far older than any outage or clock skew worth waiting out (a promoter that
        # died yesterday) is broken at once rather than after one more TTL of watching.
        with contextlib.suppress(ValueError):
            if time.time() - float(beat) > max(10 * ttl, ABANDONED_AFTER_S):
                return True
        return now - seen[1] > ttl

    def _sleep_or_time_out(self) -> None:
        if time.monotonic() > self._deadline:
            self._withdraw()
            raise RegistryError(
                f"timed out after {self.wait_s:g} s waiting for the promotion lock of "
                f"{self.name!r} (another promotion or rollback is running)"
            )
        time.sleep(0.1)

    def acquire(self) -> PromotionLock:
        from mlflow.exceptions import MlflowException

        self._deadline = time.monotonic() + self.wait_s
        self._ensure_container()
        mv = _retrying(
            self.client.create_model_version,
            self.lock,
            LOCK_SOURCE,
            tags={
                "owner": self.token,
                "heartbeat": f"{time.time():.3f}",
                "ttl_s": f"{self.ttl_s:g}",
            },
        )
        self.version = str(mv.version)
        while True:
            entries = self._entries()
            if not any(str(e.version) == self.version for e in entries):
                raise RegistryError(f"the promotion lock entry of {self.name!r} vanished")
            head = entries[0]
            if str(head.version) == self.version:
                break
            if self._stale(head):
                # Deletes exactly that entry: if its holder released it meanwhile, or another
                # contender broke it first, this fails and nothing else is touched.
                with contextlib.suppress(MlflowException):
                    self.client.delete_model_version(self.lock, head.version)
                continue
            self._sleep_or_time_out()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="ganflow-lock")
        self._thread.start()
        return self

    def _beat(self) -> None:
        from mlflow.exceptions import MlflowException

        while not self._stop.wait(self.heartbeat_s):
            try:
                self.client.set_model_version_tag(
                    self.lock, self.version, "heartbeat", f"{time.time():.3f}"
                )
            except MlflowException as exc:
                # Only a missing entry means the lock was broken. Anything else (a SQLite file
                # another writer holds past MLflow's 20 s busy timeout, a server's 503) is transient:
                # giving up the beat on it let a contender break a live holder's lock.
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    self._lost = True
                    return
            except Exception:  # a transient failure (a dropped connection); beat again
                continue

    def check(self) -> None:
        """Raise unless this contender still holds the lock (call before writes)."""
        if self._lost or not self._still_held():
            self._lost = True
            raise RegistryError(
                f"lost the promotion lock of {self.name!r} (held past its {self.ttl_s:g} s "
                "TTL without a heartbeat); nothing more was changed"
            )

    def _still_held(self) -> bool:
        entries = self._entries()
        return bool(entries) and str(entries[0].version) == self.version

    def _withdraw(self) -> None:
        """Delete this contender's own entry, and nothing else."""
        from mlflow.exceptions import MlflowException

        if self.version is not None:
            with contextlib.suppress(MlflowException):
                _retrying(self.client.delete_model_version, self.lock, self.version)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._withdraw()


@contextlib.contextmanager
def promotion_lock(
    client, name: str, ttl_s: float = 60.0, wait_s: float = 120.0, heartbeat_s=None
) -> Iterator[PromotionLock]:
    """Mutual exclusion across processes and machines through the registry itself."""
    lock = PromotionLock(client, name, ttl_s, wait_s, heartbeat_s).acquire()
    try:
        yield lock
    finally:
        lock.release()


def _apply(client, name: str, intent: dict) -> None:
    """A decision's writes, each idempotent, then the record of it goes."""
    if intent.get("history") is not None:
        _retrying(client.set_registered_model_tag, name, HISTORY_TAG, json.dumps(intent["history"]))
    for alias, version in intent.get("aliases", {}).items():
        _retrying(client.set_registered_model_alias, name, alias, version)
    for version, tags in intent.get("version_tags", {}).items():
        for k, v in tags.items():
            _retrying(client.set_model_version_tag, name, version, k, v)
    _retrying(client.delete_registered_model_tag, name, PENDING_TAG)


def _commit(client, name: str, lock: PromotionLock, intent: dict) -> None:
    """Record the decision (one write), then apply it (see the module notes)."""
    lock.check()  # a stalled promoter whose lock was broken must not write
    _retrying(client.set_registered_model_tag, name, PENDING_TAG, json.dumps(intent))
    _apply(client, name, intent)


def finish_interrupted(client, name: str) -> dict | None:
    """Complete a decision a crash cut short (call under the lock); returns it, or None."""
    raw = client.get_registered_model(name).tags.get(PENDING_TAG)
    if not raw:
        return None
    intent = json.loads(raw)
    _apply(client, name, intent)
    return intent


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ChampionMeasure:
    """The champion measured under promotion's conditions on data it was not trained on:
    its ``figures``, the primary ``metric``'s ``value`` and ``mode``, and the figure tagged
    at its own promotion (``at_promotion``, on its own snapshot; None when untagged). Or,
    when it could not be measured there, only ``error`` (one line)."""

    version: str | None = None
    metric: str | None = None
    mode: str | None = None
    value: float | None = None
    at_promotion: float | None = None
    figures: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict:
        """As JSON values, the keys ``ganflow run --json`` has always printed for each case."""
        if self.error is not None:
            return {"error": self.error, "figures": dict(self.figures)}
        return {
            "version": self.version,
            "metric": self.metric,
            "mode": self.mode,
            "value": self.value,
            "at_promotion": self.at_promotion,
            "figures": dict(self.figures),
        }


def _is_better(candidate: float, champion: float, mode: str, margin: float) -> bool:
    return candidate < champion - margin if mode == "min" else candidate > champion + margin


def evaluate_version(
    client, name: str, version: str, heldout, judge, seed: int = 0, inception=None
) -> tuple[GanConfig, dict[str, float]]:
    """The version's config and figures under fixed conditions: the given held-out data,
    judge, seed and metric code (FID/KID exactly when ``inception`` is given)."""
    gen = load_generator(client, name, version)
    cfg, models = gen.cfg, gen.nets
    cfg = apply_overrides(cfg, {"eval.inception": inception is not None})
    return cfg, evaluate(cfg, models, heldout, judge, seed=seed, inception=inception)


def measure_champion(
    name: str, heldout, judge, seed: int = 0, inception=None, tracking_uri: str | None = None
) -> ChampionMeasure | None:
    """The champion under the conditions promotion uses (the given held-out data, judge,
    seed), without the lock (nothing is written): how the model in use does on data it was
    not trained on. Also returns the figure tagged at its own promotion (``eval.<metric>``,
    measured on its own snapshot) for comparison. None when the model has no champion."""
    client = _client(tracking_uri)
    try:
        version = _resolve(client, name, "champion")
    except RegistryError:
        return None
    cfg, figures = evaluate_version(client, name, version, heldout, judge, seed, inception)
    metric, mode = primary_metric(cfg, getattr(heldout, "x_truth", None) is not None)
    before = client.get_model_version(name, version).tags.get(f"eval.{metric}")
    return ChampionMeasure(
        version=str(version),
        metric=metric,
        mode=mode,
        value=figures[metric],
        at_promotion=float(before) if before else None,
        figures=figures,
    )


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
    """Make version the champion if it passes the gate and beats the current champion by more
    than margin on the primary metric, both evaluated here on the same data (the snapshot's
    validation split, in the pipeline) with the same judge and seed.

    The gate (``gan_core.evaluate.gate_failure``) comes before any ranking: a candidate whose
    primary figure is not finite, or a cGAN whose samples the judge does not classify as
    their labels, is rejected with the reason in one line, even when there is no champion.
    A champion that fails the gate under today's conditions loses to any candidate that
    passes it."""
    client = _client(tracking_uri)
    mv = client.get_model_version(name, version)
    family = mv.tags.get("ganflow.family")
    if family not in ("gan", "cgan", "cyclegan"):
        raise RegistryError(f"{name} v{version} is not a ganflow model (no ganflow.family tag)")
    has_truth = getattr(heldout, "x_truth", None) is not None
    with promotion_lock(client, name) as lock:
        finish_interrupted(client, name)
        cfg, figures = evaluate_version(client, name, version, heldout, judge, seed, inception)
        metric, mode = primary_metric(cfg, has_truth)
        cand = figures[metric]
        _retrying(client.set_model_version_tag, name, version, f"eval.{metric}", f"{cand:.6g}")
        for k in GATE_FIGURES:
            if k in figures:
                _retrying(
                    client.set_model_version_tag, name, version, f"eval.{k}", f"{figures[k]:.6g}"
                )
        failed = gate_failure(figures, metric)
        try:
            champ_version = _resolve(client, name, "champion")
        except RegistryError:
            champ_version = None
        champ = champ_failed = None
        # A candidate that fails the gate loses whatever the champion measures: no need to
        # spend an evaluation on the champion.
        if failed is None and champ_version is not None and champ_version != version:
            _, champ_figures = evaluate_version(
                client, name, champ_version, heldout, judge, seed, inception
            )
            champ = champ_figures[metric]
            champ_failed = gate_failure(champ_figures, metric)
        if failed is None and (
            champ_version is None
            or champ_version == version
            or champ_failed is not None
            or _is_better(cand, champ, mode, margin)
        ):
            if champ_version == version:
                reason = f"v{version} is already the champion ({metric} {cand:.4g})"
            elif champ_version is None:
                reason = "no champion yet"
            elif champ_failed is not None:
                reason = (
                    f"champion v{champ_version} fails the gate ({champ_failed}); v{version} passes"
                )
            else:
                reason = f"{metric} {cand:.4g} beats champion v{champ_version} {champ:.4g} by more than {margin:g} ({mode})"
            history = json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))
            if champ_version is not None and champ_version != version:
                history.append(champ_version)
            aliases = {"champion": version}
            decision = "champion"
        else:
            if failed is not None:
                reason = f"v{version} fails the gate: {failed}"
            else:
                reason = f"{metric} {cand:.4g} does not beat champion v{champ_version} {champ:.4g} by more than {margin:g} ({mode})"
            history = None
            aliases = {"challenger": version} if champ_version != version else {}
            decision = "rejected"
        tags = {"promotion.decision": decision, "promotion.reason": reason}
        if champ is not None:
            tags[f"eval.champion.{metric}"] = f"{champ:.6g}"
            tags["eval.champion.version"] = str(champ_version)
        intent = {"history": history, "aliases": aliases, "version_tags": {version: tags}}
        _commit(client, name, lock, intent)
    return Decision(name, version, decision, metric, cand, champ, champ_version, margin, reason)


def rollback(name: str, tracking_uri: str | None = None) -> dict:
    """Move `champion` back to the previous champion; the demoted version is tagged."""
    check_model_name(name)  # NAME/1 or NAME@x: one line now, not after the lock
    client = _client(tracking_uri)
    _resolve(client, name, None)  # an unknown model or no champion: before the lock too
    with promotion_lock(client, name) as lock:
        finish_interrupted(client, name)
        current = _resolve(client, name, "champion")
        history = json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))
        if not history:
            raise RegistryError(
                f"{name} has no previous champion to roll back to (champion is v{current})"
            )
        previous = history.pop()
        intent = {
            "history": history,
            "aliases": {"champion": previous},
            "version_tags": {current: {"promotion.rolled_back": "true"}},
        }
        _commit(client, name, lock, intent)
    return {"name": name, "champion": previous, "demoted": current}

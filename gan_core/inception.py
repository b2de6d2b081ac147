"""FID and KID in Inception-v3 features, the numbers other GAN papers report.

The project's own Fréchet distance (:mod:`gan_core.metrics`) lives in the feature space of a
digits classifier it trains itself: good for comparing runs of this project, meaningless
next to published numbers. FID and KID are only comparable across projects when everybody
uses the same network, the same weights and the same resizing, so nothing here is written
by hand:

- the feature network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the
  TensorFlow-FID Inception "pt_inception-2015-12-05", with TensorFlow-1.x-compatible
  bilinear resizing to 299x299 inside it), 2048-d pool features; not torchmetrics'
  integer ``feature=`` wrapper, whose default antialiased resize is not the standard FID's;
- FID and KID are torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance``, whose statistics are float64;
- the weights are the standard file, checked against a pinned sha256 and loaded
  weights-only, from a configured local path: nothing is downloaded unless asked for
  (``GANFLOW_FID_DOWNLOAD=1``), because training clusters are often offline and a silent
  download of another file would change every number.

Why torch-fidelity is imported in a roundabout way: its package ``__init__`` imports its
CLIP/VGG/DINOv2 extractors, which import torchvision, and torchvision's PyPI wheels do not
import beside this project's pinned torch (and would replace it if installed with their
dependencies; see the Makefile). The Inception extractor itself needs only torch, so
:func:`_torch_fidelity_inception` registers the ``torch_fidelity`` package without running
its ``__init__`` and imports just that submodule. torchmetrics' image metrics import the same
submodule, so they are imported only after that (:func:`_metric_classes`): in a process with
torch-fidelity installed and no torchvision, a plain ``import torchmetrics`` fails unless this
module has set up the import first.

Everything here is a pure function of its arguments and the environment variables below; no
Prefect/Ray/MLflow imports, so workers and the CLI preflight can use it alike.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import pickle
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

# The standard FID weights, as torch-fidelity names and publishes them. torch.hub's naming
# convention makes the file-name suffix the first 8 hex digits of the file's sha256, which
# torch-fidelity's own URL constant carries; the full digest below is the one published for
# this file (95,628,359 bytes; the same digest is published for pytorch-fid's
# pt_inception-2015-12-05-6726825d.pth) by several independent projects that pin it. The
# file could not be fetched to recompute it here (no internet): the 8-digit prefix is
# verified against torch-fidelity's URL (tests/test_inception.py), the rest is as published.
FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

ENV_WEIGHTS = "GANFLOW_FID_WEIGHTS"
ENV_WEIGHTS_SHA256 = "GANFLOW_FID_WEIGHTS_SHA256"
ENV_DOWNLOAD = "GANFLOW_FID_DOWNLOAD"

# The pool3 layer: the 2048-d features FID and KID are defined on.
FEATURE_DIM = 2048
_FEATURE_LAYER = str(FEATURE_DIM)
# torchmetrics' name for this extractor; torch-fidelity only uses it as a label.
_EXTRACTOR_NAME = "inception-v3-compat"
# KID draws random subsets through torch's global generator; a fixed seed (inside a forked
# RNG state, so the caller's stream is untouched) makes the same inputs give the same KID.
KID_SEED = 0

_HINT = f"set {ENV_WEIGHTS} to a copy of {FID_WEIGHTS_FILE} (see README 'FID and KID')"


class FidWeightsError(ValueError):
    """The FID weights are missing, unreadable or not the pinned file (one-line message)."""


def _one_line(text: object) -> str:
    """First line of an exception text: messages here are read in CLI output and logs."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(text).__name__


def ganflow_home() -> Path:
    """GANFLOW_HOME, default ./.ganflow (the same rule as flows.settings; gan_core does not
    import flows)."""
    return Path(os.environ.get("GANFLOW_HOME", ".ganflow")).absolute()


def default_weights_path() -> Path:
    """Where the weights are looked for when no path is configured (and downloaded to when
    GANFLOW_FID_DOWNLOAD=1)."""
    return ganflow_home() / "cache" / FID_WEIGHTS_FILE


def expected_sha256() -> str:
    """The pinned digest, or GANFLOW_FID_WEIGHTS_SHA256 (tests, or a site that converted its
    own copy) when set."""
    override = os.environ.get(ENV_WEIGHTS_SHA256, "").strip().lower()
    if not override:
        return FID_WEIGHTS_SHA256
    if len(override) != 64 or any(c not in "0123456789abcdef" for c in override):
        raise FidWeightsError(
            f"FID weights: {ENV_WEIGHTS_SHA256}={override!r} is not a 64-hex-digit sha256"
        )
    return override


# (resolved path, mtime_ns, size) -> sha256: hashing the 95 MB file takes a noticeable
# fraction of a second, and preflight, loader and every evaluation call resolve it again.
_HASHES: dict[tuple[str, int, int], str] = {}
_HASHES_LOCK = threading.Lock()


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _HASHES_LOCK:
        cached = _HASHES.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _HASHES_LOCK:
        _HASHES[key] = value
    return value


def _download(dest: Path, expected: str) -> None:
    """Fetch torch-fidelity's published file into the cache; only with GANFLOW_FID_DOWNLOAD=1.

    The file lands under a temporary name and is moved into place only once its hash
    matches, so an interrupted or wrong download never sits at the cache path.
    """
    url = _torch_fidelity_inception().URL_INCEPTION_V3
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        torch.hub.download_url_to_file(url, str(part), hash_prefix=None, progress=False)
    except Exception as exc:  # any network/IO failure becomes one line
        part.unlink(missing_ok=True)
        raise FidWeightsError(
            f"FID weights: {ENV_DOWNLOAD}=1 but downloading {url} failed "
            f"({type(exc).__name__}: {_one_line(exc)}); {_HINT}"
        ) from exc
    digest = _sha256(part)
    if digest != expected:
        part.unlink(missing_ok=True)
        raise FidWeightsError(
            f"FID weights: downloaded {url} has sha256 {digest}, which does not match the "
            f"pinned {expected}; {_HINT}"
        )
    os.replace(part, dest)


def resolve_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """Find the FID weights and check their sha256; raise FidWeightsError if that fails.

    Order: ``path``, else GANFLOW_FID_WEIGHTS, else ``$GANFLOW_HOME/cache/<file>``, which is
    downloaded only when GANFLOW_FID_DOWNLOAD=1. The hash is computed once per file version
    (path, mtime, size) in this process.
    """
    expected = expected_sha256()
    env_value = os.environ.get(ENV_WEIGHTS, "").strip()
    if path is not None:
        candidate, setting = Path(path), f"weights path argument {path} ({ENV_WEIGHTS} unused)"
    elif env_value:
        candidate, setting = Path(env_value), f"{ENV_WEIGHTS}={env_value}"
    else:
        candidate = default_weights_path()
        setting = f"cache file {candidate}"
        if not candidate.exists():
            if os.environ.get(ENV_DOWNLOAD, "").strip() != "1":
                raise FidWeightsError(
                    f"no FID weights configured: {_HINT}, or put it at {candidate} "
                    f"(or set {ENV_DOWNLOAD}=1 where the internet is reachable)"
                )
            _download(candidate, expected)
    if not candidate.is_file():
        raise FidWeightsError(f"FID weights: {setting} does not exist; {_HINT}")
    digest = _sha256(candidate)
    if digest != expected:
        overridden = expected != FID_WEIGHTS_SHA256
        pinned = f"{ENV_WEIGHTS_SHA256} {expected}" if overridden else f"pinned {expected}"
        raise FidWeightsError(
            f"FID weights: {setting} has sha256 {digest}, which does not match the "
            f"{pinned}; {_HINT}"
        )
    return candidate


def check_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """Preflight: the weights resolve and match the pinned hash. Touches no network and
    imports neither torchmetrics nor (unless downloading) torch-fidelity: it costs one hash
    of the file per process, then nothing."""
    return resolve_weights(path)


def _torch_fidelity_inception() -> ModuleType:
    """``torch_fidelity.feature_extractor_inceptionv3`` without torch-fidelity's ``__init__``.

    That ``__init__`` imports torchvision (for other extractors); see the module docstring.
    The package is registered from its import spec, unexecuted, so its submodules import
    normally; if torch_fidelity was already imported (a working torchvision), it is reused.
    """
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or spec.submodule_search_locations is None:
            raise ModuleNotFoundError(
                "torch-fidelity is not installed: run `make setup` (it installs "
                "torch-fidelity==0.4.0 with --no-deps)"
            )
        sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def _metric_classes() -> tuple[type[Any], type[Any]]:
    """torchmetrics' FID and KID classes (their modules import torch-fidelity's extractor at
    import time, so the torchvision-free import above must come first)."""
    _torch_fidelity_inception()
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    return FrechetInceptionDistance, KernelInceptionDistance


def _load_state_dict(weights: Path) -> dict[str, Tensor]:
    """Weights-only load: the file is data, never code (a pickled payload is refused).

    The bytes are read once and hashed again: what is loaded is exactly what was checked,
    even if the file was replaced after :func:`resolve_weights` (whose hash is cached).
    """
    data = weights.read_bytes()
    digest, expected = hashlib.sha256(data).hexdigest(), expected_sha256()
    if digest != expected:
        raise FidWeightsError(
            f"FID weights: {weights} changed while loading (sha256 {digest}, expected "
            f"{expected}); {_HINT}"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise FidWeightsError(
            f"FID weights: {weights} is not a weights-only state dict "
            f"({type(exc).__name__}: {_one_line(exc)}); {_HINT}"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise FidWeightsError(
            f"FID weights: {weights} holds a {type(state).__name__}, not a state dict of "
            f"tensors; {_HINT}"
        )
    return state


def load_extractor(
    path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """torch-fidelity's Inception-v3 feature extractor (2048-d pool features) with the
    checked weights, in eval mode, without gradients, on ``device``.

    Input: uint8 images [N, 3, H, W] in [0, 255] of any size (it resizes to 299 itself);
    output: a 1-tuple holding float32 features [N, 2048]. Use :func:`features` for [-1, 1]
    float images.
    """
    weights = resolve_weights(path)
    state = _load_state_dict(weights)
    # torch-fidelity's constructor always loads its weights itself, from a URL or with
    # torch.load(..., weights_only=False), which would execute a pickled payload. It gets a
    # buffer re-serialized from the weights-only result instead: those bytes hold nothing but
    # the tensors this process just validated, so its unsafe load has nothing to execute.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    del state
    module = _torch_fidelity_inception()
    try:
        extractor = module.FeatureExtractorInceptionV3(
            _EXTRACTOR_NAME, [_FEATURE_LAYER], feature_extractor_weights_path=buffer
        )
    except RuntimeError as exc:  # missing/unexpected keys or shapes from load_state_dict
        raise FidWeightsError(
            f"FID weights: {weights} does not fit torch-fidelity's Inception-v3 "
            f"({_one_line(exc)}); {_HINT}"
        ) from exc
    return extractor.to(device).eval()


def _check_images(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{name}: expected a [N, C, H, W] tensor")
    n, c, h, w = images.shape
    if c not in (1, 3) or h < 8 or w < 8 or not images.is_floating_point():
        raise ValueError(
            f"{name}: expected float images [N, 1|3, H>=8, W>=8] in [-1, 1], "
            f"got {images.dtype} {list(images.shape)}"
        )
    if n < 2:
        raise ValueError(f"{name}: FID and KID need at least 2 images, got {n}")


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 [0, 255] with 3 channels, what the extractor expects.

    Rounding to nearest inverts the usual ``x / 127.5 - 1`` scaling exactly, so real images
    that came from 8-bit files reach the network as their original bytes; grayscale is
    replicated to RGB, as FID implementations do for grayscale datasets.
    """
    from gan_core.data import to_uint8 as eight_bit

    out = eight_bit(images.detach())
    return out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def features(images: Tensor, extractor: nn.Module, batch_size: int = 64) -> Tensor:
    """Inception pool features [N, 2048] (float64, on CPU) of [-1, 1] images [N, 1|3, H, W].

    Runs in batches under ``torch.inference_mode``: every image is resized to 299x299 inside
    the network, so cost does not depend on H, W. Measured on 2 CPU cores: ~0.13 s per image
    (about 2 minutes per 1,000), and ~20 MB of activations per image in a batch (batch 64:
    ~1.3 GB peak), so the batch size bounds peak memory.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(
            f"features: expected float images [N, 1|3, H, W] in [-1, 1], got "
            f"{images.dtype} {list(images.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"features: batch_size must be >= 1, got {batch_size}")
    device = _device_of(extractor)
    chunks: list[Tensor] = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = to_uint8(images[start : start + batch_size]).to(device)
            out = extractor(batch)
            feats = out[0] if isinstance(out, (tuple, list)) else out
            chunks.append(feats.reshape(batch.shape[0], -1).to("cpu", torch.float64))
    if not chunks:
        return torch.empty(0, FEATURE_DIM, dtype=torch.float64)
    return torch.cat(chunks)


class _Precomputed(nn.Module):
    """Identity "feature extractor" for torchmetrics: the metrics get features computed once
    by :func:`features`, so the Inception pass (the whole cost) is not run twice, once per
    metric. ``num_features`` spares torchmetrics its probe with a dummy image."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def fid_kid_from_features(
    real_features: Tensor,
    fake_features: Tensor,
    *,
    kid_subsets: int = 10,
    kid_subset_size: int = 100,
) -> dict[str, float]:
    """FID and KID (mean and std over subsets) of two feature sets [N, D], via torchmetrics.

    Useful when the real side is fixed: compute its :func:`features` once per run. The KID
    subset size is clipped to the smaller sample count; subsets are drawn with KID_SEED.
    """
    for name, f in (("real_features", real_features), ("fake_features", fake_features)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name}: expected [N >= 2, D] features, got {list(f.shape)}")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"feature dims differ: {real_features.shape[1]} vs {fake_features.shape[1]}"
        )
    if kid_subsets < 1 or kid_subset_size < 2:
        raise ValueError("kid_subsets must be >= 1 and kid_subset_size >= 2")
    real64 = real_features.detach().to("cpu", torch.float64)
    fake64 = fake_features.detach().to("cpu", torch.float64)
    dim = real64.shape[1]
    fid_cls, kid_cls = _metric_classes()
    # Features reach the metrics as float64, which torchmetrics keeps: the FID covariances
    # are float64 anyway, and its result is cast back to the features' dtype, so float64
    # features also give a float64 FID and float64 KID kernels.
    fid_metric = fid_cls(feature=_Precomputed(dim))
    fid_metric.update(real64, real=True)
    fid_metric.update(fake64, real=False)
    fid = float(fid_metric.compute())
    subset_size = min(kid_subset_size, real64.shape[0], fake64.shape[0])
    with warnings.catch_warnings():
        # "will save all extracted features in buffer": intended, the features are in memory.
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        kid_metric = kid_cls(
            feature=_Precomputed(dim), subsets=kid_subsets, subset_size=subset_size
        )
    kid_metric.update(real64, real=True)
    kid_metric.update(fake64, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(KID_SEED)
        kid_mean, kid_std = kid_metric.compute()
    return {"fid": fid, "kid": float(kid_mean), "kid_std": float(kid_std)}


def fid_kid(
    real: Tensor,
    fake: Tensor,
    extractor: nn.Module | None = None,
    *,
    kid_subsets: int = 10,
    kid_subset_size: int = 100,
    batch_size: int = 64,
) -> dict[str, float]:
    """FID and KID between real and fake images: ``{"fid", "kid", "kid_std"}``.

    Images are float [N, 1|3, H, W] in [-1, 1], H, W >= 8, N >= 2 per side; the extractor
    (default: :func:`load_extractor` with the configured weights) resizes them to 299x299.
    FID from fewer than a few thousand images is biased upwards; compare numbers computed
    from the same sample counts only. KID is unbiased, hence its use for small samples.
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    if extractor is None:
        extractor = load_extractor()
    return fid_kid_from_features(
        features(real, extractor, batch_size),
        features(fake, extractor, batch_size),
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
    )

"""gan_core.inception: FID/KID through torch-fidelity's Inception and torchmetrics' metrics.

Nothing is downloaded: the weights file is torch-fidelity's Inception-v3 architecture with a
seeded random init, saved here, and its hash is passed through GANFLOW_FID_WEIGHTS_SHA256.
The parity reference is computed without torchmetrics: features straight from the
extractor on images converted here, FID from the nuclear-norm identity (not torchmetrics'
eigenvalues, not scipy's sqrtm), KID as the unbiased polynomial-kernel MMD in numpy.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gan_core import inception as inc

N_PER_SIDE = 24
SIZE = 32


def _random_init_extractor(seed: int = 0) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with a seeded random init, no weights file.

    Its constructor insists on loading weights (from a URL when given no path): the URL
    loader is replaced by one returning None, and the subclass keeps the random init when
    handed None, so no network is touched. Convolutions get He init: PyTorch's default init
    shrinks activations ~100x per stage here and pool features ended near 1e-8, where
    the metrics would compare rounding noise.
    """
    mod = inc._torch_fidelity_inception()

    class _RandomInit(mod.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # type: ignore[override]
            if state_dict is None:
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "load_state_dict_from_url", lambda *a, **k: None)
        torch.manual_seed(seed)
        net = _RandomInit("inception-v3-compat", ["2048"])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fid-weights") / "random-inception.pth"
    torch.save(_random_init_extractor().state_dict(), path)
    return path


@pytest.fixture
def fid_env(monkeypatch, weights_file) -> Path:
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(weights_file))
    monkeypatch.setenv(inc.ENV_WEIGHTS_SHA256, _sha256(weights_file))
    monkeypatch.delenv(inc.ENV_DOWNLOAD, raising=False)
    return weights_file


@pytest.fixture(scope="module")
def extractor(weights_file) -> nn.Module:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(inc.ENV_WEIGHTS_SHA256, _sha256(weights_file))
        return inc.load_extractor(weights_file)


def _images(seed: int, n: int = N_PER_SIDE, contrast: float = 1.0) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1]: more varied features than pixel noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    up = nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return torch.tanh(contrast * up)


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    return _images(1)


@pytest.fixture(scope="module")
def fake_images() -> torch.Tensor:
    return _images(2, contrast=0.5)


def _reference_features(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    """The library extractor called directly on uint8 [0, 255] images converted here."""
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        return net(u8)[0].double().numpy()


@pytest.fixture(scope="module")
def ref_features(extractor, real_images, fake_images) -> tuple[np.ndarray, np.ndarray]:
    return _reference_features(extractor, real_images), _reference_features(extractor, fake_images)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID with tr sqrt(S1 S2) = ||A B^T||_* / sqrt((n-1)(m-1)) for centred A, B: the
    non-zero eigenvalues of S1 S2 are the squared singular values of A B^T, scaled."""
    ac, bc = a - a.mean(0), b - b.mean(0)
    n, m = len(a), len(b)
    tr_sqrt = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    traces = (ac**2).sum() / (n - 1) + (bc**2).sum() / (m - 1)
    return float(mean_term + traces - 2 * tr_sqrt)


def _reference_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 on the full sets (KID, one subset)."""
    d = a.shape[1]
    kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    n, m = len(a), len(b)
    xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


@pytest.mark.slow
def test_parity_with_independent_reference(
    fid_env, extractor, real_images, fake_images, ref_features
):
    # A subset size above the sample count is clipped to it: every KID subset is then the
    # whole set (MMD does not depend on order), so KID is the full-set unbiased MMD.
    got = inc.fid_kid(real_images, fake_images, extractor, kid_subset_size=1000, batch_size=20)
    ref_real, ref_fake = ref_features
    fid, kid = _reference_fid(ref_real, ref_fake), _reference_kid(ref_real, ref_fake)
    assert fid > 1e-3 and kid > 1e-5  # a parity of two near-zero numbers would prove nothing
    assert got["fid"] == pytest.approx(fid, rel=1e-3)
    assert got["kid"] == pytest.approx(kid, rel=1e-3)
    assert got["kid_std"] == pytest.approx(0.0, abs=1e-6 * kid + 1e-12)
    assert "torchvision" not in sys.modules


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_reference_fid_matches_scipy_sqrtm(ref_features):
    """The reference itself against the classic formula (scipy sqrtm, ~10 s for 2048-d)."""
    from scipy import linalg

    a, b = ref_features
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    classic = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert _reference_fid(a, b) == pytest.approx(classic, rel=1e-6)


@pytest.mark.slow
def test_self_zero_shift_grows_deterministic(fid_env, extractor, real_images, ref_features):
    real = torch.from_numpy(ref_features[0])
    same = inc.fid_kid_from_features(real, real, kid_subset_size=16)
    scale = float(real.var(0).sum())  # FID's own units: the total feature variance
    # Not exactly 0: torchmetrics takes eigenvalues of the non-symmetric S @ S (measured
    # ~4e-6 of the scale here).
    assert abs(same["fid"]) < 1e-4 * scale

    half = N_PER_SIDE // 2
    shifted = torch.cat([real_images[:half] + 0.25, real_images[:half] + 0.6])
    feats = inc.features(shifted.clamp(-1, 1), extractor, batch_size=32)
    state = torch.random.get_rng_state()
    small = inc.fid_kid_from_features(real, feats[:half], kid_subset_size=1000)
    large = inc.fid_kid_from_features(real, feats[half:], kid_subset_size=1000)
    again = inc.fid_kid_from_features(real, feats[half:], kid_subset_size=1000)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded KID leaves caller's RNG
    assert 1e-3 * scale < small["fid"] < large["fid"]
    assert 0 < small["kid"] < large["kid"]
    assert abs(same["kid"]) < 0.1 * small["kid"]  # seeded subsets of one set: noise only
    assert large == again  # seeded KID subsets


@pytest.mark.slow
def test_features_grayscale_and_conversion(extractor):
    gray = _images(5, n=2)[:, :1]
    rgb = gray.expand(-1, 3, -1, -1)
    f_gray = inc.features(gray, extractor, batch_size=1)
    assert f_gray.shape == (2, inc.FEATURE_DIM) and f_gray.dtype == torch.float64
    assert torch.equal(f_gray, inc.features(rgb, extractor, batch_size=2))
    u8 = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(inc.to_uint8(u8.float() / 127.5 - 1), u8)  # exact round trip


@pytest.mark.slow
def test_bad_images_raise(fid_env, extractor):
    ok = _images(6, n=2)
    for bad in (ok[:, :2], ok[:, :, :7, :7], ok[:1], (ok * 100).to(torch.uint8), ok[0]):
        with pytest.raises(ValueError):
            inc.fid_kid(bad, ok, extractor)


def _error(path: str | None = None) -> str:
    with pytest.raises(inc.FidWeightsError) as info:
        inc.check_weights(path)
    message = str(info.value)
    assert "\n" not in message and inc.ENV_WEIGHTS in message
    return message


def test_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(tmp_path / "nope.pth"))
    assert f"{inc.ENV_WEIGHTS}={tmp_path / 'nope.pth'} does not exist" in _error()


def test_wrong_hash(monkeypatch, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(2)}, path)
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(path))
    monkeypatch.delenv(inc.ENV_WEIGHTS_SHA256, raising=False)
    message = _error()
    assert "does not match the pinned" in message and inc.FID_WEIGHTS_SHA256 in message
    monkeypatch.setenv(inc.ENV_WEIGHTS_SHA256, "0" * 64)
    assert f"{inc.ENV_WEIGHTS_SHA256} {'0' * 64}" in _error()
    monkeypatch.setenv(inc.ENV_WEIGHTS_SHA256, "abc")
    with pytest.raises(inc.FidWeightsError, match=inc.ENV_WEIGHTS_SHA256):
        inc.check_weights()


def test_nothing_configured_never_downloads(monkeypatch):
    monkeypatch.delenv(inc.ENV_WEIGHTS, raising=False)
    monkeypatch.delenv(inc.ENV_DOWNLOAD, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("network fetch attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert _error().startswith("no FID weights configured: set GANFLOW_FID_WEIGHTS")


def test_hash_cached_per_version_and_rechecked_on_change(monkeypatch, tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"a" * 100)
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(path))
    monkeypatch.setenv(inc.ENV_WEIGHTS_SHA256, _sha256(path))
    calls = []
    real_sha256 = hashlib.sha256

    def counting(*args, **kwargs):
        calls.append(1)
        return real_sha256(*args, **kwargs)

    monkeypatch.setattr(inc.hashlib, "sha256", counting)
    assert inc.check_weights() == path
    assert inc.resolve_weights() == path
    assert len(calls) == 1
    path.write_bytes(b"b" * 100)  # same size, new content and mtime
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert "does not match" in _error()


def test_argument_and_cache_locations(monkeypatch, tmp_path):
    arg, cached = tmp_path / "arg.pth", inc.default_weights_path()
    arg.write_bytes(b"x")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    monkeypatch.setenv(inc.ENV_WEIGHTS_SHA256, _sha256(arg))
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(tmp_path / "ignored.pth"))
    assert inc.resolve_weights(arg) == arg
    monkeypatch.delenv(inc.ENV_WEIGHTS)
    assert inc.resolve_weights() == cached
    assert cached.parent == Path(os.environ["GANFLOW_HOME"]).absolute() / "cache"


def test_download_only_when_asked_and_checked(monkeypatch, tmp_path):
    monkeypatch.delenv(inc.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(inc.ENV_DOWNLOAD, "1")
    monkeypatch.setenv(inc.ENV_WEIGHTS_SHA256, hashlib.sha256(b"weights").hexdigest())
    urls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # stands in for the network
        urls.append(url)
        Path(dst).write_bytes(payload)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    payload = b"tampered"
    assert "does not match" in _error()
    assert not inc.default_weights_path().exists()  # a bad download never sits in the cache
    payload = b"weights"
    assert inc.resolve_weights() == inc.default_weights_path()
    assert urls == [inc._torch_fidelity_inception().URL_INCEPTION_V3] * 2


def test_pickle_payload_refused(monkeypatch, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"w": Payload()}, path)
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(path))
    monkeypatch.setenv(inc.ENV_WEIGHTS_SHA256, _sha256(path))
    with pytest.raises(inc.FidWeightsError, match="not a weights-only state dict") as info:
        inc.load_extractor()
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_state_dict_of_another_network_refused(monkeypatch, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(path))
    monkeypatch.setenv(inc.ENV_WEIGHTS_SHA256, _sha256(path))
    with pytest.raises(inc.FidWeightsError, match="does not fit torch-fidelity's Inception"):
        inc.load_extractor()


def test_pinned_hash_matches_torch_fidelity_file_name():
    url = inc._torch_fidelity_inception().URL_INCEPTION_V3
    assert url.endswith("/" + inc.FID_WEIGHTS_FILE)
    # torch.hub convention: the suffix of the file name is the sha256's prefix.
    assert (
        inc.FID_WEIGHTS_FILE.removesuffix(".pth").rsplit("-", 1)[1] == (inc.FID_WEIGHTS_SHA256[:8])
    )


@pytest.mark.slow
def test_evaluation_uses_fid_as_the_primary_metric_when_asked(fid_env, extractor):
    """eval.inception wires FID/KID into every family's evaluation, the GAN's and CycleGAN's
    primary metric follows, and the preflight passes with the configured file."""
    from flows.train.data_config import check_inception, load_inception
    from gan_core.data import load_builtin
    from gan_core.evaluate import evaluate, primary_metric
    from gan_core.judge import train_judge
    from gan_core.models import build_models
    from gan_core.overrides import apply_overrides
    from gan_core.presets import preset

    for family in ("gan", "cyclegan"):
        cfg = apply_overrides(preset(family, "tiny"), {"eval.inception": True, "eval.samples": 16})
        check_inception(cfg)
        assert load_inception(cfg) is not None
        test = load_builtin(cfg.data.dataset, 16, "test")
        few = (
            type(test)(type(test.x)(test.x.images[:16]), type(test.y)(test.y.images[:16]))
            if family == "cyclegan"
            else type(test)(test.images[:16], test.labels[:16])
        )
        judge = train_judge(few)
        out = evaluate(cfg, build_models(cfg), few, judge, inception=extractor)
        name, mode = primary_metric(cfg, has_truth=False)
        assert (name, mode) == (("fid", "min") if family == "gan" else ("fid_translation", "min"))
        assert name in out and out[name] > 0
        assert ("kid" in out) if family == "gan" else ("kid_g" in out and "kid_f" in out)

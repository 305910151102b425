"""FID as NVlabs EDM computes it: preprocessing, detector, Fréchet distance, KID.

Cached features and the reference statistics: tests/test_feature_cache.py."""

import importlib.util
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines.data.synthetic_echonet import synthetic_frames
from pipelines.evaluation import fid as fidlib
from pipelines.evaluation.fid import (
    InceptionDetector,
    compute_features,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    preprocess_images,
)


@pytest.fixture(scope="module")
def detector():
    return InceptionDetector()


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames(16, seed=0, resolution=64)


# ---------------------------------------------------------------- preprocessing
def _explicit_nv_resample(image: np.ndarray, size: int = 299) -> np.ndarray:
    """Independent float64 bilinear resampling of one (H, W) image, NVlabs' grid written out.

    NVlabs shifts the align_corners=False grid by (1/W - 1/size): output pixel j then samples the
    input at ((2j+1)/size - 1 + 1/W - 1/size + 1) * W/2 - 1/2 = j * W / size; borders clamp.
    """
    height, width = image.shape

    def taps(n_in):
        pos = np.arange(size) * n_in / size
        lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
        hi = np.clip(lo + 1, 0, n_in - 1)
        return lo, hi, pos - np.floor(pos)

    y0, y1, wy = taps(height)
    x0, x1, wx = taps(width)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (1, 3, 112, 112), (1, 1, 40, 72)])
def test_preprocessing_matches_explicit_bilinear(shape):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = preprocess_images(images)
    assert out.shape == (shape[0], 3, 299, 299) and out.dtype == torch.float32
    for n in range(shape[0]):
        for c in range(3):
            source = images[n, c if shape[1] == 3 else 0].numpy()
            expected = (_explicit_nv_resample(source) - 128) / 128
            np.testing.assert_allclose(out[n, c].numpy(), expected, atol=2e-4, rtol=0)


def test_preprocessing_scaling_and_gray_repeat():
    black_white = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 8, 8).contiguous()
    out = preprocess_images(black_white)
    # (x - 128) / 128: 0 -> -1, 255 -> 127/128 (bilinear weights on a flat image leave float32 rounding)
    torch.testing.assert_close(out[0], torch.full_like(out[0], -1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.full_like(out[1], 127 / 128), atol=1e-5, rtol=0)
    gray = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8)
    out = preprocess_images(gray)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert torch.equal(out, preprocess_images(gray.repeat(1, 3, 1, 1)))


def test_preprocessing_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"C in \(1, 3\)"):
        preprocess_images(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images is empty"):
        compute_features(np.zeros((0, 1, 8, 8), np.uint8), detector=FailingDetector())


def test_missing_wheel_gives_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="bash install.sh"):
        fidlib.find_inception_weights()


# ---------------------------------------------------------------- detector
def test_detector_matches_shipped_torchscript(detector, frames):
    """Our folded, channels-last network == the shipped TorchScript file fed NVlabs' preprocessing."""
    plain = torch.jit.load(str(fidlib.find_inception_weights()), map_location="cpu").eval()
    images = torch.from_numpy(frames[:3])
    with torch.inference_mode():
        expected = plain(preprocess_images(images))
    ours = detector(images)
    assert ours.shape == (3, 2048)
    rel = (ours - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4
    assert torch.all(ours >= 0)  # pool features follow a ReLU


# ---------------------------------------------------------------- Fréchet distance
def _scipy_fd(mu1, s1, mu2, s2):
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.real(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)))


def test_frechet_distance_against_scipy_and_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 48)) @ rng.normal(size=(48, 48))
    b = rng.normal(size=(500, 48)) * 1.3 + 0.2
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-6)
    tm = _compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))).item()
    assert ours == pytest.approx(tm, rel=1e-6)


def test_frechet_distance_rank_deficient_against_torchmetrics():
    """Fewer samples than dimensions (as in small-sample FID): singular covariances."""
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(1)
    (mu1, s1), (mu2, s2) = feature_statistics(rng.normal(size=(40, 96))), feature_statistics(rng.gamma(2, size=(30, 96)))
    tm = _compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))).item()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(tm, rel=1e-6)


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(2)
    va, vb = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    ma, mb = rng.normal(size=20), rng.normal(size=20)
    expected = ((ma - mb) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert frechet_distance(ma, np.diag(va), mb, np.diag(vb)) == pytest.approx(expected, rel=1e-10)


def test_torchmetrics_fid_with_feature_hook_agrees(detector, frames):
    """torchmetrics' FID using this detector through its ``feature=`` hook gives our number."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(3)
    noisy = np.clip(frames[:6].astype(np.int16) + rng.integers(-40, 41, frames[:6].shape), 0, 255).astype(np.uint8)
    metric = FrechetInceptionDistance(feature=detector)
    metric.update(torch.from_numpy(frames[6:12]), real=True)
    metric.update(torch.from_numpy(noisy), real=False)
    (mu_r, s_r), (mu_g, s_g) = (feature_statistics(compute_features(x, detector)) for x in (frames[6:12], noisy))
    assert metric.compute().item() == pytest.approx(frechet_distance(mu_g, s_g, mu_r, s_r), rel=1e-4)


def test_fid_zero_for_same_set_and_grows_with_noise(detector, frames):
    rng = np.random.default_rng(4)
    real = compute_features(frames, detector)
    mu, sigma = feature_statistics(real)
    # 16 samples in 2048-d: the covariance is singular and eigen-solver noise in its null space
    # leaves ~1e-6 of the trace.
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)
    fids = []
    for level in (10, 60):
        noisy = np.clip(frames.astype(np.int16) + rng.normal(0, level, frames.shape).round(), 0, 255).astype(np.uint8)
        fids.append(frechet_distance(*feature_statistics(compute_features(noisy, detector)), mu, sigma))
    assert 0 < fids[0] < fids[1]


# ---------------------------------------------------------------- KID
def _unbiased_poly_mmd(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_against_explicit_unbiased_mmd():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 16)), rng.normal(0.3, 1.2, size=(30, 16))
    # subset_size is capped at 30 = all samples, so every subset is the full sets.
    out = kernel_inception_distance(x, y, subset_size=1000, subsets=3, seed=0)
    assert out["kid_subset_size"] == 30
    assert out["kid"] == pytest.approx(_unbiased_poly_mmd(x, y), rel=1e-9)
    assert out["kid_std"] == pytest.approx(0, abs=1e-12)


def test_kid_is_seeded():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(60, 8))
    first = kernel_inception_distance(x, y, subset_size=20, subsets=5, seed=1)
    assert first == kernel_inception_distance(x, y, subset_size=20, subsets=5, seed=1)
    assert first["kid"] != kernel_inception_distance(x, y, subset_size=20, subsets=5, seed=2)["kid"]


class FailingDetector(torch.nn.Module):
    num_features = 2048

    def forward(self, images):
        raise AssertionError("no features should be computed")


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    assert math.isclose(frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)), 2.0)

"""The one Inception feature cache (real frames and generated shards) and the cached reference statistics."""

import json

import numpy as np
import pytest
import torch

from pipelines.data.synthetic_echonet import synthetic_frames
from pipelines.evaluation.feature_cache import (
    ArrayFrames,
    FeatureCache,
    FingerprintMismatchError,
    dataset_features,
    shard_features,
)
from pipelines.evaluation.fid import InceptionDetector, compute_features, feature_statistics
from pipelines.evaluation.generation import generate_images
from pipelines.evaluation.reference import FeatureStatistics, real_subsample_indices, reference_statistics


class FailingDetector(torch.nn.Module):
    num_features = 2048

    def forward(self, images):
        raise AssertionError("features should have come from the cache")


@pytest.fixture(scope="module")
def detector():
    return InceptionDetector()


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames(10, seed=0, resolution=64)


def test_real_subsample_is_seeded_and_capped():
    a = real_subsample_indices(1000, 100, seed=0)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, real_subsample_indices(1000, 100, seed=0))
    assert not np.array_equal(a, real_subsample_indices(1000, 100, seed=1))
    with pytest.warns(UserWarning, match="exceeds the dataset"):
        assert np.array_equal(real_subsample_indices(50, 100, seed=0), np.arange(50))


def test_reference_statistics_cached_and_fingerprint_refused(tmp_path, detector, frames):
    ds = ArrayFrames(frames[:10], "frames-under-test", split="train")
    path = tmp_path / "ref.npz"
    stats = reference_statistics(ds, stats_path=path, num_real=8, seed=0, detector=detector, cache_dir=tmp_path)
    idx = real_subsample_indices(10, 8, 0)
    mu, sigma = feature_statistics(compute_features(frames[:10][idx], detector))
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-5, atol=1e-7)
    assert stats.n == 8 and path.exists()

    again = reference_statistics(ds, stats_path=path, num_real=8, seed=0, detector=FailingDetector())
    assert np.array_equal(again.mu, stats.mu) and again.fingerprint == stats.fingerprint
    for change, kwargs in [("subsample_seed", dict(num_real=8, seed=1)), ("subsample_size", dict(num_real=9, seed=0))]:
        with pytest.raises(FingerprintMismatchError, match=change):
            reference_statistics(ds, stats_path=path, detector=FailingDetector(), **kwargs)
    with pytest.raises(FingerprintMismatchError, match="split"):
        reference_statistics(ArrayFrames(frames[:10], "frames-under-test", split="test"), stats_path=path, num_real=8, seed=0,
                             detector=FailingDetector())
    changed = frames[:10].copy()
    changed[0, 0, 0, 0] ^= 1  # one pixel differs: the content hash probes frame 0
    with pytest.raises(FingerprintMismatchError, match="content_sha1"):
        reference_statistics(ArrayFrames(changed, "frames-under-test", split="train"), stats_path=path, num_real=8, seed=0, detector=FailingDetector())
    with pytest.raises(FingerprintMismatchError):
        FeatureStatistics.load(path, expected_fingerprint={**stats.fingerprint, "resolution": 112})


def test_feature_cache_resumes_and_computes_only_missing(tmp_path):
    calls = []

    def compute(indices):
        calls.append(np.asarray(indices).tolist())
        return np.stack([np.full(2048, float(i)) for i in indices])

    identity = {"dataset": "x", "split": "train", "num_frames": 20, "content_sha1": "abc"}
    cache = FeatureCache(tmp_path, identity)
    out = cache.features([3, 1, 5], compute, chunk_size=2)
    assert out[:, 0].tolist() == [3, 1, 5] and calls == [[1, 3], [5]]

    def interrupted(indices):
        if 9 in indices:
            raise KeyboardInterrupt
        return compute(indices)

    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path, identity).features([7, 8, 9, 10], interrupted, chunk_size=2)
    calls.clear()
    out = FeatureCache(tmp_path, identity).features([1, 7, 8, 9, 10], compute, chunk_size=2)
    assert out[:, 0].tolist() == [1, 7, 8, 9, 10] and calls == [[9, 10]]  # 7, 8 survived the interruption


def test_statistics_file_roundtrip_and_bad_path(tmp_path):
    rng = np.random.default_rng(7)
    stats = FeatureStatistics.from_features(rng.normal(size=(10, 4)), {"split": "train"})
    loaded = FeatureStatistics.load(stats.save(tmp_path / "s.npz"), expected_fingerprint={"split": "train"})
    assert np.array_equal(loaded.sigma, stats.sigma) and loaded.n == 10
    with pytest.raises(ValueError, match=".npz"):
        stats.save(tmp_path / "s.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureStatistics.load(tmp_path / "missing.npz")


def test_feature_cache_refuses_a_folder_of_other_data(tmp_path):
    identity = {"dataset": "x", "split": "train", "num_frames": 4, "content_sha1": "abc"}
    cache = FeatureCache(tmp_path, identity)
    recorded = json.loads((cache.dir / "identity.json").read_text())
    (cache.dir / "identity.json").write_text(json.dumps({**recorded, "content_sha1": "other"}))
    with pytest.raises(FingerprintMismatchError, match="content_sha1"):
        FeatureCache(tmp_path, identity)


def test_dataset_features_cached_equal_uncached(tmp_path, detector, frames):
    ds = ArrayFrames(frames[:6], "six-frames", split="train")
    direct = dataset_features(ds, [4, 0, 2], detector)
    np.testing.assert_array_equal(direct, compute_features(frames[[4, 0, 2]], detector))
    cached = dataset_features(ds, [4, 0, 2], detector, cache_dir=tmp_path)  # computed as one batch [0, 2, 4]
    np.testing.assert_allclose(cached, direct, rtol=1e-5, atol=1e-6)
    again = dataset_features(ds, [2, 4], FailingDetector(), cache_dir=tmp_path)
    np.testing.assert_array_equal(again, cached[[2, 0]])


class ShardStandIn:
    """Input stand-in with the pipeline's call signature: image = f(seed) only."""

    def __call__(self, seeds, num_inference_steps, output_type, **kwargs):
        images = [torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds]
        return type("Out", (), {"images": torch.stack(images)})()


def test_shard_features_cached_per_shard_and_refreshed_when_a_shard_changes(tmp_path, detector):
    samples = tmp_path / "samples"
    generate_images(ShardStandIn(), samples, "0-5", batch_size=3, shard_size=3, progress=False)
    shards = sorted(samples.glob("shard-*.npz"))
    images = np.concatenate([np.load(p)["images"] for p in shards])
    features = shard_features(samples, [4, 1, 5], detector, progress=False)
    np.testing.assert_allclose(features, compute_features(images[[4, 1, 5]], detector), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(shard_features(samples, [4, 1, 5], FailingDetector(), progress=False), features)
    assert len(list((samples / "features").glob("features-*"))) == 2  # one cache per shard

    # A regenerated shard with other pixels (same name, same seeds) is not served stale features.
    with np.load(shards[1]) as data:
        changed, seeds = 255 - data["images"], data["seeds"]
    np.savez(shards[1], images=changed, seeds=seeds)
    refreshed = shard_features(samples, [4], detector, progress=False)
    np.testing.assert_allclose(refreshed, compute_features(changed[[1]], detector), rtol=1e-5, atol=1e-6)
    assert not np.allclose(refreshed, features[:1])
    with pytest.raises(ValueError, match="lacks 1 of the requested seeds"):
        shard_features(samples, [6], FailingDetector(), progress=False)


class ProjectionDetector(torch.nn.Module):
    """A cheap stand-in for Inception (a fixed random projection and ReLU to 2048 features, positive like
    Inception's pool features): the statistics code is what is under test, not the network."""

    num_features = 2048

    def __init__(self, pixels):
        super().__init__()
        self.weight = torch.randn(pixels, 2048, generator=torch.Generator().manual_seed(0)) / pixels**0.5

    def forward(self, images):
        return torch.relu(images.flatten(1).float() / 64 @ self.weight) + 3.0


def test_streamed_statistics_equal_the_all_in_memory_ones(tmp_path):
    from pipelines.evaluation.feature_cache import CHUNK_SIZE, dataset_statistics, shard_statistics
    from pipelines.evaluation.fid import StreamingStatistics

    rng = np.random.default_rng(0)
    features = rng.gamma(0.7, 1.0, size=(700, 2048)) + 10.0  # offset: a naive E[xx^T] - mu mu^T would lose digits
    stream = StreamingStatistics()
    for start, stop in ((0, 1), (1, 300), (300, 301), (301, 700)):
        stream.update(features[start:stop])
    mu, sigma = feature_statistics(features)
    streamed_mu, streamed_sigma = stream.statistics()
    assert np.abs(streamed_mu - mu).max() < 1e-10 and np.abs(streamed_sigma - sigma).max() < 1e-10

    images = rng.integers(0, 256, size=(2 * CHUNK_SIZE + 77, 1, 8, 8), dtype=np.uint8)  # 3 chunks, the last short
    frames, detector = ArrayFrames(images, "streamed", split="train"), ProjectionDetector(64)
    indices = rng.permutation(len(images))[:2 * CHUNK_SIZE + 50]
    mu, sigma = feature_statistics(dataset_features(frames, indices, detector))
    for cache_dir in (None, tmp_path / "cache"):
        s_mu, s_sigma, n = dataset_statistics(frames, indices, detector, cache_dir=cache_dir)
        assert n == len(indices) and np.abs(s_mu - mu).max() < 1e-10 and np.abs(s_sigma - sigma).max() < 1e-10

    samples = tmp_path / "samples"
    generate_images(ShardStandIn(), samples, "0-8", batch_size=3, shard_size=3, progress=False)
    shard_detector = ProjectionDetector(32 * 32)
    mu, sigma = feature_statistics(shard_features(samples, [7, 0, 3, 4, 8], shard_detector, progress=False))
    s_mu, s_sigma, n = shard_statistics(samples, [7, 0, 3, 4, 8], shard_detector, progress=False)
    assert n == 5 and np.abs(s_mu - mu).max() < 1e-10 and np.abs(s_sigma - sigma).max() < 1e-10
    with pytest.raises(ValueError, match="lacks 1 of the requested seeds"):
        shard_statistics(samples, [0, 9], shard_detector, progress=False)


def test_kid_draws_from_a_bounded_seeded_pool(tmp_path, monkeypatch):
    """KID's features are the only ones held: at most KID_MAX_FEATURES per side, a seeded subset; FID still
    uses every image."""
    from pipelines.evaluation import protocol
    from pipelines.evaluation.fid import frechet_distance, kernel_inception_distance
    from pipelines.utils import seeded_subset

    monkeypatch.setattr(protocol, "KID_MAX_FEATURES", 6)
    rng = np.random.default_rng(1)
    real = ArrayFrames(rng.integers(0, 256, size=(20, 1, 8, 8), dtype=np.uint8), "real", split="train")
    generated = rng.integers(0, 200, size=(15, 1, 8, 8), dtype=np.uint8)
    detector = ProjectionDetector(64)
    with pytest.warns(UserWarning, match="exceeds the dataset"):
        result = protocol.fid_of_images(generated, real, num_real=25, cache_dir=tmp_path, detector=detector,
                                        progress=False)
    real_feats, gen_feats = compute_features(real.images, detector), compute_features(generated, detector)
    assert (result["kid_pool_real"], result["kid_pool_generated"], result["num_generated"]) == (6, 6, 15)
    expected = kernel_inception_distance(real_feats[seeded_subset(20, 6, 0)], gen_feats[seeded_subset(15, 6, 0)])
    assert result["kid"] == pytest.approx(expected["kid"], rel=1e-9, abs=1e-12)
    fid = frechet_distance(*feature_statistics(gen_feats), *feature_statistics(real_feats))
    assert result["fid"] == pytest.approx(fid, rel=1e-6)

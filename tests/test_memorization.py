"""Tests for the memorization / privacy audit."""

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.data.synthetic_echonet import synthetic_frames
from pipelines.evaluation.memorization import (
    SpaceAudit,
    audit_memorization,
    combine_spaces,
    nearest_neighbours,
    normalize_rows,
    pixel_features,
    render_audit_section,
    run_memorization_audit,
)

FRAMES_PER_VIDEO = 8


@pytest.fixture(scope="module")
def frames():
    """Training frames, and two held-out sets from other (unseen) synthetic videos."""
    train = synthetic_frames(400, seed=0, resolution=32, frames_per_video=FRAMES_PER_VIDEO)
    calibration = synthetic_frames(300, seed=1, resolution=32, frames_per_video=FRAMES_PER_VIDEO)
    unseen = synthetic_frames(300, seed=2, resolution=32, frames_per_video=FRAMES_PER_VIDEO)
    return train, calibration, unseen


def _noised(images, sigma, seed):
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def test_pixel_similarity_is_pearson_correlation_and_search_is_exact():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 256, (23, 1, 6, 6), dtype=np.uint8)
    references = rng.integers(0, 256, (31, 1, 6, 6), dtype=np.uint8)
    references[17] = queries[4]  # an exact copy must be found with correlation 1
    correlation = np.corrcoef(queries.reshape(23, -1), references.reshape(31, -1))[:23, 23:]
    similarity, index = nearest_neighbours(queries, references, pixel_features, query_chunk=7, reference_chunk=5)
    np.testing.assert_allclose(similarity, correlation.max(axis=1), atol=1e-5)
    np.testing.assert_array_equal(index, correlation.argmax(axis=1))
    assert index[4] == 17 and similarity[4] == pytest.approx(1.0, abs=1e-6)
    # Precomputed features take the same path without featurize.
    features_q, features_r = rng.normal(size=(9, 5)), rng.normal(size=(4, 5))
    cosine = normalize_rows(features_q) @ normalize_rows(features_r).T
    similarity, index = nearest_neighbours(normalize_rows(features_q), normalize_rows(features_r), reference_chunk=3)
    np.testing.assert_allclose(similarity, cosine.max(axis=1), atol=1e-6)
    np.testing.assert_array_equal(index, cosine.argmax(axis=1))


def test_audit_flags_copies_but_not_unseen_real_frames(frames):
    train, calibration, unseen = frames
    sources = np.random.default_rng(0).choice(len(train), 20, replace=False)
    copies = train[sources]
    generated = np.concatenate([copies, _noised(copies, 8.0, seed=1), unseen])
    audit = audit_memorization(train, calibration, generated, log=lambda _: None)
    pixel = audit.spaces["pixel"]
    assert pixel.flagged[:40].all(), "exact and noised training copies must be flagged"
    np.testing.assert_array_equal(pixel.generated_neighbour[:20], sources)
    np.testing.assert_array_equal(audit.neighbour[20:40], sources)
    # Unseen real frames (other videos): about 5% above a 95th-percentile threshold; 300 frames -> +-1.3%.
    assert audit.flagged[40:].mean() <= 0.10
    assert audit.heldout_flag_rate["pixel"] <= 0.10
    assert audit.memorization_rate == pytest.approx(audit.flagged.mean())
    assert 0.0 < audit.score[:20].min() and audit.score[:20] == pytest.approx(1.0, abs=1e-4)


def test_report_filter_top_videos_and_model_card_section(frames, tmp_path):
    train, calibration, unseen = frames
    video_ids = [f"video{i // FRAMES_PER_VIDEO:03d}" for i in range(len(train))]
    # Most copies come from video 5 (frames 40..47), one from video 20.
    sources = np.array([40, 41, 42, 43, 44, 160])
    generated = np.concatenate([unseen[:60], train[sources]])
    summary = run_memorization_audit(train, calibration, generated, tmp_path, train_video_ids=video_ids,
                                     filter_output=True, num_pairs=8, log=lambda _: None)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["memorization_rate"] == summary["memorization_rate"]
    assert summary["num_generated"] == 66 and summary["num_train"] == 400 and summary["num_heldout"] == 300
    assert summary["top_training_videos"][0] == {"video": "video005", "flagged_matches": 5,
                                                 "matches": summary["top_training_videos"][0]["matches"]}
    top_pairs = summary["closest_pairs"][:6]
    assert sorted(p["generated_index"] for p in top_pairs) == list(range(60, 66))
    assert all(p["flagged"] and p["similarity"]["pixel"] > 0.9999 for p in top_pairs)

    filtered = np.load(tmp_path / "filtered.npz")
    flagged = np.load(tmp_path / "neighbours.npz")["flagged"]
    assert flagged[60:].all()
    np.testing.assert_array_equal(filtered["indices"], np.flatnonzero(~flagged))
    np.testing.assert_array_equal(filtered["images"], generated[~flagged])
    assert summary["num_kept"] == len(filtered["indices"]) == 66 - summary["num_flagged"]

    grid = Image.open(tmp_path / "closest_pairs.png")
    assert grid.size[0] > 400 and grid.size[1] > 200
    section = (tmp_path / "audit_section.md").read_text()
    assert section == render_audit_section(summary)
    assert f"{100 * summary['memorization_rate']:.2f}%" in section and "video005 (5)" in section


def test_inception_and_pixel_spaces_on_a_few_frames(frames):
    train, calibration, unseen = frames
    generated = np.concatenate([train[[3]], unseen[:2]])
    audit = audit_memorization(train[:6], calibration[:4], generated, feature_spaces=("pixel", "inception"),
                               log=lambda _: None)
    assert set(audit.spaces) == {"pixel", "inception"}
    inception = audit.spaces["inception"]
    assert inception.generated_similarity[0] == pytest.approx(1.0, abs=1e-4)
    assert inception.generated_neighbour[0] == 3 and audit.flagged[0]
    assert 0.0 < inception.threshold < 1.0


def test_combination_rules_and_deciding_neighbour():
    heldout = np.linspace(0.0, 0.99, 100)
    # 95th percentile of heldout = 0.9405 in both spaces.
    pixel = SpaceAudit("pixel", float(np.percentile(heldout, 95)), heldout,
                       np.array([1.0, 0.95, 0.5, 0.5]), np.array([10, 11, 12, 13]))
    inception = SpaceAudit("inception", float(np.percentile(heldout, 95)), heldout,
                           np.array([0.96, 0.2, 0.99, 0.3]), np.array([20, 21, 22, 23]))
    spaces = {"pixel": pixel, "inception": inception}
    any_rule = combine_spaces(spaces, 95.0, "any")
    all_rule = combine_spaces(spaces, 95.0, "all")
    np.testing.assert_array_equal(any_rule.flagged, [True, True, True, False])
    np.testing.assert_array_equal(all_rule.flagged, [True, False, False, False])
    np.testing.assert_array_equal(any_rule.neighbour, [10, 11, 22, 13])  # the space with the higher score
    assert any_rule.score[0] == pytest.approx(1.0) and all_rule.score[0] == pytest.approx((0.96 - 0.9405) / 0.0595)
    assert any_rule.memorization_rate == 0.75 and all_rule.memorization_rate == 0.25
    # heldout_flag_rate is out of sample: calibrate on one half, count on the other (evenly spread values).
    assert any_rule.heldout_flag_rate["pixel"] == pytest.approx(0.05, abs=0.021)


def test_bad_input_is_named(frames):
    train, calibration, _ = frames
    with pytest.raises(ValueError, match="feature_spaces"):
        audit_memorization(train, calibration, train[:2], feature_spaces=("clip",))
    with pytest.raises(ValueError, match="combine"):
        audit_memorization(train, calibration, train[:2], combine="xor")
    with pytest.raises(ValueError, match="percentile"):
        audit_memorization(train, calibration, train[:2], percentile=100)
    with pytest.raises(ValueError, match="generated images"):
        audit_memorization(train, calibration, train[:2].astype(np.float32))
    with pytest.raises(ValueError, match="share"):
        audit_memorization(train, calibration, np.zeros((2, 1, 16, 16), np.uint8))


def test_cli_flags_copies_filters_and_keeps_seeds(tmp_path):
    import audit_memorization
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.frame_reader import FrameDataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet

    echonet = write_synthetic_echonet(tmp_path / "echonet", num_videos=16, seed=3, num_workers=0, num_frames=(30, 40))
    build_frame_dataset(echonet, tmp_path / "frames", resolution=32, num_workers=0, progress=False, verbose=False)
    train_ds = FrameDataset(str(tmp_path / "frames"), "train")
    test_ds = FrameDataset(str(tmp_path / "frames"), "test")
    copies = train_ds.images_uint8([0, 5, 9])
    generated = np.concatenate([test_ds.images_uint8(), copies])  # unseen real frames stand in for novel samples
    seeds = np.arange(1000, 1000 + len(generated))
    np.savez(tmp_path / "generated.npz", images=generated, seeds=seeds)
    audit_memorization.main([
        "--dataset", str(tmp_path / "frames"), "--heldout_splits", "validation",
        "--generated", str(tmp_path / "generated.npz"), "--output_dir", str(tmp_path / "audit"), "--filter",
        "--num_pairs", "4"])
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["num_train"] == len(train_ds) and summary["num_generated"] == len(generated)
    assert summary["metadata"]["heldout_splits"] == ["validation"]
    train_video_ids = train_ds.column("video_id")
    assert {p["video"] for p in summary["closest_pairs"][:3]} == {str(train_video_ids[i]) for i in (0, 5, 9)}
    filtered = np.load(tmp_path / "audit" / "filtered.npz")
    assert not set(filtered["seeds"].tolist()) & set(seeds[-3:].tolist())  # the copies are gone
    np.testing.assert_array_equal(filtered["seeds"], seeds[filtered["indices"]])
    assert (tmp_path / "audit" / "closest_pairs.png").stat().st_size > 1000

"""Tests for the distribution-shift classifiers (paper Table 2)."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.errors import UserInputError
from pipelines.evaluation.distribution_shift import (
    AugmentConfig,
    ClassifierConfig,
    augment_batch,
    build_classifier,
    run_distribution_shift,
    split_real_generated,
    train_classifier,
)


def echo_like_frames(count: int, resolution: int, seed: int) -> np.ndarray:
    """Independent random frames: black background, a speckled sector, a dark chamber at a random place."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution
    sector = (yy > 0.05) & (np.abs(xx - 0.5) < 0.6 * yy)
    frames = np.zeros((count, 1, resolution, resolution), dtype=np.uint8)
    for i in range(count):
        speckle = rng.gamma(2.0, 45.0, size=(resolution, resolution))
        cy, cx, r = rng.uniform(0.4, 0.7), rng.uniform(0.35, 0.65), rng.uniform(0.08, 0.18)
        chamber = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image = np.where(sector & ~chamber, speckle, rng.uniform(0, 12, size=(resolution, resolution)))
        frames[i, 0] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def test_linear_separates_inverted_and_not_two_halves_of_real(tmp_path):
    real = echo_like_frames(3000, 32, seed=0)
    other_half = echo_like_frames(1500, 32, seed=1)
    generated = {"Inverted": 255 - real[1500:], "SameDistribution": other_half}
    config = ClassifierConfig(epochs=3, batch_size=64, seed=0)
    results = run_distribution_shift(real[:1500], generated, tmp_path, classifiers=["linear"], config=config,
                                     num_per_class=1500, val_fraction=0.3, log=lambda _: None)
    by_set = {r["generated_set"]: r for r in results}
    assert by_set["Inverted"]["best_val_accuracy"] >= 0.99
    assert by_set["Inverted"]["last_val_accuracy"] >= 0.99
    # 900 validation frames: chance level 0.5 has a standard error of ~0.017.
    assert abs(by_set["SameDistribution"]["last_val_accuracy"] - 0.5) < 0.07
    assert by_set["SameDistribution"]["n_val"] == 900 and by_set["SameDistribution"]["n_train"] == 2100

    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert [(r["generated_set"], r["classifier"]) for r in rows] == [
        ("Inverted", "linear"), ("SameDistribution", "linear")]
    table = (tmp_path / "table.md").read_text()
    assert "50% means" in table and "| Inverted |" in table and "| Classifier | Linear |" in table
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["history"][0]["epoch"] == 1
    assert list((tmp_path / "tensorboard" / "Inverted" / "linear").glob("events.out.tfevents.*"))


def test_split_is_stratified_disjoint_and_seeded():
    real = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(2, 2).repeat(2, 3)
    generated = (100 + np.arange(20, dtype=np.uint8)).reshape(20, 1, 1, 1).repeat(2, 2).repeat(2, 3)
    data = split_real_generated(real, generated, val_fraction=0.25, seed=3)
    assert (data.val_labels == 1).sum() == 10 and (data.val_labels == 0).sum() == 5
    assert (data.train_labels == 1).sum() == 30 and (data.train_labels == 0).sum() == 15
    train_ids = set(data.train_images[:, 0, 0, 0].tolist())
    val_ids = set(data.val_images[:, 0, 0, 0].tolist())
    assert not train_ids & val_ids and len(train_ids | val_ids) == 60
    # Labels follow the source of each image (real values < 100).
    assert np.array_equal(data.val_labels == 1, data.val_images[:, 0, 0, 0] < 100)
    again = split_real_generated(real, generated, val_fraction=0.25, seed=3)
    other = split_real_generated(real, generated, val_fraction=0.25, seed=4)
    assert np.array_equal(again.val_images, data.val_images)
    assert not np.array_equal(other.val_images, data.val_images)


def test_bad_inputs_name_the_problem():
    real = np.zeros((4, 1, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="generated images"):
        split_real_generated(real, np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="same"):
        split_real_generated(real, np.zeros((4, 1, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="classifiers"):
        run_distribution_shift(real, {"a": real}, "/tmp/unused", classifiers=["vgg"])
    with pytest.raises(ValueError, match="classifier must be"):
        build_classifier("mlp", 1, 8)


def test_resnet18_matches_reference_size_and_grayscale_input():
    model = build_classifier("resnet18", channels=1, resolution=64)
    assert sum(p.numel() for p in model.parameters()) == 11_170_753  # transformers ResNet-18, 1 channel
    assert model.resnet.resnet.embedder.embedder.convolution.in_channels == 1
    assert model(torch.zeros(3, 1, 64, 64)).shape == (3,)
    linear = build_classifier("linear", channels=3, resolution=8)
    assert sum(p.numel() for p in linear.parameters()) == 3 * 8 * 8 + 1


def test_augmentation_identity_flip_and_black_fill():
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    identity = augment_batch(images, AugmentConfig(max_zoom=1.0, flip_p=0.0, max_rotation_deg=0.0), generator)
    torch.testing.assert_close(identity, images, atol=1e-5, rtol=0)
    flipped = augment_batch(images, AugmentConfig(max_zoom=1.0, flip_p=1.0, max_rotation_deg=0.0), generator)
    torch.testing.assert_close(flipped, torch.flip(images, dims=[3]), atol=1e-5, rtol=0)
    # A rotated white frame gets black (-1) corners from outside the frame, and stays white at the centre.
    white = torch.ones(64, 1, 16, 16)
    rotated = augment_batch(white, AugmentConfig(max_zoom=1.0, flip_p=0.0, max_rotation_deg=45.0), generator)
    assert rotated[:, :, 0, 0].min() < -0.5
    torch.testing.assert_close(rotated[:, :, 7:9, 7:9], torch.ones(64, 1, 2, 2))
    zoomed = augment_batch(white, AugmentConfig(max_zoom=1.3, flip_p=0.0, max_rotation_deg=0.0), generator)
    torch.testing.assert_close(zoomed, white)  # zoom + crop stays inside the frame


def _tiny_data(count=12, resolution=32):
    real = echo_like_frames(count, resolution, seed=5)
    return split_real_generated(real, 255 - real, val_fraction=0.25, seed=0)


@pytest.mark.parametrize("name", ["resnet18", "aug_resnet18"])
def test_resnet_runs_and_resumes_exactly_after_interruption(tmp_path, name):
    data = _tiny_data()
    config = ClassifierConfig(epochs=2, batch_size=6, seed=1)
    reference = train_classifier(name, data, tmp_path / "full", config, tensorboard_dir=tmp_path / "tb",
                                 log=lambda _: None)
    assert reference["epochs"] == 2 and 0.0 <= reference["last_val_accuracy"] <= 1.0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    def interrupt(message):
        if "epoch 1/" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(name, data, tmp_path / "resumed", config, log=interrupt)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "epoch-001" / "state.json").read_text())
    assert len(state["history"]) == 1
    messages = []
    resumed = train_classifier(name, data, tmp_path / "resumed", config, log=messages.append)
    assert any("resuming after epoch 1" in m for m in messages)
    for file in ("model.safetensors", "optimizer.safetensors"):  # weights and Adam state, bitwise
        full = load_file(tmp_path / "full" / "checkpoints" / "epoch-002" / file)
        again = load_file(tmp_path / "resumed" / "checkpoints" / "epoch-002" / file)
        assert full.keys() == again.keys() and full
        for key in full:
            torch.testing.assert_close(again[key], full[key], rtol=0, atol=0, msg=key)
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in reference["history"]]
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["epoch-002"]  # newest only


def test_finished_run_is_skipped_and_other_settings_are_refused(tmp_path):
    data = _tiny_data(count=16, resolution=8)
    config = ClassifierConfig(epochs=2, batch_size=8)
    first = train_classifier("linear", data, tmp_path, config, log=lambda _: None)
    checkpoint = tmp_path / "checkpoints" / "epoch-002" / "model.safetensors"
    modified = checkpoint.stat().st_mtime_ns
    messages = []
    second = train_classifier("linear", data, tmp_path, config, log=messages.append)
    assert any("skipping" in m for m in messages)
    assert checkpoint.stat().st_mtime_ns == modified
    assert second["history"] == first["history"]
    with pytest.raises(ValueError, match="other settings"):
        train_classifier("linear", data, tmp_path, ClassifierConfig(epochs=2, batch_size=8, learning_rate=1e-3))
    # More epochs continue the finished run instead of starting over.
    longer = train_classifier("linear", data, tmp_path, ClassifierConfig(epochs=3, batch_size=8),
                              log=lambda _: None)
    assert [h["epoch"] for h in longer["history"]] == [1, 2, 3]
    assert longer["history"][:2] == first["history"]


def test_bf16_autocast_trains(tmp_path):
    data = _tiny_data(count=64, resolution=16)
    result = train_classifier("linear", data, tmp_path, ClassifierConfig(epochs=2, batch_size=16, bf16=True, learning_rate=1e-2),
                              log=lambda _: None)
    assert result["last_val_accuracy"] == 1.0  # real vs inverted is trivially separable


def test_resnets_learn_real_vs_inverted(tmp_path):
    real = echo_like_frames(240, 32, seed=7)
    # Small batches: BatchNorm's running statistics (used at validation) need ~20 steps to settle.
    config = ClassifierConfig(epochs=2, batch_size=12, seed=0)
    results = run_distribution_shift(real[:120], {"Inverted": 255 - real[120:]}, tmp_path,
                                     classifiers=["resnet18", "aug_resnet18"], config=config, num_per_class=120,
                                     val_fraction=0.25, tensorboard=False, log=lambda _: None)
    assert [r["classifier"] for r in results] == ["resnet18", "aug_resnet18"]
    assert all(r["last_val_accuracy"] >= 0.95 for r in results), [r["last_val_accuracy"] for r in results]


@pytest.fixture(scope="module")
def frame_dataset(tmp_path_factory):
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet

    root = tmp_path_factory.mktemp("shift")
    echonet = write_synthetic_echonet(root / "echonet", num_videos=8, seed=3, num_workers=0, num_frames=(30, 40))
    build_frame_dataset(echonet, root / "frames", resolution=32, num_workers=0, progress=False, verbose=False)
    return root


def test_cli_end_to_end_and_rerun_skips(frame_dataset, tmp_path, monkeypatch, capsys):
    import evaluate_distribution_shift
    from pipelines.data.frame_reader import FrameDataset

    real = FrameDataset(str(frame_dataset / "frames"), "train").images_uint8()
    np.savez(tmp_path / "inverted.npz", images=255 - real)
    np.savez(tmp_path / "copies.npz", images=real, seeds=np.arange(len(real)))
    argv = ["evaluate_distribution_shift.py", "--dataset", str(frame_dataset / "frames"),
            "--generated", f"Inverted={tmp_path / 'inverted.npz'}", "--generated", f"Copies={tmp_path / 'copies.npz'}",
            "--output_dir", str(tmp_path / "out"), "--classifiers", "linear", "resnet18", "--epochs", "1",
            "--batch_size", "8", "--lr", "1e-3", "--no_tensorboard"]
    monkeypatch.setattr("sys.argv", argv)
    evaluate_distribution_shift.main()
    rows = {(r["generated_set"], r["classifier"]): r for r in csv.DictReader(open(tmp_path / "out" / "table.csv"))}
    assert set(rows) == {("Inverted", "linear"), ("Inverted", "resnet18"), ("Copies", "linear"), ("Copies", "resnet18")}
    assert float(rows[("Inverted", "linear")]["last_val_accuracy"]) == 1.0
    assert int(rows[("Copies", "linear")]["n_train"]) + int(rows[("Copies", "linear")]["n_val"]) == 2 * len(real)
    capsys.readouterr()
    evaluate_distribution_shift.main()
    assert capsys.readouterr().out.count("skipping") == 4

    monkeypatch.setattr("sys.argv", argv[:3] + ["--generated", "NoPath", "--output_dir", str(tmp_path / "bad")])
    with pytest.raises(UserInputError, match="NAME=PATH"):
        evaluate_distribution_shift.main()

"""Generated samples leave their .npz shards as a PNG folder, a datasets image dataset and an EchoNet-layout
folder; each is read back with the project's own readers (and datasets') and must give the same pixels."""

import csv

import numpy as np
import pytest
from PIL import Image

from pipelines.data.frame_builder import build_frame_dataset
from pipelines.data.frame_reader import FrameDataset
from pipelines.evaluation.generation import load_images
from pipelines.evaluation.sample_export import export_echonet_folder, export_image_dataset, export_png_folder

SEEDS = [7, 2, 9, 4, 11]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Two shards in generate_images' format, with two per-sample labels (an EF condition and a phase)."""
    folder = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(SEEDS), 1, 16, 16), dtype=np.uint8)
    ef = np.array([55.0, 30.5, 61.25, 40.0, 72.0])
    phase = np.array([0, 1, 1, 0, 1])
    for first, part in ((0, slice(0, 3)), (3, slice(3, 5))):
        np.savez(folder / f"shard-{SEEDS[first]:09d}-n{len(SEEDS[part])}.npz", images=images[part],
                 seeds=np.array(SEEDS[part]), ef=ef[part], phase=phase[part])
    order = np.argsort(SEEDS)
    return folder, images[order], np.sort(SEEDS), ef[order], phase[order]


def test_png_folder_reads_back_with_load_images_and_imagefolder(samples, tmp_path):
    import datasets

    folder, images, seeds, ef, phase = samples
    out = export_png_folder(folder, tmp_path / "png")
    assert np.array_equal(load_images(out), images)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out))["train"]
    by_seed = {row["seed"]: row for row in loaded}
    assert sorted(by_seed) == seeds.tolist()
    for k, seed in enumerate(seeds.tolist()):
        assert isinstance(by_seed[seed]["image"], Image.Image)
        assert np.array_equal(np.asarray(by_seed[seed]["image"]), images[k, 0])
        assert by_seed[seed]["ef"] == ef[k] and by_seed[seed]["phase"] == phase[k]
    assert np.array_equal(load_images(export_png_folder(folder, tmp_path / "two", seeds="4,9")), images[[1, 3]])


def test_image_dataset_trains_like_a_frame_dataset(samples, tmp_path):

    folder, images, seeds, ef, _ = samples
    dd = export_image_dataset(folder, tmp_path / "ds")
    assert isinstance(dd["train"][0]["image"], Image.Image) and sorted(dd["train"]["seed"]) == seeds.tolist()
    frames = FrameDataset(tmp_path / "ds" / "dataset", split="train")
    order = np.argsort(frames.column("seed"))  # rows come shard by shard
    assert np.array_equal(frames.images_uint8()[order], images)
    np.testing.assert_array_equal(frames.column("EF")[order], ef.astype(np.float32))  # the condition hook's column

    class PublicRepo:
        def repo_info(self, repo_id, **kwargs):
            return type("Info", (), {"private": False})()

    with pytest.raises(PermissionError, match="public"):
        export_image_dataset(folder, tmp_path / "ds2", push_to_hub="someone/samples", api=PublicRepo())


def test_echonet_folder_goes_through_the_builder_pixel_exact(samples, tmp_path):
    folder, images, seeds, ef, phase = samples
    out = export_echonet_folder(folder, tmp_path / "echonet")
    with open(out / "FileList.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows.sort(key=lambda r: r["FileName"])  # rows come shard by shard; names carry the seed
    assert [r["FileName"] for r in rows] == [f"generated_{s:09d}" for s in seeds]
    assert [float(r["EF"]) for r in rows] == ef.tolist() and [int(r["phase"]) for r in rows] == phase.tolist()
    built = build_frame_dataset(out, tmp_path / "frames", resolution=16, frame_stride=1, num_workers=0,
                                progress=False, verbose=False)
    assert set(built) == {"train"} and built["train"].num_rows == len(seeds)
    frames = FrameDataset(tmp_path / "frames", split="train")
    order = np.argsort(frames.column("video_id"))
    assert np.array_equal(frames.images_uint8()[order], images)
    np.testing.assert_allclose(frames.column("EF")[order], ef, rtol=1e-6)
    with pytest.raises(ValueError, match="lacks 1 of the requested seeds"):
        export_echonet_folder(folder, tmp_path / "missing", seeds=[2, 3])


def test_evaluate_export_samples_command(samples, tmp_path):
    import evaluate

    folder, images, *_ = samples
    evaluate.main(["export-samples", "--samples", str(folder), "--format", "png", "--output_dir", str(tmp_path / "p")])
    assert np.array_equal(load_images(tmp_path / "p"), images)

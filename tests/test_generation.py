"""Sharded, resumable, per-seed generation and image loading."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import parse_seeds
from pipelines.evaluation.generation import generate_images, load_images
from pipelines.utils import save_image_grid

REPO = Path(__file__).resolve().parents[1]


class SeededStandIn:
    """Input stand-in with the pipeline's call signature: image = f(seed) only; counts its calls."""

    def __init__(self, fail_after_calls=None):
        self.calls, self.fail_after_calls = [], fail_after_calls

    def __call__(self, seeds, num_inference_steps, output_type, **kwargs):
        assert output_type == "latent"
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append(list(seeds))
        images = torch.stack([_expected_float(s) for s in seeds])
        return SimpleNamespace(images=images)


def _expected_float(seed):
    return torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(seed)) * 0.7


def _expected_uint8(seeds):
    """EDM's writing rule, written out independently: scale, clip, truncate."""
    x = np.stack([_expected_float(s).numpy() for s in seeds]).astype(np.float64)
    return np.floor(np.clip(x * 127.5 + 128, 0, 255)).astype(np.uint8)


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,2,5-7") == [1, 2, 5, 6, 7]
    assert parse_seeds(" 4 ") == [4] and parse_seeds([3, 1]) == [3, 1] and parse_seeds(9) == [9]
    for bad in ("5-2", "a-b", "", "1.5"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_exact_seeds_written_with_edm_rule(tmp_path):
    seeds = [5, 0, 7, 3, 11]
    generate_images(SeededStandIn(), tmp_path, seeds, batch_size=2, num_inference_steps=4, progress=False)
    images, got = load_images(tmp_path, return_seeds=True)
    assert got.tolist() == sorted(seeds)
    np.testing.assert_array_equal(images, _expected_uint8(sorted(seeds)))
    np.testing.assert_array_equal(load_images(tmp_path, seeds=seeds), _expected_uint8(seeds))
    with pytest.raises(ValueError, match="lacks 1 requested seeds"):
        load_images(tmp_path, seeds="0-1")


def test_batch_and_shard_size_do_not_change_images(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_images(SeededStandIn(), a, "0-12", batch_size=5, progress=False)
    generate_images(SeededStandIn(), b, "0-12", batch_size=2, shard_size=3, progress=False)
    assert len(list(b.glob("shard-*.npz"))) == 5
    np.testing.assert_array_equal(load_images(a), load_images(b))


def test_interrupted_run_resumes_only_missing_seeds(tmp_path):
    flaky = SeededStandIn(fail_after_calls=3)
    with pytest.raises(KeyboardInterrupt):
        generate_images(flaky, tmp_path, "0-19", batch_size=2, shard_size=4, progress=False)
    finished = {int(s) for p in tmp_path.glob("shard-*.npz") for s in np.load(p)["seeds"]}
    assert finished == {0, 1, 2, 3}  # one full shard; the half-done second shard was not written
    (tmp_path / ".shard-000000004-n4.npz.tmp-999").write_bytes(b"partial")  # as a killed writer leaves it
    resumed = SeededStandIn()
    generate_images(resumed, tmp_path, "0-19", batch_size=2, shard_size=4, progress=False)
    assert sorted(s for call in resumed.calls for s in call) == list(range(4, 20))
    assert not list(tmp_path.glob(".shard-*"))
    np.testing.assert_array_equal(load_images(tmp_path), _expected_uint8(range(20)))


def test_resume_refuses_other_settings(tmp_path):
    generate_images(SeededStandIn(), tmp_path, "0-3", num_inference_steps=4, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        generate_images(SeededStandIn(), tmp_path, "0-5", num_inference_steps=8, progress=False)
    with pytest.raises(ValueError, match="duplicates"):
        generate_images(SeededStandIn(), tmp_path / "x", [1, 1], progress=False)


class FakeProcess:
    """Input stand-in for an accelerate.Accelerator seen from one of its processes."""

    def __init__(self, index, count):
        self.process_index, self.num_processes = index, count
        self.is_main_process, self.device = index == 0, "cpu"

    def wait_for_everyone(self):
        pass


def test_seeds_split_across_processes(tmp_path):
    workers = [SeededStandIn(), SeededStandIn()]
    (tmp_path / "multi").mkdir()
    for rank in (0, 1):
        generate_images(workers[rank], tmp_path / "multi", "0-9", batch_size=2, shard_size=2,
                        accelerator=FakeProcess(rank, 2), progress=False)
    done = [sorted(s for c in w.calls for s in c) for w in workers]
    assert done[0] and done[1] and not set(done[0]) & set(done[1])
    generate_images(SeededStandIn(), tmp_path / "single", "0-9", batch_size=4, progress=False)
    np.testing.assert_array_equal(load_images(tmp_path / "multi"), load_images(tmp_path / "single"))


def _tiny_pipeline():
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline
    from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
    from pipelines.networks import build_network, tiny_config

    torch.manual_seed(0)
    pipe = EchoDiffPipeline(unet=build_network("ddpmpp", **tiny_config("ddpmpp")), scheduler=EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_real_pipeline_batch_invariant_and_matches_direct_call(tmp_path):
    pipe = _tiny_pipeline()
    generate_images(pipe, tmp_path / "b3", "0-6", batch_size=3, num_inference_steps=3, progress=False)
    generate_images(pipe, tmp_path / "b7", "0-6", batch_size=7, num_inference_steps=3, progress=False)
    a, b = load_images(tmp_path / "b3"), load_images(tmp_path / "b7")
    assert a.shape == (7, 1, 16, 16)
    np.testing.assert_array_equal(a, b)
    direct = pipe(seeds=[4], num_inference_steps=3, output_type="latent").images.double().numpy()
    np.testing.assert_array_equal(a[4:5], np.floor(np.clip(direct * 127.5 + 128, 0, 255)).astype(np.uint8))


def test_killed_process_resumes_to_same_images(tmp_path):
    """A real SIGKILL mid-run (not a Python exception): rerunning completes the same image set."""
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_generation import _tiny_pipeline
        from pipelines.evaluation.generation import generate_images
        torch.set_num_threads(1)
        pipe = _tiny_pipeline()
        calls = [0]
        original = pipe.__call__
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(os.environ["KILL_AT_CALL"]):
                os.kill(os.getpid(), 9)
            return original(*args, **kwargs)
        generate_images(call, sys.argv[1], "0-11", batch_size=2, shard_size=4, num_inference_steps=2, progress=False)
    """)
    out = tmp_path / "killed"
    env = {**os.environ, "KILL_AT_CALL": "4"}
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True)
    assert proc.returncode == -9
    assert len(list(out.glob("shard-*.npz"))) == 1
    generate_images(_tiny_pipeline(), out, "0-11", batch_size=3, shard_size=4, num_inference_steps=2, progress=False)
    fresh = tmp_path / "fresh"
    generate_images(_tiny_pipeline(), fresh, "0-11", batch_size=5, num_inference_steps=2, progress=False)
    np.testing.assert_array_equal(load_images(out), load_images(fresh))
    assert json.loads((out / "generation.json").read_text())["num_inference_steps"] == 2


def test_load_images_formats_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", images=nhwc)
    np.testing.assert_array_equal(load_images(tmp_path / "imgs.npz"), nhwc.transpose(0, 3, 1, 2))
    png_dir = tmp_path / "pngs"
    png_dir.mkdir()
    rgb = rng.integers(0, 256, (2, 3, 6, 6), dtype=np.uint8)
    for i, img in enumerate(rgb):
        Image.fromarray(img.transpose(1, 2, 0)).save(png_dir / f"{i:03d}.png")
    np.testing.assert_array_equal(load_images(png_dir), rgb)
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_images(tmp_path / "float.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a folder of generation shards"):
        load_images(tmp_path / "empty")


def test_save_image_grid(tmp_path):
    images = np.stack([np.full((1, 4, 5), 10 * (i + 1), np.uint8) for i in range(5)])
    path = save_image_grid(images, tmp_path / "grid.png", nrow=3, padding=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 5 + 1, 3 * 6 + 1)
    assert grid[1, 1] == 10 and grid[1, 7] == 20 and grid[6, 7] == 50 and grid[6, 13] == 0  # 6th cell empty
    assert grid[0, 0] == 0  # padding
    with pytest.raises(ValueError, match="uint8"):
        save_image_grid(images.astype(np.float32), tmp_path / "bad.png")

"""Post-hoc EMA: the power-function update against its closed form, the reconstruction of an untracked EMA
length within its stated bound, bitwise resume of a --phema run, and a snapshot write killed half way."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipelines.networks import tiny_config
from pipelines.phema import (
    PowerFunctionEMA,
    list_snapshots,
    reconstruct,
    reconstruction_residual,
    solve_posthoc_coefficients,
    std_to_exp,
)
from pipelines.training import train
from pipelines.training.checkpoints import training_checkpoints
from pipelines.training.config import config_from_cli_args
from pipelines.utils import reset_accelerate_state

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class Vector(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(size))


def trajectory(steps, size, seed=0):
    """A deterministic weight sequence theta_1..theta_K (K, size): a random walk with a drift, float64."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(0.0, 0.05, (steps, size)), axis=0) + np.linspace(0, 1, steps)[:, None]


def run_ema(stds, thetas, batch, snapshot_every=None, folder=None):
    model = Vector(thetas.shape[1])
    ema = PowerFunctionEMA(model, stds)
    for k, theta in enumerate(thetas, start=1):
        with torch.no_grad():
            model.theta.copy_(torch.as_tensor(theta, dtype=torch.float32))
        ema.update(model, batch, (k - 1) * batch)
        if snapshot_every and k % snapshot_every == 0:
            ema.write_snapshots(folder, k * batch)
    return ema


def test_std_and_exponent_follow_edm2s_equation():
    stds = np.array([0.02, 0.05, 0.07, 0.10, 0.2])
    exps = std_to_exp(stds)
    # Eq. 123, written out here: std = sqrt((g + 1) / ((g + 2)^2 (g + 3)))
    np.testing.assert_allclose(np.sqrt((exps + 1) / ((exps + 2) ** 2 * (exps + 3))), stds, rtol=1e-10)
    np.testing.assert_allclose(exps[[1, 3]], [16.97, 6.94], atol=0.01)  # EDM2: 0.050 <-> 16.97, 0.100 <-> 6.94


def test_power_function_update_equals_its_closed_form():
    """After K steps, theta_j's weight is (j^(g+1) - (j-1)^(g+1)) / K^(g+1) (the profile integrated over step j)."""
    steps, batch = 300, 8
    thetas = trajectory(steps, 16)
    ema = run_ema([0.05, 0.10], thetas, batch)
    j = np.arange(1, steps + 1, dtype=np.float64)
    for gamma, shadow in zip(std_to_exp(np.array([0.05, 0.10])), ema.shadows):
        weights = (j ** (gamma + 1) - (j - 1) ** (gamma + 1)) / steps ** (gamma + 1)
        assert weights.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(shadow[0].numpy(), weights @ thetas, rtol=0, atol=2e-5)


def test_reconstructed_ema_length_matches_the_tracked_one_within_the_bound(tmp_path):
    """0.07 reconstructed from snapshots of 0.05 and 0.10 vs 0.07 tracked directly.

    The tracked EMA is exactly <r, theta> in L2 over images, theta being constant during each step (see
    pipelines/phema.py), and so is each snapshot; so |reconstructed - tracked| <= ||r_0.07 - sum_i x_i r_i||_2
    * ||theta||_2 by Cauchy-Schwarz, plus float32 rounding of the EMAs (atol 1e-4 here).
    """
    steps, batch, every = 2000, 4, 100
    thetas = trajectory(steps, 64, seed=1)
    ema = run_ema([0.05, 0.07, 0.10], thetas, batch, snapshot_every=every, folder=tmp_path)
    for path in tmp_path.glob("*-0.070.safetensors"):
        path.unlink()  # reconstruct from the 0.05 and 0.10 snapshots only
    snapshots = list_snapshots(tmp_path)
    assert len(snapshots) == 2 * steps // every and {s.std for s in snapshots} == {0.05, 0.10}
    tensors, info = reconstruct(snapshots, 0.07)
    assert info["images_seen"] == steps * batch and info["snapshots"] == 40
    got, tracked = tensors["theta"].double().numpy(), ema.shadows[1][0].double().numpy()

    in_t, in_std = [s.images_seen for s in snapshots], [s.std for s in snapshots]
    coefs = solve_posthoc_coefficients(in_t, in_std, steps * batch, [0.07])[:, 0]
    residual = reconstruction_residual(in_t, in_std, steps * batch, 0.07, coefs)
    assert residual == pytest.approx(info["residual"])
    theta_norm = np.sqrt((thetas**2).sum(axis=0) * batch)  # ||theta||_2 over [0, K * batch] images
    bound = residual * theta_norm + 1e-4
    error = np.abs(got - tracked)
    assert np.all(error <= bound)
    # The bound means something: the relative L2 residual is small, and the reconstruction is far closer
    # to the tracked 0.07 than either input profile is.
    assert residual * np.sqrt(steps * batch) < 0.05
    spread = np.abs(ema.shadows[0][0].double().numpy() - ema.shadows[2][0].double().numpy())
    assert error.max() < 0.05 * spread.max()


def tiny_overrides():
    overrides = tiny_config("edm2-xs", resolution=16)
    overrides.pop("resolution")
    return overrides


def phema_argv(dataset, out, steps):
    return ["--dataset", dataset, "--output_dir", str(out), "--arch", "edm2-xs", "--recipe", "edm2",
            "--network_overrides", json.dumps(tiny_overrides()), "--batch_size", "8",
            "--duration_kimg", str(steps * 8 / 1000), "--lr_rampup_kimg", "0.016", "--lr_ref_batches", "2",
            "--dropout", "0.1", "--phema_snapshot_kimg", "0.016", "--checkpointing_kimg", "0.016",
            "--num_sample_images", "0", "--report_to", "none", "--dataloader_num_workers", "0",
            "--no_progress_bar", "--mixed_precision", "no", "--logging_steps", "1"]


def snapshot_contents(out):
    """name -> (tensors, metadata) of each snapshot (safetensors' header order is not fixed, so not the bytes)."""
    contents = {}
    for snapshot in list_snapshots(Path(out) / "phema"):
        with safe_open(str(snapshot.path), framework="pt") as f:
            contents[snapshot.path.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return contents


def assert_same_snapshots(got, expected):
    for name, (tensors, metadata) in expected.items():
        assert got[name][1] == metadata, name
        assert tensors.keys() == got[name][0].keys()
        assert all(torch.equal(got[name][0][k], v) for k, v in tensors.items()), name


@pytest.fixture(scope="module")
def frames16(tmp_path_factory):
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet

    root = tmp_path_factory.mktemp("echonet")
    write_synthetic_echonet(root / "echo", num_videos=4, seed=0, num_workers=1, num_frames=(20, 24))
    build_frame_dataset(root / "echo", root / "frames16", resolution=16, num_workers=1, progress=False,
                        verbose=False)
    return str(root / "frames16")


@pytest.fixture(scope="module")
def straight(frames16, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = train(config_from_cli_args(phema_argv(frames16, out, 6)))
    reset_accelerate_state()
    return out, result


def test_phema_run_resumes_bitwise(frames16, tmp_path, straight):
    straight_out, straight_result = straight
    expected = snapshot_contents(straight_out)
    assert sorted(expected) == [f"phema-0000000000{n}-{s}.safetensors" for n in (16, 32, 48) for s in ("0.050", "0.100")]
    train(config_from_cli_args(phema_argv(frames16, tmp_path, 3)))
    reset_accelerate_state()
    resumed = train(config_from_cli_args(phema_argv(frames16, tmp_path, 6) + ["--resume_from_checkpoint", "latest"]))
    assert resumed.images_seen == 48
    got = snapshot_contents(tmp_path)
    assert set(got) - set(expected) == {"phema-000000000024-0.050.safetensors", "phema-000000000024-0.100.safetensors"}
    assert_same_snapshots(got, expected)  # (the first run ended at 24 images with a snapshot of its own)
    a = load_file(str(straight_result.last_checkpoint / "phema.safetensors"))
    b = load_file(str(resumed.last_checkpoint / "phema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in straight_result.history[3:]]


# train_unconditional.py, SIGKILLed half way through writing the first file of its second snapshot.
KILL_DURING_SNAPSHOT = """
import os, signal, sys
from pipelines import phema

atomic_write, calls = phema.atomic_write, []

def dying_write(path, write, mode="wb"):
    calls.append(path)
    if len(calls) < 3:
        return atomic_write(path, write, mode)

    class HalfThenDie:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return atomic_write(path, lambda handle: write(HalfThenDie(handle)), mode)

phema.atomic_write = dying_write
import train_unconditional
train_unconditional.main(sys.argv[1:])
"""


def test_killed_snapshot_write_leaves_no_corrupt_snapshot(frames16, tmp_path, straight):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SNAPSHOT, *phema_argv(frames16, tmp_path, 6)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = tmp_path / "phema"
    assert len(list(folder.glob(".phema-000000000032-0.050.safetensors.tmp-*"))) == 1  # the half-written file
    # Only the complete first snapshot is listed, and each listed file loads.
    assert [(s.images_seen, s.std) for s in list_snapshots(folder)] == [(16, 0.05), (16, 0.1)]
    assert [n for n, _ in training_checkpoints(tmp_path).checkpoints()] == [16]  # snapshots precede checkpoints
    resumed = train(config_from_cli_args(phema_argv(frames16, tmp_path, 6) + ["--resume_from_checkpoint", "latest"]))
    assert resumed.images_seen == 48
    assert not list(folder.glob(".*"))  # the leftover is removed on restart
    got, expected = snapshot_contents(tmp_path), snapshot_contents(straight[0])
    assert got.keys() == expected.keys()
    assert_same_snapshots(got, expected)


def test_phema_sweep_scores_each_length_and_exports_the_best(frames16, tmp_path, straight):
    import evaluate
    from pipelines.data.frame_reader import load_frames
    from pipelines.hub import load_pipeline
    from pipelines.phema import load_weights

    run = straight[0]
    snapshots = list_snapshots(run / "phema")
    # At the last snapshot's time a tracked length is reproduced by (nearly) that snapshot alone.
    tensors, _ = reconstruct(snapshots, 0.05)
    last = load_file(str(run / "phema" / "phema-000000000048-0.050.safetensors"))
    assert all(torch.allclose(tensors[k], last[k], rtol=1e-4, atol=1e-5) for k in last)

    num_real = len(load_frames(frames16, "train"))
    result = evaluate.main(["phema-sweep", "--run", str(run), "--ema_std", "0.1,0.05,0.2", "--seeds", "0-5",
                            "--steps", "2", "--dataset", frames16, "--num_real", str(num_real), "--cache_dir",
                            str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--no_progress_bar"])
    assert [row["ema_std"] for row in result["rows"]] == [0.05, 0.1, 0.2]
    assert all(np.isfinite(row["fid"]) and row["num_generated"] == 6 for row in result["rows"])
    assert len({row["fid"] for row in result["rows"]}) == 3  # different weights, different scores
    assert result["best"]["fid"] == min(row["fid"] for row in result["rows"])
    assert (tmp_path / "out" / "phema_sweep.csv").is_file() and (tmp_path / "out" / "phema_sweep.png").is_file()
    best = load_pipeline(result["pipeline"])
    expected = load_weights(load_pipeline(run / "pipeline").unet, reconstruct(snapshots, result["best"]["ema_std"])[0])
    assert all(torch.equal(a, b) for a, b in zip(best.unet.state_dict().values(), expected.state_dict().values()))
    card = (Path(result["pipeline"]) / "README.md").read_text()
    assert f"relative std **{result['best']['ema_std']:g}**" in card

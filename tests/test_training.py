"""train_unconditional.py / pipelines.training: the config and its CLI, data order, the training step,
training runs, exact resume, kill-safe checkpoints, data parallelism, export, argument errors. Tiny
networks on a tiny synthetic EchoNet frame dataset, CPU only."""

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_unconditional
from pipelines.networks import tiny_config
from pipelines.training import ConfigError, TrainConfig, resolve_mixed_precision, train
from pipelines.training.checkpoints import TRAINING_STATE_FILE, CheckpointStore, training_checkpoints
from pipelines.training.config import FIELDS, build_parser, config_from_cli_args, config_to_cli_args
from pipelines.training.data_order import RankBatchSampler, batch_layout, chunk_positions, image_generators
from pipelines.training.export import training_card_section
from pipelines.training.precision import cpu_has_native_bf16
from pipelines.training.stats import TrainStats
from pipelines.training.step import build_adam, build_components, learning_rate, train_step
from pipelines.utils import reset_accelerate_state, to_float

REPO = Path(__file__).resolve().parents[1]


# Each test starts and ends with a fresh accelerate state (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="session")
def frames16(tmp_path_factory):
    """A 16x16 frame dataset (28 train frames) built from 6 synthetic EchoNet videos."""
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet

    root = tmp_path_factory.mktemp("echonet")
    write_synthetic_echonet(root / "echo", num_videos=6, seed=0, num_workers=1, num_frames=(20, 24))
    build_frame_dataset(root / "echo", root / "frames16", resolution=16, num_workers=1, progress=False,
                        verbose=False)
    return str(root / "frames16")


def tiny_overrides(arch):
    overrides = tiny_config(arch, resolution=16)
    overrides.pop("resolution")
    return overrides


def make_cfg(dataset, out, arch="ddpmpp", steps=4, batch=8, **kw):
    base = dict(
        dataset=dataset, output_dir=str(out), arch=arch, network_overrides=tiny_overrides(arch), batch_size=batch,
        duration_kimg=steps * batch / 1000, lr=2e-3, lr_rampup_kimg=0.0, ema_halflife_kimg=(0.05,),
        dropout=0.0, dataloader_num_workers=0, checkpointing_kimg=1000.0, snapshot_kimg=1000.0,
        num_sample_images=4, sample_steps=2, logging_steps=1, report_to="none", progress_bar=False,
        mixed_precision="no",  # the loop's arithmetic is what these tests compare; precision has its own test
    )
    base.update(kw)
    return TrainConfig(**base)


def checkpoint_numbers(output_dir):
    return [n for n, _ in training_checkpoints(output_dir).checkpoints()]


def checkpoint_tensors(path):
    return load_file(str(Path(path) / "model.safetensors")), load_file(str(Path(path) / "ema.safetensors"))


def assert_tensors_equal(a, b, exact=True, rtol=1e-5, atol=1e-6):
    assert sorted(a) == sorted(b)
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


# ------------------------------------------------------------------------------------------------
# pure pieces


def test_batch_layout_and_chunks_cover_the_global_batch_once():
    layout = batch_layout(8, 2, 2)
    assert (layout.batch_per_round, layout.rounds, layout.batch_per_process) == (2, 2, 4)
    positions = sorted(p for rank in range(2) for r in range(2) for p in chunk_positions(3, r, rank, layout))
    assert positions == list(range(24, 32))
    rank0 = {p for r in range(2) for p in chunk_positions(3, r, 0, layout)}
    rank1 = {p for r in range(2) for p in chunk_positions(3, r, 1, layout)}
    assert not rank0 & rank1
    with pytest.raises(ConfigError, match="--batch_size 8 is not divisible by the 3 processes"):
        batch_layout(8, 3, None)
    with pytest.raises(ConfigError, match="--batch_per_gpu 3 must divide"):
        batch_layout(8, 2, 3)


def test_sampler_epochs_are_permutations_and_resume_mid_stream():
    layout = batch_layout(6, 1, 3)
    sampler = RankBatchSampler(10, layout, rank=0, seed=5)
    it = iter(sampler)
    stream = [i for _ in range(20) for i in next(it)]  # 60 positions = 6 epochs of 10
    for epoch in range(6):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    resumed = iter(RankBatchSampler(10, layout, rank=0, seed=5, start_step=3))
    assert [i for _ in range(4) for i in next(resumed)] == stream[18:30]


def test_learning_rate_warmup_closed_form():
    cfg = TrainConfig(dataset="-", output_dir="-", lr=1e-3, lr_rampup_kimg=10000)
    assert learning_rate(cfg, 0) == 0.0
    assert learning_rate(cfg, 2_500_000) == pytest.approx(2.5e-4)
    assert learning_rate(cfg, 10_000_000) == pytest.approx(1e-3)
    assert learning_rate(cfg, 50_000_000) == pytest.approx(1e-3)


def test_paper_defaults():
    cfg = train_unconditional.parse_args(["--dataset", "d", "--output_dir", "o"])
    assert (cfg.batch_size, cfg.dropout, cfg.lr, cfg.lr_rampup_kimg) == (512, 0.05, 1e-3, 10000)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert (tuple(cfg.ema_halflife_kimg), cfg.ema_rampup_ratio) == ((500.0,), 0.05)
    assert cfg.duration_nimg == 30_106_000  # ADM, Table 1
    assert train_unconditional.parse_args(
        ["--dataset", "d", "--output_dir", "o", "--arch", "ncsnpp"]).duration_nimg == 60_211_000


def test_cli_flags_are_the_config_fields_and_round_trip():
    parser = build_parser()
    dests = {action.dest for action in parser._actions} - {"help"}
    assert dests == set(FIELDS)  # one flag per field, nothing hand-written beside them
    cfg = TrainConfig(dataset="data/x", output_dir="runs/y", arch="ncsnpp", precond="ve", batch_size=64,
                      network_overrides={"model_channels": 32}, ema_halflife_kimg=(10.0, 50.0), ema_rampup_ratio=None,
                      duration_kimg=12.5, mixed_precision="bf16", cpu=True, progress_bar=False, hub_private=False,
                      channels_last=False, checkpoints_total_limit=3, resume_from_checkpoint="latest",
                      batch_per_gpu=16, lr=3e-4, compile=True)
    assert config_from_cli_args(config_to_cli_args(cfg)) == cfg
    defaults = TrainConfig(dataset="d", output_dir="o")
    assert config_to_cli_args(defaults) == ["--dataset", "d", "--output_dir", "o"]
    off = config_from_cli_args(["--dataset", "d", "--output_dir", "o", "--no_channels_last", "--no_hub_private",
                                "--no_progress_bar", "--ema_rampup_ratio", "none"])
    assert (off.channels_last, off.hub_private, off.progress_bar, off.ema_rampup_ratio) == (False, False, False, None)
    with pytest.raises(SystemExit):  # one flag style: snake_case only
        config_from_cli_args(["--dataset", "d", "--output_dir", "o", "--no-channels_last"])


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train_unconditional.parse_args(["--help"])
    text = capsys.readouterr().out
    assert text.count("(default:") == len(FIELDS) - 2  # every option but the two required ones
    assert "\n    accelerate launch --config_file" in text  # the script's docstring keeps its layout
    words = " ".join(text.split())
    assert "--channels_last, --no_channels_last" in words and "(default: Table 1: adm 30106, ddpmpp 60211" in words


def test_training_adam_is_fused_and_follows_the_adam_equations():
    cfg = TrainConfig(dataset="-", output_dir="-", lr=3e-2, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-3)
    param = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    optimizer = build_adam([param], cfg)
    assert optimizer.defaults["fused"] is True  # torch 2.13 has the CPU kernel
    expected, m, v = param.detach().clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in range(1, 4):
        grad = torch.tensor([0.3, -2.0, 0.01], dtype=torch.float64) * t
        param.grad = grad.clone()
        optimizer.step()
        # Kingma & Ba's Algorithm 1 with the bias corrections, written out.
        m = 0.8 * m + 0.2 * grad
        v = 0.95 * v + 0.05 * grad**2
        expected -= 3e-2 * (m / (1 - 0.8**t)) / ((v / (1 - 0.95**t)).sqrt() + 1e-3)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-12)


class Overflowing(torch.nn.Module):
    """F(x, c_noise) = conv(x) * 1e30: finite weights whose loss and gradients overflow float32."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, c_noise):
        return self.conv(x) * 1e30


def test_nonfinite_gradients_are_zeroed_and_flagged():
    from accelerate import Accelerator

    from pipelines.losses import DenoisingLoss

    accelerator = Accelerator(cpu=True)
    net = Overflowing()
    before = [p.detach().clone() for p in net.parameters()]
    cfg = TrainConfig(dataset="-", output_dir="-", batch_size=2, lr=1e-2, lr_rampup_kimg=0)
    optimizer = build_adam(net.parameters(), cfg)  # the fused kernel, as training uses
    model, optimizer = accelerator.prepare(net, optimizer)
    images = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    flag = train_step(accelerator, model, optimizer, DenoisingLoss("edm"), [(images, range(2))], cfg,
                      batch_layout(2, 1, None), TrainStats(torch.device("cpu")), images_seen=0)
    assert bool(flag)
    # Zeroed gradients: Adam's first step moves nothing, and nothing became NaN.
    for p, p0 in zip(net.parameters(), before):
        assert torch.equal(p.detach(), p0)


def test_sgd_gradient_is_independent_of_the_chunking(frames16):
    """1 chunk of 8 vs 4 accumulation chunks of 2: the same gradient (read through one SGD step, lr 1),
    equal to the mean over images of each image's pixel-summed loss gradient."""
    import copy

    from accelerate import Accelerator

    from pipelines.data.frame_reader import FrameDataset

    dataset = FrameDataset(frames16)
    images = torch.stack([dataset[i]["image"] for i in range(8)])
    positions = list(range(100, 108))
    cfg = make_cfg(frames16, "-", batch=8, lr=1.0)  # train_step sets the lr from cfg
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    net0, loss_fn, _ = build_components(cfg, 16, 1)

    # Independent reference: mean over images of each image's pixel-summed loss, image by image.
    ref_net = copy.deepcopy(net0)
    ref_loss = sum(
        loss_fn(ref_net, to_float(images[i:i + 1]), generator=image_generators(positions[i:i + 1], cfg.seed))[0].sum()
        for i in range(8)) / 8
    reference = torch.autograd.grad(ref_loss, list(ref_net.parameters()))

    for per_round in (8, 2):
        net = copy.deepcopy(net0)
        optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
        layout = batch_layout(8, 1, per_round)
        chunks = [(images[r * per_round:(r + 1) * per_round], positions[r * per_round:(r + 1) * per_round])
                  for r in range(layout.rounds)]
        train_step(accelerator, net, optimizer, loss_fn, chunks, cfg, layout, TrainStats(torch.device("cpu")),
                   images_seen=0)
        gradient = [p0.detach() - p.detach() for p, p0 in zip(net.parameters(), net0.parameters())]
        for g, ref in zip(gradient, reference):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in reference) > 0


# ------------------------------------------------------------------------------------------------
# whole runs


def fixed_set_loss(net, loss_fn, dataset_path, seed=0, repeats=4):
    """Mean loss of ``net`` on every training image with fixed noise (repeats x per image)."""
    from pipelines.data.frame_reader import FrameDataset

    images = to_float(torch.as_tensor(FrameDataset(dataset_path).images_uint8()))
    n = images.shape[0]
    with torch.no_grad():
        losses = [loss_fn(net.eval(), images, generator=image_generators(range(10**9 + r * n, 10**9 + (r + 1) * n),
                                                                        seed))[0].mean() for r in range(repeats)]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("arch,precond", [("adm", "edm"), ("ddpmpp", "vp"), ("ncsnpp", "ve")])
def test_each_preconditioning_trains_and_exports_a_loadable_pipeline(frames16, tmp_path, arch, precond):
    from diffusers import DiffusionPipeline

    cfg = make_cfg(frames16, tmp_path / "run", arch=arch, precond=precond, steps=30, snapshot_kimg=0.12,
                   report_to="tensorboard" if precond == "edm" else "none")
    result = train(cfg)
    assert (result.images_seen, result.steps, result.nonfinite_steps) == (240, 30, 0)

    # Loss falls: the exported (EMA) network vs the initial one, on a fixed set with fixed noise.
    torch.manual_seed(cfg.seed)
    initial, loss_fn, _ = build_components(cfg, 16, 1)
    pipe = DiffusionPipeline.from_pretrained(str(result.pipeline_dirs[0]), trust_remote_code=True)
    before, after = fixed_set_loss(initial, loss_fn, frames16), fixed_set_loss(pipe.unet, loss_fn, frames16)
    assert after < 0.85 * before, (before, after)

    # The export holds the EMA weights (not the raw ones) of the final checkpoint.
    raw, ema = checkpoint_tensors(result.last_checkpoint)
    exported = pipe.unet.state_dict()
    for name, value in exported.items():
        if value.is_floating_point():
            assert torch.equal(value, ema[f"ema0/{name}"]), name
    assert any(not torch.equal(exported[n], raw[n]) for n in raw)
    assert pipe.scheduler.config.preconditioning == precond
    samples = pipe(seeds=[0, 1], num_inference_steps=2, output_type="latent").images
    assert samples.shape == (2, 1, 16, 16) and torch.isfinite(samples).all()

    card = (result.pipeline_dirs[0] / "README.md").read_text()
    assert "## Training configuration" in card and f"| arch | {arch} |" in card and "| batch_size | 8 |" in card
    # run_info.json re-renders the card's training section (no README splicing needed).
    run_info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert (run_info["images_seen"], run_info["steps"], run_info["arch"]) == (240, 30, arch)
    assert training_card_section(run_info).strip() in card

    # Sample grids (4 images of 16x16 -> 32x32) at 120 and 240 kimg x 1e-3.
    grids = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["samples-000000.120kimg.png", "samples-000000.240kimg.png"]
    from PIL import Image

    assert Image.open(grids[0]).size == (32, 32)
    if precond == "edm":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "run" / "logs" / "echodiff")).Reload()
        scalars = set(events.Tags()["scalars"])
        for tag in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_second", "progress/kimg",
                    "train/nonfinite_grad_steps", "loss_per_sigma/sigma0.1-1"):
            assert tag in scalars, (tag, scalars)
        assert len(events.Scalars("train/loss")) == 30
        assert "samples" in events.Tags()["images"]


def test_all_nine_combinations_train(frames16, tmp_path):
    for arch in ("adm", "ddpmpp", "ncsnpp"):
        for precond in ("edm", "vp", "ve"):
            result = train(make_cfg(frames16, tmp_path / f"{arch}-{precond}", arch=arch, precond=precond, steps=2,
                                    num_sample_images=0))
            losses = [h["train/loss"] for h in result.history]
            assert len(losses) == 2 and all(np.isfinite(losses)), (arch, precond, losses)
            assert (result.pipeline_dirs[0] / "model_index.json").is_file()


def resume_cfg(dataset, out, steps, **kw):
    # Dropout on (the restored RNG matters), lr warm-up and EMA ramp-up cross the resume point,
    # two EMA half-lives, and a checkpoint every 2 steps (16 images) with at most 2 kept.
    return make_cfg(dataset, out, steps=steps, dropout=0.1, lr_rampup_kimg=0.04, ema_halflife_kimg=(0.004, 0.2),
                    ema_rampup_ratio=0.5, checkpointing_kimg=0.016, checkpoints_total_limit=2, num_sample_images=2, snapshot_kimg=0.016,
                    **kw)


@pytest.fixture(scope="module")
def straight_run(frames16, tmp_path_factory):
    result = train(resume_cfg(frames16, tmp_path_factory.mktemp("straight"), steps=6))
    reset_accelerate_state()
    return result


def test_resume_is_bitwise_identical(frames16, tmp_path, straight_run):
    first = train(resume_cfg(frames16, tmp_path, steps=3))
    assert first.images_seen == 24
    reset_accelerate_state()
    second = train(resume_cfg(frames16, tmp_path, steps=6, resume_from_checkpoint="latest"))
    assert second.images_seen == 48 and second.steps == 6
    assert checkpoint_numbers(tmp_path) == [32, 48]  # total limit 2
    raw_a, ema_a = checkpoint_tensors(straight_run.last_checkpoint)
    raw_b, ema_b = checkpoint_tensors(second.last_checkpoint)
    assert_tensors_equal(raw_a, raw_b)
    assert_tensors_equal(ema_a, ema_b)
    assert any(not torch.equal(ema_a[f"ema0/{k}"], ema_a[f"ema1/{k}"]) for k in raw_a)
    # The logged losses after the resume point are the straight run's too.
    assert [h["train/loss"] for h in second.history] == [h["train/loss"] for h in straight_run.history[3:]]


# Run by the SIGKILL test in a subprocess: train_unconditional.py, killed (SIGKILL) inside its 2nd checkpoint
# save, after every file of the checkpoint (its state file last) is written and before the folder is renamed
# into place: the worst moment for a kill.
KILL_DURING_SECOND_SAVE = """
import os, signal, sys
from pipelines.training import checkpoints

fsync_tree, saves = checkpoints.fsync_tree, []

def fsync_tree_then_die(folder):
    saves.append(folder)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    fsync_tree(folder)

checkpoints.fsync_tree = fsync_tree_then_die
import train_unconditional
train_unconditional.main(sys.argv[1:])
"""


def test_sigkill_during_checkpoint_save_leaves_previous_checkpoint_usable(frames16, tmp_path, straight_run):
    out = tmp_path / "killed"
    argv = [
        sys.executable, "-c", KILL_DURING_SECOND_SAVE, "--dataset", frames16, "--output_dir", str(out),
        "--arch", "ddpmpp", "--network_overrides", json.dumps(tiny_overrides("ddpmpp")), "--batch_size", "8",
        "--duration_kimg", "0.048", "--lr", "2e-3", "--dropout", "0.1", "--lr_rampup_kimg", "0.04",
        "--ema_halflife_kimg", "0.004", "0.2", "--ema_rampup_ratio", "0.5", "--checkpointing_kimg", "0.016", "--checkpoints_total_limit", "2",
        "--num_sample_images", "2", "--sample_steps", "2", "--snapshot_kimg", "0.016", "--logging_steps", "1",
        "--report_to", "none", "--dataloader_num_workers", "0", "--no_progress_bar", "--mixed_precision", "no",
    ]
    # Same arguments as resume_cfg; the 2nd save (at 32 images) is killed.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    half_written = out / "checkpoints" / ".tmp-checkpoint-000000000032"
    assert (half_written / TRAINING_STATE_FILE).is_file()  # the killed save had written everything ...
    assert checkpoint_numbers(out) == [16]  # ... but only the finished checkpoint at 16 counts
    resumed = train(resume_cfg(frames16, out, steps=6, resume_from_checkpoint="latest"))
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())
    raw_a, ema_a = checkpoint_tensors(straight_run.last_checkpoint)
    raw_b, ema_b = checkpoint_tensors(resumed.last_checkpoint)
    assert_tensors_equal(raw_a, raw_b)
    assert_tensors_equal(ema_a, ema_b)


def test_checkpoint_store_lists_only_finished_saves_and_keeps_the_newest(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", "epoch-", 3)
    for number in (1, 2, 3):
        store.save(number, lambda folder, n=number: (folder / "weights.txt").write_text(str(n)), {"number": number},
                   total_limit=2)
    assert [n for n, _ in store.checkpoints()] == [2, 3]  # total limit 2
    assert store.read_state(store.latest()) == {"number": 3} and (store.latest() / "weights.txt").read_text() == "3"
    # A save that died before its rename is never listed, even with its state file written, and is removed.
    store.begin(4)
    (store.temp_path(4) / store.state_file).write_text("{}")
    (store.root / "epoch-005").mkdir()  # a folder without a state file is no checkpoint either
    assert [n for n, _ in store.checkpoints()] == [2, 3]
    assert store.remove_partial() == [store.temp_path(4)] and not store.temp_path(4).exists()
    # Saving a number again replaces that checkpoint.
    store.save(3, lambda folder: (folder / "weights.txt").write_text("again"), {"number": 3, "again": True})
    assert (store.path(3) / "weights.txt").read_text() == "again" and store.read_state(store.path(3))["again"]
    assert not any(p.name.startswith(".tmp-") for p in store.root.iterdir())


def dp_cfg(dataset, out, **kw):
    # Dropout off (its masks are the one split-dependent random draw); EMA without ramp-up so that it
    # lags the weights visibly. Adam's eps 1e-4 (not 1e-8) keeps it from blowing float rounding noise in
    # gradients that are zero in exact arithmetic (attention key biases) up to full-size steps.
    return make_cfg(dataset, out, steps=4, ema_halflife_kimg=(0.05,), ema_rampup_ratio=None, num_sample_images=0,
                    adam_epsilon=1e-4, **kw)


@pytest.fixture(scope="module")
def one_chunk_run(frames16, tmp_path_factory):
    result = train(dp_cfg(frames16, tmp_path_factory.mktemp("one_chunk")))
    reset_accelerate_state()
    return result


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run_dir, reference):
    raw_a, ema_a = checkpoint_tensors(reference.last_checkpoint)
    raw_b, ema_b = checkpoint_tensors(training_checkpoints(run_dir).latest())
    assert_tensors_equal(raw_a, raw_b, exact=False)
    assert_tensors_equal(ema_a, ema_b, exact=False)
    ref_metrics, got = metrics(reference.output_dir), metrics(run_dir)
    for key in ("train/loss", "train/grad_norm"):  # the gradient itself, not only Adam's normalised step
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref_metrics], rtol=1e-4)
    return raw_b, ema_b


def test_gradient_accumulation_run_matches_one_chunk_run(frames16, tmp_path, one_chunk_run):
    result = train(dp_cfg(frames16, tmp_path, batch_per_gpu=2))
    assert result.steps == 4
    assert_same_training(tmp_path, one_chunk_run)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_data_parallel_match_one_process(frames16, tmp_path, one_chunk_run):
    out = tmp_path / "ddp"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(REPO / "train_unconditional.py"), "--cpu", "--dataset", frames16, "--output_dir", str(out),
        "--arch", "ddpmpp", "--network_overrides", json.dumps(tiny_overrides("ddpmpp")),
        "--batch_size", "8", "--batch_per_gpu", "2", "--duration_kimg", "0.032", "--lr", "2e-3",
        "--lr_rampup_kimg", "0", "--dropout", "0", "--adam_epsilon", "1e-4", "--ema_halflife_kimg", "0.05", "--ema_rampup_ratio", "none",
        "--num_sample_images", "0", "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0",
        "--checkpointing_kimg", "1000", "--no_progress_bar", "--mixed_precision", "no",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = training_checkpoints(out)
    assert store.read_state(store.latest())["world_size"] == 2  # really two processes (not one, as
    # accelerate launch --cpu would run)
    # The two ranks' samplers split each global batch of the one-process run between them, without overlap.
    from pipelines.data.frame_reader import FrameDataset

    size = len(FrameDataset(frames16))
    one_process = iter(RankBatchSampler(size, batch_layout(8, 1, None), rank=0, seed=0))
    ranks = [iter(RankBatchSampler(size, batch_layout(8, 2, 2), rank=r, seed=0)) for r in range(2)]
    for _ in range(4):
        rank0, rank1 = (next(it) + next(it) for it in ranks)  # 2 accumulation rounds of 2 images each
        assert sorted(rank0 + rank1) == sorted(next(one_process)) and rank0 != rank1
    raw, ema = assert_same_training(out, one_chunk_run)
    # The EMA moved away from the initial weights, and lags the raw weights (issue diffusers#1895).
    torch.manual_seed(0)
    initial = dict(build_components(dp_cfg(frames16, "-"), 16, 1)[0].named_parameters())
    assert any(not torch.allclose(ema[f"ema0/{k}"], initial[k].detach()) for k in initial)
    assert any(not torch.allclose(ema[f"ema0/{k}"], raw[k]) for k in initial)


# ------------------------------------------------------------------------------------------------
# options and invalid arguments


def test_auto_mixed_precision_follows_accelerate_config_then_the_cpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    native = cpu_has_native_bf16()
    assert resolve_mixed_precision("auto", cpu=True) == ("bf16" if native else "no")
    assert resolve_mixed_precision("no", cpu=True) == "no"  # an explicit choice is kept
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` exports from its config
    assert resolve_mixed_precision("auto", cpu=True) == "no"
    assert TrainConfig(dataset="-", output_dir="-").mixed_precision == "auto"


def test_bf16_on_cpu_and_memory_options_train(frames16, tmp_path):
    plain = train(make_cfg(frames16, tmp_path / "plain", steps=2, num_sample_images=0, adam_epsilon=1e-4,
                           channels_last=False))
    reset_accelerate_state()
    options = train(make_cfg(frames16, tmp_path / "opts", steps=2, num_sample_images=0, adam_epsilon=1e-4,
                             channels_last=True, gradient_checkpointing=True))
    np.testing.assert_allclose([h["train/grad_norm"] for h in options.history],
                               [h["train/grad_norm"] for h in plain.history], rtol=1e-4)
    reset_accelerate_state()
    bf16 = train(make_cfg(frames16, tmp_path / "bf16", steps=2, num_sample_images=0,
                          mixed_precision="auto" if cpu_has_native_bf16() else "bf16"))
    saved = json.loads((bf16.last_checkpoint / TRAINING_STATE_FILE).read_text())["config"]
    assert saved["mixed_precision"] == "bf16"  # "auto" is stored resolved, so a resume compares like with like
    bf16_norms = [h["train/grad_norm"] for h in bf16.history]
    # bf16 autocast really ran (the gradient differs from fp32), and stays close to it.
    assert bf16_norms != [h["train/grad_norm"] for h in plain.history]
    np.testing.assert_allclose(bf16_norms, [h["train/grad_norm"] for h in plain.history], rtol=0.1)


def test_accelerate_configs_load_and_launch_sets_the_auto_precision(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {path.stem: load_config_from_file(str(path)) for path in (REPO / "accelerate_configs").glob("*.yaml")}
    assert {"cpu", "single_gpu", "8gpu_a40", "multi_node"} <= set(configs)
    for name, config in configs.items():  # every shipped config asks for bf16; the GPU ones also compile
        assert config.mixed_precision == "bf16", name
        if config.distributed_type in ("NO", "MULTI_GPU") and not config.use_cpu:
            assert config.dynamo_config["dynamo_backend"] == "INDUCTOR", name
    # `accelerate launch` exports the config's precision, and "auto" takes it.
    script = tmp_path / "which_precision.py"
    script.write_text("from pipelines.training import resolve_mixed_precision\n"
                      "print('precision', resolve_mixed_precision('auto', cpu=True))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "accelerate_configs" / "cpu.yaml"), str(script)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "precision bf16" in proc.stdout


def test_compiled_training_tracks_eager_and_checkpoints(frames16, tmp_path):
    # Adam's eps 1e-4: see dp_cfg (float-rounding differences in near-zero gradients stay small).
    common = dict(steps=2, num_sample_images=0, adam_epsilon=1e-4)
    eager = train(make_cfg(frames16, tmp_path / "eager", **common))
    reset_accelerate_state()
    compiled = train(make_cfg(frames16, tmp_path / "compiled", compile=True, **common))
    assert compiled.steps == eager.steps == 2
    np.testing.assert_allclose([h["train/loss"] for h in compiled.history], [h["train/loss"] for h in eager.history],
                               rtol=1e-5)
    # Checkpoints and the exported EMA pipeline hold plain (uncompiled) parameter names and the same values.
    raw_c, ema_c = checkpoint_tensors(compiled.last_checkpoint)
    raw_e, ema_e = checkpoint_tensors(eager.last_checkpoint)
    assert_tensors_equal(raw_c, raw_e, exact=False, atol=1e-5)
    assert_tensors_equal(ema_c, ema_e, exact=False, atol=1e-5)
    exported = load_file(str(compiled.pipeline_dirs[0] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(raw_e)


class FakeHfApi:
    """Records what would be uploaded (huggingface_hub's HfApi calls, offline)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private, exist_ok, repo_type, **kwargs):
        self.calls.append(("create_repo", repo_id, private))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, repo_type, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, files))


def test_push_to_hub_uploads_the_exported_pipeline(frames16, tmp_path):
    api = FakeHfApi()
    result = train(make_cfg(frames16, tmp_path, steps=1, num_sample_images=0, push_to_hub=True,
                            hub_model_id="me/echodiff-tiny", hub_private=True), hub_api=api)
    assert api.calls[0] == ("create_repo", "me/echodiff-tiny", True)
    assert api.calls[1][:2] == ("upload_folder", "me/echodiff-tiny")
    exported = result.pipeline_dirs[0]
    assert exported == tmp_path / "pipeline"
    # Exactly the saved pipeline folder (whatever code files it carries), with its model card.
    assert api.calls[1][2] == sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert {"README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors"} <= set(api.calls[1][2])
    assert "me/echodiff-tiny" in (exported / "README.md").read_text()


def cli(dataset, out, *extra):
    return ["--dataset", dataset, "--output_dir", str(out), "--network_overrides",
            json.dumps(tiny_overrides("ddpmpp")), "--arch", "ddpmpp", "--batch_size", "8", "--duration_kimg", "0.008",
            "--report_to", "none", "--no_progress_bar", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--arch", "unet9000"], r"--arch: expected one of \['adm', 'ddpmpp', 'ncsnpp', 'edm2-xs', .*\], got 'unet9000'"),
    (["--recipe", "edm2"], r"--recipe edm2: expected --arch one of \['edm2-l', "),
    (["--precond", "ddpm"], r"--precond: expected one of"),
    (["--batch_per_gpu", "3"], r"--batch_per_gpu 3 must divide the per-process batch 8"),
    (["--resolution", "32"], r"--resolution 32 does not match the dataset's 16x16 images"),
    (["--mixed_precision", "fp16", "--cpu"], r"--mixed_precision fp16: accelerate's fp16 autocast does nothing"),
    (["--push_to_hub"], r"--push_to_hub needs --hub_model_id"),
    (["--network_overrides", '{"model_chanels": 8}'], r"--network_overrides: .*model_chanels"),
    (["--network_overrides", '{"dropout": 0.2}'], r"--network_overrides: .*dropout.*own flags"),
    (["--network_overrides", '{"in_channels": 3}'], r"--network_overrides: .*pass channels= instead of in_channels"),
    (["--ema_halflife_kimg", "500", "0"], r"--ema_halflife_kimg: expected a value > 0, got 0.0"),
    (["--dropout", "1.0"], r"--dropout: expected a value >= 0 and < 1, got 1.0"),
    (["--checkpoints_total_limit", "0"], r"--checkpoints_total_limit: expected a value >= 1, got 0"),
    (["--batch_size", "0"], r"--batch_size: expected a value > 0, got 0"),
])
def test_invalid_arguments_fail_before_training(frames16, tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train_unconditional.main(cli(frames16, out, *extra))
    assert not out.exists()  # nothing trained, nothing written


def test_missing_dataset_and_bad_checkpoint_fail_clearly(tmp_path, frames16):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--dataset .*nope.*does not exist"):
        train_unconditional.main(cli(str(tmp_path / "nope"), out))
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(ConfigError, match=r"--resume_from_checkpoint .*not_a_checkpoint: not a complete checkpoint"):
        train_unconditional.main(cli(frames16, out, "--resume_from_checkpoint", str(tmp_path / "not_a_checkpoint")))
    assert not out.exists()


def test_cli_prints_one_line_error_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_unconditional.py", *cli(str(tmp_path / "nope"), tmp_path / "o",
                                                                      "--arch", "bad")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "train_unconditional.py"), run_name="__main__")
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: --arch: expected one of")

"""Training-run safety (issue 20a): the shipped accelerate configs launch what they say, short runs warn about
the lr warm-up, resumes say so and refuse what they cannot restore exactly, a new run never overwrites
another, the final export and metrics.jsonl survive a kill. Tiny networks on tiny synthetic frames, CPU only."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import train_unconditional
from pipelines.networks import tiny_config
from pipelines.training import ConfigError, TrainConfig, train
from pipelines.training.checkpoints import TRAINING_STATE_FILE, training_checkpoints
from pipelines.training.config import config_from_cli_args
from pipelines.training.loop import check_launched_world_size, warn_short_warmup
from pipelines.utils import reset_accelerate_state

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """{"frames16": 28 frames of 6 videos, "other16": 2 other videos at 16x16, "frames32": those at 32x32}."""
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet

    root = tmp_path_factory.mktemp("safety")
    write_synthetic_echonet(root / "echo", num_videos=6, seed=0, num_workers=1, num_frames=(20, 24))
    write_synthetic_echonet(root / "echo_b", num_videos=2, seed=1, num_workers=1, num_frames=(20, 24))
    for source, name, resolution in (("echo", "frames16", 16), ("echo_b", "other16", 16), ("echo_b", "frames32", 32)):
        build_frame_dataset(root / source, root / name, resolution=resolution, num_workers=1, progress=False,
                            verbose=False)
    return {name: str(root / name) for name in ("frames16", "other16", "frames32")}


def tiny_overrides():
    overrides = tiny_config("ddpmpp", resolution=16)
    overrides.pop("resolution")
    return overrides


def make_cfg(dataset, out, steps=2, batch=8, **kw):
    base = dict(dataset=dataset, output_dir=str(out), arch="ddpmpp", network_overrides=tiny_overrides(),
                batch_size=batch, duration_kimg=steps * batch / 1000, lr=2e-3, lr_rampup_kimg=0.0,
                ema_halflife_kimg=(0.05,), dropout=0.1, dataloader_num_workers=0, checkpointing_kimg=0.016,
                snapshot_kimg=1000.0, num_sample_images=0, logging_steps=1, report_to="none", progress_bar=False,
                mixed_precision="no")
    base.update(kw)
    return TrainConfig(**base)


def run(cfg, **kw):
    reset_accelerate_state()
    return train(cfg, **kw)


def checkpoint_numbers(out):
    return [n for n, _ in training_checkpoints(out).checkpoints()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# launching


def accelerate_launch_training(config, dataset, out):
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(free_port()), "train_unconditional.py",
            "--dataset", dataset, "--output_dir", str(out), "--arch", "ddpmpp",
            "--network_overrides", json.dumps(tiny_overrides()), "--batch_size", "8", "--duration_kimg", "0.016",
            "--lr_rampup_kimg", "0", "--num_sample_images", "0", "--report_to", "none",
            "--dataloader_num_workers", "0", "--no_progress_bar", "--mixed_precision", "no"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_SIZE"))}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_multi_cpu_config_runs_two_processes_through_accelerate_launch(datasets, tmp_path):
    config = REPO / "accelerate_configs" / "multi_cpu_2proc.yaml"
    proc = accelerate_launch_training(config, datasets["frames16"], tmp_path / "ddp")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    store = training_checkpoints(tmp_path / "ddp")
    assert store.read_state(store.latest())["world_size"] == 2
    assert json.loads((tmp_path / "ddp" / "run_info.json").read_text())["world_size"] == 2  # what the card states
    # The same config without mpirun: accelerate starts one process, which refuses to train alone.
    text = config.read_text()
    without_mpirun = tmp_path / "no_mpirun.yaml"
    without_mpirun.write_text(re.sub(r"mpirun_config:\n  mpirun_hostfile: .*\n", "", text))
    assert "mpirun_hostfile" in text and "mpirun_hostfile" not in without_mpirun.read_text()
    proc = accelerate_launch_training(without_mpirun, datasets["frames16"], tmp_path / "alone")
    assert proc.returncode != 0
    assert "error: accelerate launch: the config asks for several CPU processes but started one" in proc.stderr
    assert not training_checkpoints(tmp_path / "alone").checkpoints()


def test_a_launch_that_started_fewer_processes_than_asked_is_refused(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # launched on the CPU by `accelerate launch` ...
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    check_launched_world_size(1)  # ... with a one-process config: fine
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # ... with a config of several processes
    with pytest.raises(ConfigError, match="asks for several CPU processes but started one.*mpirun"):
        check_launched_world_size(1)
    check_launched_world_size(2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / mpirun said so: the count comes from the launcher
    check_launched_world_size(2)


# ------------------------------------------------------------------------------------------------
# the lr warm-up of short runs


def documented_training_commands():
    """Every ``train_unconditional.py`` command of README.md and docs/training.md (continuations joined)."""
    commands = []
    for doc in ("README.md", "docs/training.md"):
        text = (REPO / doc).read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0]
            if "train_unconditional.py" in line and "--dataset" in line and "..." not in line:
                words = shlex.split(line)
                commands.append((doc, words[words.index("train_unconditional.py") + 1:]))
    return commands


def test_documented_training_commands_warm_up_within_their_duration():
    commands = documented_training_commands()
    assert len(commands) >= 6
    for doc, argv in commands:
        cfg = config_from_cli_args(argv)
        assert cfg.lr_rampup_kimg * 1000 <= cfg.duration_nimg, (doc, argv)


def test_a_run_shorter_than_its_warmup_warns(caplog):
    short = TrainConfig(dataset="-", output_dir="-", batch_size=8, duration_kimg=1.0)  # EDM's 10 Mimg warm-up
    reset_accelerate_state()
    from accelerate import PartialState

    PartialState(cpu=True)
    with caplog.at_level("WARNING"):
        warn_short_warmup(short)
    assert re.search(r"--lr_rampup_kimg 10000 is longer than --duration_kimg 1: the learning rate only reaches "
                     r"1e-07 of --lr 0.001", caplog.text)
    caplog.clear()
    warn_short_warmup(TrainConfig(dataset="-", output_dir="-", duration_kimg=1.0, lr_rampup_kimg=0.1))
    assert caplog.text == ""


# ------------------------------------------------------------------------------------------------
# progress, resume and output_dir


def test_progress_bar_ends_at_the_images_trained_without_clamping(datasets, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(make_cfg(datasets["frames16"], tmp_path, duration_kimg=0.012, progress_bar=True,
                              checkpointing_kimg=1000.0))
    assert result.images_seen == 16  # two whole batches: the first past 12 images
    assert not [w for w in caught if "clamping frac" in str(w.message)]
    assert "0.016/0.016 kimg" in capsys.readouterr().err


def test_resume_says_so_and_metrics_keep_each_step_once(datasets, tmp_path, capsys):
    # Steps 1-3 logged, checkpoints at 16 and 24 images; the one at 24 lost (a kill before it was written).
    run(make_cfg(datasets["frames16"], tmp_path, steps=3))
    shutil.rmtree(training_checkpoints(tmp_path).path(24))
    capsys.readouterr()
    run(make_cfg(datasets["frames16"], tmp_path, steps=4, resume_from_checkpoint="latest"))
    assert "resuming from checkpoint-000000000016 at 0.016 kimg (step 2) of 0.032 kimg" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_new_run_refuses_an_output_dir_holding_another_run(datasets, tmp_path):
    run(make_cfg(datasets["frames16"], tmp_path, steps=4))  # checkpoints at 16 and 32, pipeline/
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"--output_dir .* holds another run \(checkpoints/checkpoint-000000000016, "
                                          r"checkpoints/checkpoint-000000000032, pipeline, run_info.json\); pass "
                                          r"--resume_from_checkpoint latest .* --overwrite"):
        run(make_cfg(datasets["frames16"], tmp_path, steps=2, seed=1))
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}  # untouched
    run(make_cfg(datasets["frames16"], tmp_path, steps=2, seed=1, overwrite=True))
    assert checkpoint_numbers(tmp_path) == [16]  # the old run's later checkpoint is gone: `latest` is this run's
    assert training_checkpoints(tmp_path).read_state(training_checkpoints(tmp_path).latest())["config"]["seed"] == 1


@pytest.fixture
def checkpoint_run(datasets, tmp_path):
    """A finished 2-step run (checkpoint at 16 images) and a function that resumes it with settings changed."""
    run(make_cfg(datasets["frames16"], tmp_path, steps=2))

    def resume(dataset=datasets["frames16"], **kw):
        return run(make_cfg(dataset, tmp_path, **{"steps": 3, "resume_from_checkpoint": "latest", **kw}))

    return training_checkpoints(tmp_path).path(16), resume


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_an_rng_state_that_cannot_be_restored_is_refused_unless_accepted(checkpoint_run, caplog):
    checkpoint, resume = checkpoint_run
    rng = checkpoint / "random_states_0.pkl"
    saved = rng.read_bytes()
    truncate(rng)
    with pytest.raises(ConfigError, match=r"random_states_0.pkl: cannot restore the RNG state .*"
                                          r"--accept_inexact_resume"):
        resume()
    rng.unlink()
    with pytest.raises(ConfigError, match=r"random_states_0.pkl: cannot restore the RNG state"):
        resume()
    with caplog.at_level("WARNING"):
        assert resume(accept_inexact_resume=True).images_seen == 24
    assert "going on with fresh random streams" in caplog.text
    rng.write_bytes(saved)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "ema.safetensors", TRAINING_STATE_FILE])
def test_a_damaged_checkpoint_file_is_a_one_line_error_naming_it(checkpoint_run, name):
    checkpoint, resume = checkpoint_run
    truncate(checkpoint / name)
    with pytest.raises(ConfigError, match=re.escape(str(checkpoint / name))) as info:
        resume()
    assert "\n" not in str(info.value)


def test_resume_onto_other_data_or_a_shorter_duration_is_refused(checkpoint_run, datasets):
    checkpoint, resume = checkpoint_run
    with pytest.raises(ConfigError, match=r"it was trained on resolution 16, the dataset .*frames32 has 32"):
        resume(datasets["frames32"])
    # A checkpoint that does not record its resolution: the network's shapes name the file.
    state_file = checkpoint / TRAINING_STATE_FILE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k not in ("resolution", "dataset_fingerprint")}))
    with pytest.raises(ConfigError, match=r"model.safetensors: does not fit this run's network .*(size mismatch|Missing key)"):
        resume(datasets["frames32"])
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"--dataset .*other16 is not the dataset the checkpoint trained on"):
        resume(datasets["other16"])
    assert resume(datasets["other16"], accept_inexact_resume=True).images_seen == 24
    with pytest.raises(ConfigError, match=r"--duration_kimg 0.008: the checkpoint checkpoint-000000000024 has "
                                          r"already trained 0.024 kimg"):
        resume(datasets["other16"], steps=1)  # (the checkpoint at 24 records the data it continued on)


def test_infinite_duration_is_an_argument_error(datasets, tmp_path, capsys):
    argv = ["--dataset", datasets["frames16"], "--output_dir", str(tmp_path / "o"), "--duration_kimg", "inf"]
    with pytest.raises(SystemExit) as exit_info:  # the flag's own type: argparse's exit code 2
        train_unconditional.main(argv)
    assert exit_info.value.code == 2
    assert "--duration_kimg: expected a finite number, got 'inf'" in capsys.readouterr().err
    from pipelines.training.config import TrainConfig, validate_config

    with pytest.raises(ConfigError, match=r"--duration_kimg: expected a finite number, got inf"):
        validate_config(TrainConfig(dataset=datasets["frames16"], output_dir=str(tmp_path / "o"),
                                    duration_kimg=float("inf")))  # a config built in code, not from flags


def test_a_failed_export_leaves_no_half_written_pipeline(datasets, tmp_path, monkeypatch):
    from pipelines import hub

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing the card")

    monkeypatch.setattr(hub, "write_model_card", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run(make_cfg(datasets["frames16"], tmp_path, steps=2))
    assert not (tmp_path / "pipeline").exists()  # weights without code files or card never look like a pipeline
    monkeypatch.undo()
    result = run(make_cfg(datasets["frames16"], tmp_path, steps=2, resume_from_checkpoint="latest"))
    assert {"README.md", "model_index.json"} <= {p.name for p in result.pipeline_dirs[0].iterdir()}
    assert not list(tmp_path.glob(".tmp-*"))
    card = (result.pipeline_dirs[0] / "README.md").read_text()  # written aside, it still names its final folder
    assert str(result.pipeline_dirs[0]) in card and ".tmp-" not in card

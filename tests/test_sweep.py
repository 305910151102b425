"""The Table 1 sweep at tiny scale: two runs trained and scored, the table, skipping finished runs."""

import json
import math

import pytest

from pipelines.evaluation import sweep
from pipelines.networks import build_network, tiny_config
from pipelines.training import ConfigError

# Each test starts and ends with a fresh accelerate state (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_overrides(arch):
    overrides = tiny_config(arch, resolution=16)
    overrides.pop("resolution")
    return overrides


@pytest.fixture(scope="module")
def frames16(tmp_path_factory):
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet

    root = tmp_path_factory.mktemp("sweepdata")
    write_synthetic_echonet(root / "echo", num_videos=6, seed=0, num_workers=1, num_frames=(20, 24))
    build_frame_dataset(root / "echo", root / "frames16", resolution=16, num_workers=1, progress=False, verbose=False)
    return str(root / "frames16")


def config_dict(dataset, out):
    return {
        "dataset": dataset, "output_dir": str(out),
        "train": {"batch_size": 8, "dropout": 0.0, "lr_rampup_kimg": 0.0, "ema_halflife_kimg": [0.05], "cpu": True,
                  "dataloader_num_workers": 0, "checkpointing_kimg": 0.008, "snapshot_kimg": 1000.0,
                  "num_sample_images": 0, "report_to": "none", "progress_bar": False},
        "evaluation": {"num_generated": 6, "steps": 2, "num_real": None, "split": "train", "batch_size": 16,
                       "gen_batch_size": 6},
        "runs": [
            {"name": "ddpmpp-edm", "arch": "ddpmpp", "precond": "edm", "duration_kimg": 0.016, "paper_fid": 5.67,
             "network_overrides": tiny_overrides("ddpmpp")},
            {"name": "adm-vp", "arch": "adm", "precond": "vp", "duration_kimg": 0.024, "batch_size": 12,
             "network_overrides": tiny_overrides("adm")},
        ],
    }


@pytest.fixture(scope="module")
def swept(frames16, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    path = out / "sweep.json"
    path.write_text(json.dumps(config_dict(frames16, out / "runs")))
    result = sweep.run_sweep(str(path), progress=False)
    return path, out / "runs", result


def parse_markdown_table(text):
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def test_sweep_table_has_the_papers_columns_and_one_row_per_run(swept):
    _, runs_dir, result = swept
    header, rows = parse_markdown_table((runs_dir / "table1.md").read_text())
    assert header[:6] == ["Model", "Sampler", "Batch", "K img", "M Param", "FID"]
    assert [(r["Model"], r["Sampler"], r["Batch"], r["K img"]) for r in rows] == [
        ("DDPM++", "EDM", "8", "0.016"), ("ADM", "VP", "12", "0.024")]
    for row, arch in zip(rows, ["ddpmpp", "adm"]):
        params = sum(p.numel() for p in build_network(arch, resolution=16, **tiny_overrides(arch)).parameters())
        assert float(row["M Param"]) == pytest.approx(params / 1e6, rel=5e-3)
        assert math.isfinite(float(row["FID"])) and float(row["FID"]) > 0
    assert rows[0]["Paper FID"] == "5.67" and rows[1]["Paper FID"] == "-"
    text = (runs_dir / "table1.md").read_text()
    assert "## Sweep configuration" in text and '"duration_kimg": 0.024' in text
    for name in ("ddpmpp-edm", "adm-vp"):
        stored = json.loads((runs_dir / name / "result.json").read_text())
        assert stored["evaluation"]["num_generated"] == 6
        assert (runs_dir / name / "train" / "pipeline" / "model_index.json").is_file()


def test_sweep_rerun_skips_finished_runs(swept, monkeypatch, capsys):
    path, runs_dir, _ = swept
    before = {n: (runs_dir / n / "result.json").stat().st_mtime_ns for n in ("ddpmpp-edm", "adm-vp")}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was trained or scored again")

    monkeypatch.setattr(sweep, "train_run", must_not_run)
    monkeypatch.setattr(sweep, "evaluate_run", must_not_run)
    again = sweep.main(["--config", str(path), "--no_progress_bar"])
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert {n: (runs_dir / n / "result.json").stat().st_mtime_ns for n in before} == before
    assert len(again["results"]) == 2


def test_launcher_runs_train_unconditional_with_each_runs_config(frames16, tmp_path, monkeypatch):
    """With a launcher, a run trains in a subprocess whose flags parse back to exactly the run's TrainConfig."""
    import subprocess

    from train_unconditional import parse_args

    data = {**config_dict(frames16, tmp_path / "runs"), "launcher": "accelerate launch --num_processes 2"}
    config = sweep.parse_sweep_config(data, source="cfg.json")
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, cwd: commands.append(command) or
                        subprocess.CompletedProcess(command, 0))
    for run in config.runs:
        sweep.train_run(config, run, progress=True)
    def as_json(cfg):  # network_overrides' tuples travel as JSON lists
        return json.loads(json.dumps(cfg.to_dict()))

    for command, run in zip(commands, config.runs):
        assert command[:4] == ["accelerate", "launch", "--num_processes", "2"]
        assert command[4].endswith("train_unconditional.py")
        assert as_json(parse_args(command[5:])) == as_json(config.train_config(run))
    assert parse_args(commands[1][5:]).batch_size == 12 and parse_args(commands[1][5:]).arch == "adm"


def test_bad_sweep_configs_name_the_problem(tmp_path, frames16):
    good = config_dict(frames16, tmp_path / "runs")
    cases = [
        ({**good, "runs": [{**good["runs"][0], "batchsize": 8}]}, r"runs\[0\].*batchsize"),
        ({k: v for k, v in good.items() if k != "dataset"}, "dataset"),
        ({**good, "runs": [{**good["runs"][0], "arch": "unet"}]}, "arch"),
        ({**good, "runs": [good["runs"][0], good["runs"][0]]}, "repeated"),
        ({**good, "train": {**good["train"], "output_dir": "x"}}, "set by the sweep"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            sweep.parse_sweep_config(data, source="cfg.json")
    with pytest.raises(ConfigError, match="no such file"):
        sweep.load_sweep_config(tmp_path / "missing.yaml")


def test_shipped_configs_parse():
    for path in ("configs/sweep_table1.yaml", "configs/sweep_demo.yaml"):
        config = sweep.load_sweep_config(path)
        assert [r.name for r in config.runs][:7] == ["adm-edm", "ddpmpp-edm", "ncsnpp-edm", "adm-vp", "adm-ve",
                                                     "ddpmpp-vp", "ncsnpp-ve"]
    paper = sweep.load_sweep_config("configs/sweep_table1.yaml")
    assert [paper.train_config(r).duration_nimg for r in paper.runs][:3] == [30_106_000, 60_211_000, 60_211_000]
    assert all(paper.train_config(r).batch_size == 512 for r in paper.runs[:7])
    edm2 = {r.name: paper.train_config(r) for r in paper.runs[7:]}
    assert sorted(edm2) == ["edm2-s", "edm2-xs"]
    for cfg in edm2.values():  # the recipe fills what the shared train: section does not set
        assert (cfg.recipe, cfg.batch_size, cfg.adam_beta2, cfg.p_mean, cfg.p_std, cfg.phema) == \
            ("edm2", 2048, 0.99, -0.8, 1.6, True)
    assert (edm2["edm2-s"].lr, edm2["edm2-xs"].lr) == (0.010, 0.012)

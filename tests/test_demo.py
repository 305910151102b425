"""The Quick-start demo at tiny scale: every output exists and is valid, and a rerun reuses the stages."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from pipelines.demo import DemoConfig, loss_history, run_demo, tiny_demo_config

# Each test starts and ends with a fresh accelerate state (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    metrics = run_demo(tiny_demo_config(str(out), progress=False))
    return out, metrics


def test_demo_outputs_are_valid(demo):
    out, metrics = demo
    cfg = tiny_demo_config(str(out))
    # The grid: 8 images of 16x16 in one row, 2-px padding around each.
    with Image.open(out / "samples_grid.png") as grid:
        assert grid.mode == "L" and grid.size == (8 * 18 + 2, 18 + 2)
    with Image.open(out / "loss_curve.png") as curve:
        assert curve.size[0] > 100 and curve.size[1] > 100
    stored = json.loads((out / "metrics.json").read_text())
    for model in ("trained", "untrained"):
        for key in ("fid", "kid"):
            assert math.isfinite(stored[model][key]), (model, key)
        assert stored[model]["fid"] > 0
        assert stored[model]["num_generated"] == cfg.num_generated
    from pipelines.data.frame_reader import FrameDataset

    num_train = len(FrameDataset(out / "data" / "frames_16", split="train"))
    assert stored["trained"]["num_real"] == num_train
    for split in ("patient_level", "frame_level"):
        assert math.isfinite(stored["optimal_fid"][split]["fid"])
        assert stored["optimal_fid"][split]["num_a"] + stored["optimal_fid"][split]["num_b"] == num_train
    # The training log behind the loss curve holds every logged step of the run.
    steps = [r["step"] for r in loss_history(out / "train")]
    assert steps[-1] == round(cfg.duration_kimg * 1000 / cfg.batch_size)
    assert stored["training"]["images_seen"] == round(cfg.duration_kimg * 1000)


def test_demo_pipeline_folder_loads_and_card_has_metrics(demo):
    out, metrics = demo
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline

    pipe = EchoDiffPipeline.from_pretrained(str(out / "pipeline"), trust_remote_code=True)
    images = pipe(seeds=[0, 1], num_inference_steps=2, output_type="pt").images
    assert tuple(images.shape) == (2, 1, 16, 16)
    card = (out / "pipeline" / "README.md").read_text()
    assert f"{metrics['trained']['fid']:.3f}".rstrip("0") in card
    assert "## Training configuration" in card and "model-index" in card


def test_demo_rerun_reuses_finished_stages(demo):
    out, metrics = demo
    shards_before = {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("trained-*/shard-*.npz")}
    assert shards_before
    # Progress bars on this time: a presentation setting must not invalidate the finished model.
    again = run_demo(tiny_demo_config(str(out), progress=True))
    status = {row["stage"].split(" (")[0]: row["status"] for row in again["timings"]}
    assert status["data: synthetic videos + frame dataset"] == "reused"
    assert status["training"] == "reused"
    assert status["sampling trained model"] == "reused" and status["sampling untrained model"] == "reused"
    assert again["trained"]["fid"] == metrics["trained"]["fid"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("trained-*/shard-*.npz")} == shards_before
    assert (out / "train" / "checkpoints").is_dir()


def test_demo_autoguidance_stage_trains_a_smaller_shorter_guide_and_scores_it_on_the_demo_protocol(demo):
    out, metrics = demo
    from pipelines.evaluation.generation import load_images
    from pipelines.hub import load_pipeline

    cfg = tiny_demo_config(str(out), autoguidance=True, progress=False)
    guided = run_demo(cfg)
    rows = guided["autoguidance"]
    assert cfg.ag_weights == (1.5, 2.0)
    assert [(r["guidance"], r["ag_weight"]) for r in rows] == [("unguided", 1), ("ag", 1.5), ("ag", 2)]
    assert all(math.isfinite(r["fid"]) and r["num_generated"] == cfg.num_generated for r in rows)
    assert rows[1]["network_evaluations_per_batch"] == {"unet": 2 * cfg.sampler_steps - 1,
                                                        "guide_unet": 2 * cfg.sampler_steps - 1}
    # the sweep's unguided row is the demo's own trained samples: one protocol
    np.testing.assert_array_equal(load_images(rows[0]["samples_dir"]), load_images(metrics["paths"]["samples"]["trained"]))
    assert rows[0]["fid"] == pytest.approx(metrics["trained"]["fid"], abs=1e-9)
    guide = load_pipeline(out / "guide" / "pipeline")
    assert guide.unet.config.model_channels == cfg.guide_network_overrides["model_channels"]
    assert json.loads((out / "guide" / "demo_training_done.json").read_text())["images_seen"] == \
        round(cfg.duration_kimg * cfg.guide_fraction * 1000)
    assert (out / "autoguidance" / "guidance_sweep.png").is_file()


def test_loss_history_keeps_the_last_entry_of_a_relogged_step(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    rows = [{"step": 5, "train/loss": 1.0, "progress/kimg": 0.1}, {"step": 10, "train/loss": 0.9, "progress/kimg": 0.2},
            {"step": 10, "train/loss": 0.8, "progress/kimg": 0.2}, {"step": 15, "train/loss": 0.7, "progress/kimg": 0.3}]
    (logs / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    history = loss_history(tmp_path)
    assert [r["step"] for r in history] == [5, 10, 15]
    assert np.allclose([r["train/loss"] for r in history], [1.0, 0.8, 0.7])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        loss_history(tmp_path / "nowhere")


@pytest.mark.parametrize("field,value", [("num_generated", 1), ("duration_kimg", 0), ("mixed_precision", "fp16")])
def test_demo_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DemoConfig(**{field: value})

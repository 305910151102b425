"""evaluate.py subcommands end to end on a tiny synthetic EchoNet frame dataset and a tiny pipeline."""

import csv
import json

import numpy as np
import pytest
import torch

import evaluate
from pipelines.data.frame_reader import load_frames
from pipelines.errors import UserInputError
from pipelines.evaluation.feature_cache import FingerprintMismatchError
from pipelines.evaluation.fid import InceptionDetector, compute_features, feature_statistics, frechet_distance
from pipelines.evaluation.generation import load_images
from pipelines.evaluation.protocol import frame_level_halves, patient_level_halves
from pipelines.evaluation.reference import real_subsample_indices


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline
    from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet
    from pipelines.networks import build_network, tiny_config

    root = tmp_path_factory.mktemp("evaluate")
    echonet = write_synthetic_echonet(root / "echonet", num_videos=8, seed=0, num_frames=(12, 14), num_workers=1)
    build_frame_dataset(echonet, root / "frames", resolution=16, frame_stride=4, num_workers=1, progress=False,
                        verbose=False)
    torch.manual_seed(0)
    pipe = EchoDiffPipeline(unet=build_network("ddpmpp", **tiny_config("ddpmpp")), scheduler=EDMHeunScheduler())
    pipe.save_pretrained(root / "model")
    return {"root": root, "frames": str(root / "frames"), "model": str(root / "model"), "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def detector():
    return InceptionDetector()


def _args(ws, *extra):
    return [*extra, "--dataset", ws["frames"], "--cache_dir", ws["cache"], "--no_progress_bar"]


def test_fid_of_real_frames_against_themselves_is_zero(workspace, tmp_path):
    train = load_frames(workspace["frames"], "train")
    np.savez(tmp_path / "real.npz", images=train.images_uint8())
    with pytest.warns(UserWarning, match="exceeds the dataset"):
        result = evaluate.main(_args(workspace, "fid", "--images", str(tmp_path / "real.npz"), "--num_real", "1000",
                                     "--output_dir", str(tmp_path / "out")))
    assert result["num_real"] == result["num_generated"] == len(train) == 25
    assert abs(result["fid"]) < 1e-3 and np.isfinite(result["kid"])
    saved = json.loads((tmp_path / "out" / "fid.json").read_text())
    assert saved["fid"] == result["fid"] and saved["reference"]["split"] == "train"


def test_fid_of_pipeline_matches_direct_computation_and_resumes(workspace, detector, tmp_path):
    out = workspace["root"] / "runs"
    argv = _args(workspace, "fid", "--model", workspace["model"], "--seeds", "0-7", "--steps", "2",
                 "--num_real", "20", "--subsample_seed", "3", "--gen_batch_size", "3", "--output_dir", str(out))
    result = evaluate.main(argv)
    samples = out / "samples-steps2"
    generated = load_images(samples)
    assert generated.shape == (8, 1, 16, 16) and result["nfe"] == 3 and result["seeds"] == "0-7"

    train = load_frames(workspace["frames"], "train")
    real = train.images_uint8(real_subsample_indices(len(train), 20, seed=3))
    expected = frechet_distance(*feature_statistics(compute_features(generated, detector)),
                                *feature_statistics(compute_features(real, detector)))
    assert result["fid"] == pytest.approx(expected, rel=1e-4) and result["fid"] > 1

    stamps = {p.name: p.stat().st_mtime_ns for p in samples.glob("shard-*.npz")}
    again = evaluate.main(argv)  # everything finished: nothing is regenerated
    assert {p.name: p.stat().st_mtime_ns for p in samples.glob("shard-*.npz")} == stamps
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-12)

    ref = str(tmp_path / "ref.npz")
    evaluate.main(_args(workspace, "fid", "--images", str(samples), "--num_real", "20", "--ref_stats", ref,
                        "--no_kid", "--output_dir", str(tmp_path)))
    with pytest.raises(FingerprintMismatchError, match="subsample_seed"):
        evaluate.main(_args(workspace, "fid", "--images", str(samples), "--num_real", "20", "--ref_stats", ref,
                            "--subsample_seed", "1", "--output_dir", str(tmp_path)))


def test_optimal_fid_halves(workspace, tmp_path):
    result = evaluate.main(_args(workspace, "optimal-fid", "--split", "all", "--output_dir", str(tmp_path)))
    assert result["num_frames"] == 32 and result["num_videos"] == 8
    for name in ("patient_level", "frame_level"):
        assert result[name]["num_a"] + result[name]["num_b"] == 32 and result[name]["fid"] > 0
    assert result["patient_level"]["videos_a"] + result["patient_level"]["videos_b"] == 8
    assert (tmp_path / "optimal_fid.json").exists()

    capped = evaluate.main(_args(workspace, "optimal-fid", "--split", "all", "--max_per_half", "6",
                                 "--output_dir", str(tmp_path / "capped")))
    for name in ("patient_level", "frame_level"):
        assert capped[name]["num_a"] == capped[name]["num_b"] == 6
        assert capped[name]["fid"] != result[name]["fid"]
    assert capped["patient_level"]["videos_a"] <= result["patient_level"]["videos_a"]


def test_patient_level_halves_keep_videos_together():
    video_ids = np.repeat([f"v{i}" for i in range(9)], [5, 3, 4, 6, 2, 5, 4, 3, 4])
    a, b = patient_level_halves(video_ids, seed=0)
    assert not set(video_ids[a]) & set(video_ids[b])
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(len(video_ids)))
    assert abs(len(a) - len(b)) <= 6
    assert not np.array_equal(a, patient_level_halves(video_ids, seed=1)[0])
    fa, fb = frame_level_halves(11, seed=0)
    assert len(fa) == len(fb) == 5 and not set(fa) & set(fb)
    with pytest.raises(ValueError, match="at least 2 videos"):
        patient_level_halves(["x", "x"], seed=0)


def test_fid_vs_nfe_writes_csv_and_plot(workspace):
    out = workspace["root"] / "runs"
    result = evaluate.main(_args(workspace, "fid-vs-nfe", "--model", workspace["model"], "--steps", "3,2",
                                 "--seeds", "0-7", "--num_real", "20", "--no_kid", "--output_dir", str(out)))
    assert [r["nfe"] for r in result["rows"]] == [5, 3]
    with open(out / "fid_vs_nfe.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["steps"]) for r in rows] == [3, 2] and all(float(r["fid"]) > 0 for r in rows)
    assert (out / "fid_vs_nfe.png").stat().st_size > 1000
    assert len(load_images(out / "samples-steps3")) == 8


def test_guidance_sweep_scores_every_setting_on_one_protocol(workspace):
    from pipelines.components.discriminator import EchoDiffDiscriminator
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline
    from pipelines.hub import load_pipeline
    from pipelines.networks import build_network, tiny_config

    root = workspace["root"]
    model = load_pipeline(workspace["model"])
    torch.manual_seed(1)
    guide_unet = build_network("ddpmpp", **{**tiny_config("ddpmpp"), "model_channels": 4})
    with torch.no_grad():  # a fresh EDM network outputs F = 0, as does the model: make the guide differ
        for parameter in guide_unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    EchoDiffPipeline(unet=guide_unet, scheduler=model.scheduler).save_pretrained(root / "guide")
    disc = EchoDiffDiscriminator(sample_size=16, in_channels=1, model_channels=16, channel_mult=(1, 2),
                                 num_res_blocks=1, attention_resolutions=(8,), head_channels=8)
    EchoDiffPipeline(unet=model.unet, scheduler=model.scheduler, discriminator=disc).save_pretrained(root / "with_dg")
    out = root / "guidance"
    argv = _args(workspace, "guidance-sweep", "--model", str(root / "with_dg"), "--guide", str(root / "guide"),
                 "--steps", "3", "--seeds", "0-5", "--num_real", "20", "--ag_weights", "1,2", "--dg_weights", "3",
                 "--intervals", "0:inf,0.5:10", "--composed", "2:3", "--output_dir", str(out))
    rows = evaluate.main(argv)["rows"]
    labels = [(r["guidance"], r["ag_weight"], r["dg_weight"], r["interval"]) for r in rows]
    assert labels == [("unguided", 1, 0, "[0, inf]"), ("ag", 2, 0, "[0, inf]"), ("dg", 1, 3, "[0, inf]"),
                      ("ag", 2, 0, "[0.5, 10]"), ("dg", 1, 3, "[0.5, 10]"), ("ag+dg", 2, 3, "[0, inf]")]
    assert len({r["fid"] for r in rows}) == len(rows)  # every guidance changed the samples
    assert {r["num_generated"] for r in rows} == {6} and {r["nfe"] for r in rows} == {5}
    assert all(r["seconds_per_image"] > 0 for r in rows)
    costs = [r["network_evaluations_per_batch"] for r in rows]
    assert costs[0] == {"unet": 5} and costs[1] == {"unet": 5, "guide_unet": 5}
    assert costs[5] == {"unet": 5, "guide_unet": 5, "discriminator": 3}  # DG first order: the 3 Euler evaluations
    assert 0 < costs[3]["guide_unet"] < 5  # the interval skips the guide outside [0.5, 10]
    # the unguided row is exactly the plain pipeline's images
    plain = evaluate.main(_args(workspace, "fid", "--model", workspace["model"], "--seeds", "0-5", "--steps", "3",
                                "--num_real", "20", "--no_kid", "--output_dir", str(root / "plain")))
    np.testing.assert_array_equal(load_images(out / "samples" / "unguided"), load_images(plain["samples_dir"]))
    assert rows[0]["fid"] == pytest.approx(plain["fid"], abs=1e-9)
    table = (out / "guidance_sweep.md").read_text()
    assert table.count("\n| ") == len(rows) and "6 generated images per row" in table
    assert (out / "guidance_sweep.png").stat().st_size > 1000
    again = evaluate.main(argv)["rows"]  # resumes from the shards: the same scores
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]


def test_fid_vs_nfe_across_samplers_plots_one_line_each_and_tables_the_nfe_to_match_heun(workspace):
    out = workspace["root"] / "samplers"
    result = evaluate.main(_args(workspace, "fid-vs-nfe", "--model", workspace["model"], "--steps", "30,2",
                                 "--samplers", "heun,dpmpp2m", "--seeds", "0-7", "--num_real", "20",
                                 "--precision", "fp32", "--output_dir", str(out)))
    rows = result["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("heun", 59), ("heun", 3), ("dpmpp2m", 30), ("dpmpp2m", 2)]
    assert all(r["kid"] is not None for r in rows) and result["precision"] == "fp32"
    assert len(load_images(out / "samples-dpmpp2m-steps2")) == 8
    table = (out / "fid_vs_nfe.md").read_text()
    heun_59 = rows[0]["fid"]
    assert f"Heun's FID at 59 NFE: {heun_59:.3f}" in table and "| dpmpp2m |" in table
    heun_line = next(line for line in table.splitlines() if line.startswith("| heun |"))
    assert heun_line.split("|")[2].strip() in ("3", "59")  # Heun matches itself at 59 NFE at the latest
    with pytest.raises(ValueError, match="unknown sampler"):
        evaluate.main(_args(workspace, "fid-vs-nfe", "--model", workspace["model"], "--samplers", "ddim",
                            "--seeds", "0-1", "--output_dir", str(out)))


def test_nfe_to_match_heun_picks_the_lowest_nfe_within_5_percent():
    from pipelines.evaluation.protocol import nfe_to_match_heun

    rows = [{"sampler": "heun", "nfe": 59, "fid": 10.0}, {"sampler": "heun", "nfe": 35, "fid": 10.4},
            {"sampler": "heun", "nfe": 17, "fid": 12.0}, {"sampler": "unipc", "nfe": 8, "fid": 10.6},
            {"sampler": "unipc", "nfe": 12, "fid": 10.49}, {"sampler": "unipc", "nfe": 20, "fid": 9.0},
            {"sampler": "euler", "nfe": 30, "fid": 11.0}]
    assert nfe_to_match_heun(rows) == (10.0, {"heun": 35, "unipc": 12, "euler": None})
    assert nfe_to_match_heun(rows[2:]) == (None, {"heun": None, "unipc": None, "euler": None})


def test_variance_study(workspace):
    out = workspace["root"] / "runs"
    result = evaluate.main(_args(workspace, "variance", "--model", workspace["model"], "--steps", "2", "--repeats", "2",
                                 "--num_gen", "6", "--num_real", "20", "--output_dir", str(out)))
    a, b = result["generated_fixed_real_varied"], result["real_fixed_generation_varied"]
    assert len(a["values"]) == len(b["values"]) == 2
    assert a["values"][0] != a["values"][1] and b["values"][0] != b["values"][1]
    assert a["std"] == pytest.approx(np.std(a["values"], ddof=1))
    assert len(load_images(out / "samples-steps2")) == 12  # seeds 0-11 (0-7 reused if earlier tests made them)
    assert json.loads((out / "variance.json").read_text())["repeats"] == 2


def test_cli_errors(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["sweep"])
    assert "--config" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="--model"):
        evaluate.main(_args(workspace, "fid", "--output_dir", str(tmp_path)))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(_args(workspace, "fid", "--model", workspace["model"], "--sampler_kwargs", "[1]",
                            "--output_dir", str(tmp_path)))
    assert exit_info.value.code == 2 and "--sampler_kwargs: expected a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(_args(workspace, "fid-vs-nfe", "--model", workspace["model"], "--steps", "5,x"))
    assert "--steps: expected a comma list of integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(_args(workspace, "guidance-sweep", "--model", workspace["model"], "--composed", "2:1,3"))
    assert "--composed: expected weight pairs A:B" in capsys.readouterr().err
    with pytest.raises(ValueError, match="neither a saved pipeline folder"):
        evaluate.main(_args(workspace, "fid", "--model", str(tmp_path / "nothing"), "--output_dir", str(tmp_path)))

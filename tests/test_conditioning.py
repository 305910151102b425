"""Conditional generation: named conditions through the pipeline in closed form (exact Gaussian denoisers whose
mean depends on the label), classifier-free guidance's mean, composition with autoguidance and DG, label dropout in
training, save / load / remote-code load of the condition spec, named errors, the conditioning study."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from pipelines.components.conditioning import ConditionError, check_spec, decode, encode, label_dim
from pipelines.components.pipeline_echodiff import EchoDiffPipeline
from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
from pipelines.training.data_order import label_keep_mask
from tests.exact_gaussian import RES, SD, ExactGaussianNet, ExactLogRatio, S

STEPS = 30
EF_RANGE = (20.0, 80.0)
SPEC = {"label_dropout": 0.1, "conditions": [
    {"name": "ef", "kind": "scalar", "column": "EF", "range": list(EF_RANGE)},
    {"name": "phase", "kind": "categorical", "column": "phase", "classes": ["ED", "ES", "other"]}]}
PHASES = SPEC["conditions"][1]["classes"]
DIM = RES * RES


def gaussian_parameters(seed=3):
    """Data N(base + e v + P[phase], S^2 I) for a labelled row (e: EF scaled to [-1, 1]); N(null, S^2 I) for the
    null label."""
    g = torch.Generator().manual_seed(seed)
    base, v = 0.2 * torch.randn(DIM, generator=g), 0.3 * torch.randn(DIM, generator=g)
    phase_means, null = 0.3 * torch.randn(3, DIM, generator=g), 0.1 * torch.randn(DIM, generator=g)
    return {"base": base.double(), "v": v.double(), "phase_means": phase_means.double(), "null": null.double()}


def conditional_mean(params, ef, phase):
    """The data mean of a label, from the documented encoding (EF mapped linearly from its range to [-1, 1])."""
    e = 2 * (ef - EF_RANGE[0]) / (EF_RANGE[1] - EF_RANGE[0]) - 1
    return params["base"] + e * params["v"] + params["phase_means"][PHASES.index(phase)]


class ExactConditionalGaussianNet(ModelMixin, ConfigMixin):
    """F whose EDM-preconditioned denoiser is exact for the label's Gaussian (see gaussian_parameters); it reads
    the label vector [labelled, e, one-hot(phase)] itself."""

    @register_to_config
    def __init__(self, base=(0.0,) * DIM, v=(0.0,) * DIM, phase_means=((0.0,) * DIM,) * 3, null=(0.0,) * DIM,
                 sample_size=RES, in_channels=1, label_dim=5):
        super().__init__()
        for name, value in (("base", base), ("v", v), ("phase_means", phase_means), ("null", null)):
            self.register_buffer(name + "_", torch.tensor(value, dtype=torch.float64))
        self.unused = torch.nn.Parameter(torch.zeros(()))
        self.labels_seen = []

    def forward(self, x_in, c_noise, class_labels=None, return_dict=True):
        labels = class_labels.double()
        self.labels_seen.append(labels.clone())
        flag, e, onehot = labels[:, :1], labels[:, 1:2], labels[:, 2:5]
        mean = flag * (self.base_ + e * self.v_ + onehot @ self.phase_means_) + (1 - flag) * self.null_
        mean = mean.reshape(-1, 1, RES, RES)
        sigma = torch.exp(4 * c_noise.double()).reshape(-1, 1, 1, 1)
        x = x_in.double() * torch.sqrt(sigma**2 + SD**2)
        denoised = mean + S**2 / (S**2 + sigma**2) * (x - mean)
        c_skip, c_out = SD**2 / (sigma**2 + SD**2), sigma * SD / torch.sqrt(sigma**2 + SD**2)
        return ((denoised - c_skip * x) / c_out).float(),


def conditional_net(params):
    return ExactConditionalGaussianNet(**{k: (tuple(map(tuple, v.tolist())) if v.ndim == 2 else tuple(v.tolist()))
                                          for k, v in params.items()})


def pipe_of(unet, conditions=SPEC, **kwargs):
    pipe = EchoDiffPipeline(unet=unet, scheduler=EDMHeunScheduler(), conditions=conditions, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def exact(mean):
    return pipe_of(ExactGaussianNet(mean=tuple(mean.tolist())), conditions=None)


def latent(pipe, seeds, steps=STEPS, **kwargs):
    return pipe(seeds=seeds, num_inference_steps=steps, output_type="latent", **kwargs).images.double()


def assert_samples_of(samples, target, seeds, guided_away_from=None):
    """Path-wise equal to the exact sampler of N(target, S^2) and its mean within sampling error."""
    same_paths = latent(exact(target), seeds)
    assert (samples - same_paths).abs().max().item() < 1e-4
    stderr = S / math.sqrt(len(seeds))
    flat = samples.reshape(len(seeds), -1)
    assert (flat.mean(0) - target).abs().max().item() < 4.5 * stderr
    if guided_away_from is not None:
        assert (flat.mean(0) - guided_away_from).abs().mean().item() > 5 * stderr


SEEDS = list(range(800))


@pytest.mark.parametrize("ef,phase", [(30.0, "ED"), (75.0, "ES"), (50.0, "other")])
def test_named_conditions_sample_the_labels_gaussian(ef, phase):
    params = gaussian_parameters()
    samples = latent(pipe_of(conditional_net(params)), SEEDS, ef=ef, phase=phase)
    assert_samples_of(samples, conditional_mean(params, ef, phase), SEEDS, guided_away_from=params["null"])


def test_no_condition_is_the_null_label_and_per_image_values_apply_per_image():
    params = gaussian_parameters()
    pipe = pipe_of(conditional_net(params))
    assert_samples_of(latent(pipe, SEEDS), params["null"], SEEDS)
    efs, phases = [25.0, 40.0, 60.0, 80.0], ["ED", "ES", "other", "ES"]
    per_image = latent(pipe, [0, 1, 2, 3], ef=efs, phase=phases)
    for i, (ef, phase) in enumerate(zip(efs, phases)):
        alone = latent(exact(conditional_mean(params, ef, phase)), [i])
        assert (per_image[i] - alone[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("scale", [0.0, 2.0, 3.5])
def test_classifier_free_guidance_samples_the_formulas_mean(scale):
    """D_u + s (D_c - D_u) of exact denoisers with equal covariances is the exact denoiser of
    N(mu_u + s (mu_c - mu_u), S^2)."""
    params = gaussian_parameters()
    pipe = pipe_of(conditional_net(params))
    samples = latent(pipe, SEEDS, ef=65.0, phase="ES", guidance_scale=scale)
    mu_c = conditional_mean(params, 65.0, "ES")
    assert_samples_of(samples, params["null"] + scale * (mu_c - params["null"]), SEEDS, guided_away_from=mu_c)
    nfe = 2 * STEPS - 1
    assert pipe.network_evaluations == {"unet": nfe, "unet_unconditional": nfe}


def test_scale_one_is_the_conditional_model_bit_for_bit_and_never_runs_the_null_label():
    params = gaussian_parameters()
    pipe = pipe_of(conditional_net(params))
    plain = latent(pipe, [0, 1, 2], steps=6, ef=40.0, phase="ED")
    pipe.unet.labels_seen.clear()
    assert torch.equal(latent(pipe, [0, 1, 2], steps=6, ef=40.0, phase="ED", guidance_scale=1.0), plain)
    assert pipe.network_evaluations == {"unet": 11}
    assert all(bool((labels[:, 0] == 1).all()) for labels in pipe.unet.labels_seen)


def test_cfg_composes_with_autoguidance_and_dg_in_closed_form():
    """CFG (s) inside autoguidance (w, the guide conditioned on the same label): N(m) with
    m = mu_g + w (mu_u + s (mu_c - mu_u) - mu_g); DG with the exact log ratio of N(mu_r) against N(m) then
    samples N(mu_r)."""
    params, guide_params = gaussian_parameters(), gaussian_parameters(seed=4)
    scale, weight = 2.0, 1.5
    pipe = pipe_of(conditional_net(params), guide_unet=conditional_net(guide_params))
    mu_c, mu_g = conditional_mean(params, 35.0, "ED"), conditional_mean(guide_params, 35.0, "ED")
    m = mu_g + weight * (params["null"] + scale * (mu_c - params["null"]) - mu_g)
    seeds = SEEDS[:400]
    both = latent(pipe, seeds, ef=35.0, phase="ED", guidance_scale=scale, ag_weight=weight)
    assert_samples_of(both, m, seeds)
    mu_r = m + 0.1 * torch.randn(DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    all_three = latent(pipe, seeds, ef=35.0, phase="ED", guidance_scale=scale, ag_weight=weight,
                       discriminator=ExactLogRatio(mu_r, m), dg_weight_first_order=1.0, dg_weight_second_order=1.0,
                       dg_sigma_min=0.0)
    assert (all_three - latent(exact(mu_r), seeds)).abs().max().item() < 1e-4
    nfe = 2 * STEPS - 1
    assert pipe.network_evaluations == {"unet": nfe, "unet_unconditional": nfe, "guide_unet": nfe,
                                        "discriminator": nfe}


def test_cfg_interval_gates_the_null_label():
    params = gaussian_parameters()
    pipe = pipe_of(conditional_net(params))
    latent(pipe, [0], steps=5, ef=50.0, phase="ES", guidance_scale=2.0, cfg_sigma_max=10.0)
    schedule = EDMHeunScheduler()
    schedule.set_timesteps(5)
    assert pipe.network_evaluations == {"unet": 9, "unet_unconditional": int((schedule.timesteps <= 10.0).sum())}


def test_encoding_round_trips_and_bad_conditions_are_named():
    spec = check_spec(SPEC)
    labels = encode(spec, {"ef": [20.0, 80.0, 50.0], "phase": ["ED", "other", "ES"]}, 3)
    assert labels.shape == (3, label_dim(spec)) == (3, 5)
    assert labels[:, 0].tolist() == [1, 1, 1] and labels[:, 1].tolist() == [-1, 1, 0]
    assert decode(spec, labels) == {"ef": [20.0, 80.0, 50.0], "phase": ["ED", "other", "ES"]}
    pipe = pipe_of(conditional_net(gaussian_parameters()))
    call = dict(seeds=[0, 1], num_inference_steps=2, output_type="latent")
    for kwargs, message in [
        (dict(ef=85.0, phase="ES"), r"ef=85 is outside the range the model was trained on \[20, 80\]"),
        (dict(ef="high", phase="ES"), r"ef='high': expected a number"),
        (dict(ef=50.0, phase="mid"), r"phase='mid': expected one of \['ED', 'ES', 'other'\]"),
        (dict(ef=50.0), r"missing condition\(s\) \['phase'\]"),
        (dict(ef=[50.0, 60.0, 70.0], phase="ES"), r"ef= gives 3 values for 2 images"),
        (dict(guidance_scale=2.0), r"guidance_scale=2.0 guides towards the named conditions"),
        (dict(ef=50.0, phase="ES", guidance_scale=math.nan), r"guidance_scale must be a finite number"),
        (dict(ef=50.0, phase="ES", guidance_scale="x"), r"guidance_scale must be a finite number, got 'x'"),
        (dict(ef=50.0, phase="ES", class_labels=torch.ones(2, 5)), r"either class_labels or named conditions"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            pipe(**call, **kwargs)
        assert getattr(error.value, "user_input", False), kwargs  # a script's run_cli: one error line, exit 2
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['view'\].*named conditions are \['ef', 'phase'\]") as error:
        pipe(**call, view="A4C")
    assert error.value.user_input
    unconditional = exact(torch.zeros(DIM))
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['ef'\].*no named conditions"):
        unconditional(**call, ef=50.0)
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs a conditional pipeline"):
        unconditional(**call, guidance_scale=3.0)
    with pytest.raises(ConditionError, match="need label_dim=5, the unet has label_dim=4"):
        pipe_of(ExactConditionalGaussianNet(label_dim=4))
    for bad, message in [({"conditions": []}, "non-empty 'conditions'"),
                         ({"conditions": [{"name": "ef", "kind": "scalar", "range": [5, 5]}]}, "low < high"),
                         ({"conditions": [{"name": "view", "kind": "ordinal"}]}, "kind must be one of"),
                         ({"label_dropout": 1.0, "conditions": SPEC["conditions"]}, r"label_dropout must be in \[0, 1\)")]:
        with pytest.raises(ConditionError, match=message):
            check_spec(bad)


def test_label_dropout_mask_is_per_image_seeded_and_has_the_asked_rate():
    positions = range(4000)
    mask = label_keep_mask(positions, seed=7, probability=0.2)
    dropped = 1 - mask.mean().item()
    assert abs(dropped - 0.2) < 4.5 * math.sqrt(0.2 * 0.8 / 4000)
    halves = torch.cat([label_keep_mask(range(0, 2000), 7, 0.2), label_keep_mask(range(2000, 4000), 7, 0.2)])
    assert torch.equal(halves, mask)  # the same image drops its label in any split
    assert not torch.equal(label_keep_mask(positions, 8, 0.2), mask)
    assert label_keep_mask(positions, 7, 0.0).min().item() == 1.0


# ------------------------------------------------------------------------------------------------
# training with --condition, the exported pipeline, remote code


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A 16x16 frame dataset and a tiny conditional (ef, phase) run on it whose network records its labels."""
    import pipelines.networks as networks
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet
    from pipelines.training import TrainConfig, train
    from pipelines.utils import reset_accelerate_state

    root = tmp_path_factory.mktemp("conditional")
    write_synthetic_echonet(root / "echo", num_videos=8, seed=1, num_workers=1, num_frames=(20, 26))
    build_frame_dataset(root / "echo", root / "frames", resolution=16, num_workers=1, progress=False, verbose=False)
    overrides = networks.tiny_config("ddpmpp", resolution=16)
    overrides.pop("resolution")
    cfg = TrainConfig(dataset=str(root / "frames"), output_dir=str(root / "run"), arch="ddpmpp",
                      network_overrides=overrides, batch_size=8, duration_kimg=0.064, lr=2e-3, lr_rampup_kimg=0.0,
                      ema_halflife_kimg=(0.05,), dropout=0.0, dataloader_num_workers=0, checkpointing_kimg=1000.0,
                      snapshot_kimg=1000.0, num_sample_images=2, sample_steps=2, logging_steps=1, report_to="none",
                      progress_bar=False, mixed_precision="no", condition="ef,phase", label_dropout=0.5)
    seen = []
    original = networks.build_network

    def recording_build_network(*args, **kwargs):
        net = original(*args, **kwargs)
        net.register_forward_pre_hook(lambda module, a, kw: seen.append(kw["class_labels"].clone())
                                      if module.training else None, with_kwargs=True)
        return net

    reset_accelerate_state()
    networks.build_network = recording_build_network
    try:
        result = train(cfg)
    finally:
        networks.build_network = original
        reset_accelerate_state()
    return {"root": root, "cfg": cfg, "result": result, "seen": seen}


def test_label_dropout_trains_the_null_label_and_labels_follow_the_frames(conditional_run):
    from pipelines.data.conditions import condition_spec, dataset_labels
    from pipelines.data.frame_reader import FrameDataset
    from pipelines.training.data_order import StreamPositions

    cfg, seen = conditional_run["cfg"], conditional_run["seen"]
    frames = FrameDataset(cfg.dataset, "train")
    spec = condition_spec(frames, ["ef", "phase"], 0.5)
    efs = frames.column("EF")
    assert spec["conditions"][0]["range"] == [float(efs.min()), float(efs.max())]
    assert spec["conditions"][1]["classes"] == ["ED", "ES", "other"]
    labels = dataset_labels(frames, spec)
    is_ed, is_es = frames.column("is_ed_frame"), frames.column("is_es_frame")
    assert torch.equal(labels[:, 2], torch.from_numpy(is_ed).float())
    assert torch.equal(labels[:, 3], torch.from_numpy(is_es).float())
    stream = StreamPositions(len(frames), cfg.seed)
    assert len(seen) == 8  # 8 steps of 8 images, one chunk each
    dropped = 0
    for step, batch in enumerate(seen):
        positions = range(step * 8, step * 8 + 8)
        keep = label_keep_mask(positions, cfg.seed, 0.5)
        assert torch.equal(batch, labels[stream(positions)] * keep)  # dropped rows are the null label: zeros
        dropped += int((keep == 0).sum())
    assert 0 < dropped < 64 and bool((torch.cat(seen)[:, 0] == 0).any())


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, json
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(int(sys.argv[3]))
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert not any(name == "pipelines" or name.startswith("pipelines.") for name in sys.modules), "EchoDiff imported"
    pipe.set_progress_bar_config(disable=True)
    ef = json.loads(sys.argv[4])
    images = pipe(seeds=[0, 1], num_inference_steps=3, output_type="latent", ef=ef, phase="ES",
                  guidance_scale=2.0).images
    try:
        pipe(seeds=[0], num_inference_steps=2, ef=ef, phase="mid")
        error = None
    except ValueError as err:
        error = str(err)
    torch.save({"images": images, "conditions": json.dumps(dict(pipe.config.conditions)), "error": error}, sys.argv[2])
    """
)


def test_exported_pipeline_keeps_condition_names_and_ranges_through_save_load_and_remote_code(conditional_run,
                                                                                              capsys):
    from diffusers import DiffusionPipeline

    root, folder = conditional_run["root"], conditional_run["result"].pipeline_dirs[0]
    stored = json.loads((folder / "model_index.json").read_text())["conditions"]
    run_info = json.loads((root / "run" / "run_info.json").read_text())
    assert stored == run_info["conditions"] and [c["name"] for c in stored["conditions"]] == ["ef", "phase"]
    assert stored["label_dropout"] == 0.5
    card = (folder / "README.md").read_text()
    assert "| condition | ef,phase |" in card and "| label_dropout | 0.5 |" in card and "**Conditional model.**" in card
    low, high = stored["conditions"][0]["range"]
    ef = (low + high) / 2
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.condition_names == ("ef", "phase") and dict(pipe.config.conditions) == stored
    call = dict(seeds=[0, 1], num_inference_steps=3, output_type="latent", ef=ef, phase="ES", guidance_scale=2.0)
    expected = pipe(**call).images
    assert not torch.equal(expected, pipe(**{**call, "phase": "ED"}).images)  # the condition reaches the network
    pipe.save_pretrained(root / "resaved")
    again = EchoDiffPipeline.from_pretrained(root / "resaved", trust_remote_code=True)
    again.set_progress_bar_config(disable=True)
    assert dict(again.config.conditions) == stored and torch.equal(again(**call).images, expected)
    with pytest.raises(ValueError, match=rf"ef={high + 1:g} is outside the range"):  # remote code's ConditionError
        again(seeds=[0], num_inference_steps=2, ef=high + 1, phase="ES")
    from pipelines.errors import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the remote code's own error type: a script's one error line
        run_cli(lambda argv: again(seeds=[0], num_inference_steps=2, ef=high + 1, phase="ES"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "is outside the range" in err
    assert "Traceback" not in err

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "hf_modules"))
    out = root / "remote.pt"
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(root / "resaved"), str(out),
                             str(torch.get_num_threads()), json.dumps(ef)], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(out, weights_only=True)
    assert json.loads(remote["conditions"]) == stored and torch.equal(remote["images"], expected)
    assert "phase='mid': expected one of ['ED', 'ES', 'other']" in remote["error"]


def test_condition_columns_of_the_dataset_and_named_config_errors(conditional_run):
    from pipelines.data.conditions import condition_spec
    from pipelines.data.frame_reader import FrameDataset
    from pipelines.training import TrainConfig, train
    from pipelines.training.config import ConfigError, config_from_cli_args

    cfg = conditional_run["cfg"]
    frames = FrameDataset(cfg.dataset, "train")
    by_video = condition_spec(frames, ["video_id"], 0.1)["conditions"][0]  # any string column: categorical
    assert by_video["kind"] == "categorical" and by_video["classes"] == sorted(set(frames.column("video_id")))
    parsed = config_from_cli_args(["--dataset", "d", "--output_dir", "o", "--condition", "ef,phase",
                                   "--label_dropout", "0.2"])
    assert (parsed.condition, parsed.label_dropout) == ("ef,phase", 0.2)
    base = {k: v for k, v in vars(cfg).items() if k != "output_dir"}
    for changes, message in [({"condition": "ef,heart_rate"}, r"--condition 'heart_rate': not a column"),
                             ({"condition": "split"}, r"--condition 'split': column 'split' has 1 distinct value"),
                             ({"condition": "ef,ef"}, "names a condition twice"),
                             ({"label_dropout": 1.0}, r"--label_dropout: expected a value >= 0 and < 1"),
                             ({"network_overrides": {**cfg.network_overrides, "label_dim": 3}},
                              "label_dim is set by --condition")]:
        with pytest.raises(ConfigError, match=message):
            train(TrainConfig(**{**base, "output_dir": str(conditional_run["root"] / "bad"), **changes}))


def test_conditioning_study_scores_resumes_and_fid_draws_real_conditions(conditional_run, tmp_path):
    from pipelines.data.frame_reader import FrameDataset
    from pipelines.evaluation.conditioning import (
        ConditionedPipeline,
        RealConditions,
        condition_scores,
        conditioning_study,
        with_real_conditions,
    )
    from pipelines.evaluation.generation import generate_images, load_images
    from pipelines.hub import load_pipeline

    cfg = conditional_run["cfg"]
    pipe = load_pipeline(conditional_run["result"].pipeline_dirs[0])
    pipe.set_progress_bar_config(disable=True)
    train_frames, heldout = FrameDataset(cfg.dataset, "train"), FrameDataset(cfg.dataset, "validation")
    spec = dict(pipe.config.conditions)

    # Scores in closed form: perfect predictions, and predicting the mean EF (R^2 = 0).
    low, high = spec["conditions"][0]["range"]
    labels = encode(spec, {"ef": [low, (low + high) / 2, high, low + 0.1 * (high - low)],
                           "phase": ["ED", "ES", "other", "other"]}, 4)
    assert condition_scores(spec, labels[:, 1:], labels) == pytest.approx(
        {"ef_r2": 1.0, "ef_mae": 0.0, "phase_accuracy": 1.0, "phase_balanced_accuracy": 1.0})
    mean_prediction = labels[:, 1:].clone()
    mean_prediction[:, 0] = labels[:, 1].mean()
    mean_prediction[:, 1:] = torch.tensor([0.0, 0.0, 1.0])  # always "other"
    scores = condition_scores(spec, mean_prediction, labels)
    true_ef = (labels[:, 1].double() + 1) / 2 * (high - low) + low
    assert scores["ef_r2"] == pytest.approx(0.0, abs=1e-9)
    assert scores["ef_mae"] == pytest.approx((true_ef - true_ef.mean()).abs().mean().item())
    assert scores["phase_accuracy"] == 0.5 and scores["phase_balanced_accuracy"] == pytest.approx(1 / 3)

    # Drawn conditions: per seed (batch-independent), from the real frames' own labels.
    draw = RealConditions(check_spec(spec), train_frames, draw_seed=0)
    assert draw([5, 9]) == {k: draw([5])[k] + draw([9])[k] for k in ("ef", "phase")}
    assert set(draw(range(50))["ef"]) <= set(train_frames.column("EF").astype(np.float64).tolist())
    narrow = check_spec({**spec, "conditions": [{**spec["conditions"][0], "range": [50.0, 60.0]},
                                                spec["conditions"][1]]})
    efs = train_frames.column("EF").astype(np.float64)
    clipped = RealConditions(narrow, train_frames)
    assert clipped.clipped == {"ef": int(((efs < 50) | (efs > 60)).sum())} and clipped.clipped["ef"] > 0
    assert clipped.values["ef"] == np.clip(efs, 50.0, 60.0).tolist()  # other splits' EF: clipped to the range
    wrapped, description = with_real_conditions(pipe, train_frames)
    assert isinstance(wrapped, ConditionedPipeline) and "labels of real frames" in description
    generate_images(wrapped, tmp_path / "b1", [0, 1, 2], batch_size=1, num_inference_steps=2, progress=False)
    generate_images(wrapped, tmp_path / "b3", [0, 1, 2], batch_size=3, num_inference_steps=2, progress=False)
    assert np.array_equal(load_images(tmp_path / "b1"), load_images(tmp_path / "b3"))
    # The shards keep each seed's conditions, so an EchoNet-layout export's FileList names the EF used.
    import csv

    from pipelines.evaluation.sample_export import export_echonet_folder

    with np.load(next((tmp_path / "b3").glob("shard-*.npz"))) as shard:
        assert shard["ef"].tolist() == draw([0, 1, 2])["ef"] and shard["phase"].tolist() == draw([0, 1, 2])["phase"]
    export_echonet_folder(tmp_path / "b3", tmp_path / "echonet")
    with open(tmp_path / "echonet" / "FileList.csv", newline="") as f:
        assert [float(row["EF"]) for row in csv.DictReader(f)] == pytest.approx(draw([0, 1, 2])["ef"])

    options = {"epochs": 1, "width": 4, "batch_size": 16}
    result = conditioning_study(pipe, train_frames, heldout, tmp_path / "study", guidance_scales=[1.0, 2.0],
                                seeds="0-5", num_inference_steps=2, gen_batch_size=6, predictor_options=options,
                                progress=False)
    frames_column = [row["frames"] for row in result["rows"]]
    assert frames_column == ["real (held out)", "generated", "generated", "generated, null label"]
    assert [row["guidance_scale"] for row in result["rows"]] == [None, 1.0, 2.0, None]
    for row in result["rows"]:
        assert {"ef_r2", "ef_mae", "phase_accuracy", "phase_balanced_accuracy"} <= set(row)
        assert 0 <= row["phase_accuracy"] <= 1 and row["ef_mae"] >= 0
    table = (tmp_path / "study" / "conditioning.md").read_text()
    assert table.count("\n") == 2 + 4 and "| generated | 2 | 6 |" in table
    weights = (tmp_path / "study" / "predictor" / "model.safetensors").stat().st_mtime_ns
    shard = next((tmp_path / "study" / "samples-cfg2").glob("shard-*.npz")).stat().st_mtime_ns
    again = conditioning_study(pipe, train_frames, heldout, tmp_path / "study", guidance_scales=[1.0, 2.0],
                               seeds="0-5", num_inference_steps=2, gen_batch_size=6, predictor_options=options,
                               progress=False)
    assert json.dumps(again["rows"]) == json.dumps(result["rows"])  # resumed: the same predictor and samples (nan R^2:
    # this tiny held-out split is one video, whose EF is constant)
    assert (tmp_path / "study" / "predictor" / "model.safetensors").stat().st_mtime_ns == weights
    assert next((tmp_path / "study" / "samples-cfg2").glob("shard-*.npz")).stat().st_mtime_ns == shard
    with pytest.raises(ValueError, match="no named conditions"):
        conditioning_study(exact(torch.zeros(DIM)), train_frames, heldout, tmp_path / "x", progress=False)


def test_evaluate_conditioning_cli_writes_the_table(conditional_run, tmp_path, capsys):
    import evaluate

    cfg = conditional_run["cfg"]
    result = evaluate.main(["conditioning", "--model", str(conditional_run["result"].pipeline_dirs[0]),
                            "--dataset", cfg.dataset, "--heldout_split", "validation,test", "--guidance_scales", "3",
                            "--seeds", "0-3", "--steps", "2", "--predictor_epochs", "1", "--predictor_width", "4",
                            "--no_null_row", "--precision", "fp32", "--output_dir", str(tmp_path), "--no_progress_bar"])
    assert [row["guidance_scale"] for row in result["rows"]] == [None, 3.0]
    assert result["rows"][0]["n"] == 11  # validation + test frames of the tiny dataset
    assert json.loads((tmp_path / "conditioning.json").read_text())["rows"][1]["n"] == 4
    assert (tmp_path / "samples-cfg3").is_dir() and "| generated | 3 | 4 |" in (tmp_path / "conditioning.md").read_text()


def test_visible_ef_family_ties_every_frames_cavity_to_ef():
    """In the "visible_ef" synthetic family EDV hardly varies, so ESV = EDV (1 - EF) and the LV volume of any
    frame follow EF; in the default family EDV's spread hides EF in a single frame."""
    from pipelines.data.synthetic_echonet import lv_volumes, sample_video_params

    def correlations(style):
        videos = [sample_video_params(0, i, style) for i in range(300)]
        ef = np.array([v["ef"] for v in videos])
        esv = np.array([v["esv"] for v in videos])
        mean_volume = np.array([lv_volumes(v).mean() for v in videos])  # what a random frame shows, on average
        assert np.allclose(ef, 100 * (1 - esv / np.array([v["edv"] for v in videos])))  # FileList's EF
        return np.corrcoef(ef, esv)[0, 1], np.corrcoef(ef, mean_volume)[0, 1]

    visible, default = correlations("visible_ef"), correlations("echonet")
    print("corr(EF, ESV), corr(EF, mean LV volume): visible_ef", visible, "echonet", default)
    assert visible[0] < -0.95 and visible[1] < -0.7
    assert default[1] > -0.5  # the default family's single frames carry EF only partly (EDV's spread)

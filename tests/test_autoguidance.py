"""Autoguidance in EchoDiffPipeline: closed-form Gaussian checks (alone and composed with DG), w = 1 is the
plain sampler bit for bit, the guidance interval gates the guide's evaluations, the cost is reported, and a
guided pipeline saves and loads (remote code included)."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pipelines.components.pipeline_echodiff import EchoDiffPipeline
from pipelines.components.samplers import SAMPLER_NAMES
from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
from pipelines.networks import build_network, tiny_config
from tests.exact_gaussian import RES, ExactGaussianNet, ExactLogRatio, S

STEPS = 30


class RecordingGaussianNet(ExactGaussianNet):
    """The exact Gaussian network that records the sigma of every batch it is evaluated on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigmas = []

    def forward(self, x_in, c_noise, class_labels=None, return_dict=True):
        self.sigmas.append(torch.exp(4 * c_noise.double()).reshape(-1)[0].item())
        return super().forward(x_in, c_noise, class_labels, return_dict)


def gaussian_means():
    g = torch.Generator().manual_seed(1)
    mu_1 = 0.2 * torch.randn(RES * RES, generator=g, dtype=torch.float64)  # the main model's data
    mu_0 = mu_1 + 0.3 * torch.randn(RES * RES, generator=g, dtype=torch.float64)  # the guide's
    return mu_1, mu_0


def exact_pipe(mean, guide_mean=None, recording=False):
    net = RecordingGaussianNet if recording else ExactGaussianNet
    guide = None if guide_mean is None else net(mean=tuple(guide_mean.tolist()))
    pipe = EchoDiffPipeline(unet=ExactGaussianNet(mean=tuple(mean.tolist())), scheduler=EDMHeunScheduler(),
                            guide_unet=guide)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent(pipe, seeds, steps=STEPS, **kwargs):
    return pipe(seeds=seeds, num_inference_steps=steps, output_type="latent", **kwargs).images.double()


@pytest.mark.parametrize("weight", [0.0, 1.0, 2.0])
def test_autoguidance_of_exact_denoisers_samples_the_predicted_gaussian(weight):
    """D_0 + w (D_1 - D_0) of the exact denoisers of N(mu_1, S^2) and N(mu_0, S^2) is the exact denoiser of
    N(w mu_1 + (1 - w) mu_0, S^2): the samples must have that distribution."""
    mu_1, mu_0 = gaussian_means()
    seeds = list(range(1500))
    guided = latent(exact_pipe(mu_1, mu_0), seeds, ag_weight=weight)
    target = weight * mu_1 + (1 - weight) * mu_0
    same_trajectories = latent(exact_pipe(target), seeds)  # the target Gaussian's own exact denoiser
    print(f"w={weight}: max |guided - target-model samples|:", (guided - same_trajectories).abs().max().item())
    assert (guided - same_trajectories).abs().max().item() < 1e-4
    flat = guided.reshape(len(seeds), -1)
    stderr = S / math.sqrt(len(seeds))
    assert (flat.mean(0) - target).abs().max().item() < 4.5 * stderr  # 16 dims, each within sampling error
    if weight != 1:
        assert (flat.mean(0) - mu_1).abs().mean().item() > 5 * stderr  # guidance really moved the samples
    # covariance S^2 I: per-dimension std within the 30-step sampler's ~2% error, correlations near 0
    assert flat.std(0).mean().item() == pytest.approx(S, rel=0.04)
    correlation = torch.corrcoef(flat.T)
    off_diagonal = correlation[~torch.eye(RES * RES, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 4.5 / math.sqrt(len(seeds))


def test_weight_one_is_the_plain_sampler_bit_for_bit_and_never_runs_the_guide():
    mu_1, mu_0 = gaussian_means()
    pipe = exact_pipe(mu_1, mu_0, recording=True)
    seeds = [3, 7, 11]
    guided = latent(pipe, seeds, steps=8, ag_weight=1.0)
    assert pipe.guide_unet.sigmas == []
    assert pipe.network_evaluations == {"unet": 15}
    plain = latent(exact_pipe(mu_1), seeds, steps=8)
    assert torch.equal(guided, plain)


def test_the_guide_runs_only_inside_the_interval_and_the_cost_is_counted():
    mu_1, mu_0 = gaussian_means()
    pipe = exact_pipe(mu_1, mu_0, recording=True)
    steps, lo, hi = 12, 0.3, 5.0
    latent(pipe, [0, 1], steps=steps, ag_weight=2.5, ag_sigma_min=lo, ag_sigma_max=hi)
    schedule = EDMHeunScheduler()
    schedule.set_timesteps(steps)
    inside = [t for t in schedule.timesteps.tolist() if lo <= t <= hi]  # Euler and correction evaluations
    assert 0 < len(inside) < len(schedule.timesteps)
    assert pipe.guide_unet.sigmas == pytest.approx(inside, rel=1e-6)
    assert pipe.network_evaluations == {"unet": 2 * steps - 1, "guide_unet": len(inside)}
    unbounded = latent(pipe, [0, 1], steps=steps, ag_weight=2.5)
    assert pipe.network_evaluations == {"unet": 2 * steps - 1, "guide_unet": 2 * steps - 1}
    bounded = latent(pipe, [0, 1], steps=steps, ag_weight=2.5, ag_sigma_min=lo, ag_sigma_max=hi)
    assert (bounded - unbounded).abs().max().item() > 1e-3  # the interval changed the guidance


def test_autoguidance_and_dg_compose_in_closed_form():
    """Autoguidance gives the exact denoiser of N(m, S^2), m = w mu_1 + (1 - w) mu_0; DG (both orders, weight 1)
    with the exact log ratio of N(mu_r) against N(m) adds sigma^2 (mu_r - m) / (S^2 + sigma^2): the exact
    denoiser of the real data N(mu_r, S^2). Both on must therefore sample N(mu_r, S^2)."""
    mu_1, mu_0 = gaussian_means()
    weight = 1.5
    m = weight * mu_1 + (1 - weight) * mu_0
    mu_r = m + 0.1 * torch.randn(RES * RES, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = list(range(400))
    pipe = exact_pipe(mu_1, mu_0)
    both = latent(pipe, seeds, ag_weight=weight, discriminator=ExactLogRatio(mu_r, m), dg_weight_first_order=1.0,
                  dg_weight_second_order=1.0, dg_sigma_min=0.0)
    nfe = 2 * STEPS - 1
    assert pipe.network_evaluations == {"unet": nfe, "guide_unet": nfe, "discriminator": nfe}
    real = latent(exact_pipe(mu_r), seeds)
    print("max |AG + DG samples - real-model samples|:", (both - real).abs().max().item())
    assert (both - real).abs().max().item() < 1e-4
    ag_only = latent(pipe, seeds, ag_weight=weight)
    assert (ag_only - real).abs().max().item() > 1e-2  # DG did its part


def test_bad_autoguidance_calls_are_named():
    mu_1, mu_0 = gaussian_means()
    unguided = exact_pipe(mu_1)
    with pytest.raises(ValueError, match="no guide_unet"):
        latent(unguided, [0], steps=4, ag_weight=2.0)
    with pytest.raises(ValueError, match="ag_weight must be a finite number"):
        latent(exact_pipe(mu_1, mu_0), [0], steps=4, ag_weight=math.nan)
    with pytest.raises(ValueError, match="ag_sigma_min <= ag_sigma_max"):
        latent(exact_pipe(mu_1, mu_0), [0], steps=4, ag_weight=2.0, ag_sigma_min=3.0, ag_sigma_max=1.0)
    wrong_size = ExactGaussianNet(mean=tuple(mu_0.tolist()), sample_size=8)
    with pytest.raises(ValueError, match="sample_size is 8, the unet's is 4"):
        latent(unguided, [0], steps=4, guide_unet=wrong_size, ag_weight=2.0)
    # a per-call guide works on a pipeline saved without one
    per_call = latent(unguided, [0], steps=4, guide_unet=ExactGaussianNet(mean=tuple(mu_0.tolist())), ag_weight=2.0)
    assert torch.equal(per_call, latent(exact_pipe(mu_1, mu_0), [0], steps=4, ag_weight=2.0))


def tiny_unet(model_channels, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_network("ddpmpp", **{**tiny_config("ddpmpp"), "model_channels": model_channels})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():  # visibly non-zero outputs (fresh EDM output layers are zero)
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(int(sys.argv[3]))
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert not any(name == "pipelines" or name.startswith("pipelines.") for name in sys.modules), "EchoDiff imported"
    assert type(pipe.guide_unet).__module__.startswith("diffusers_modules."), type(pipe.guide_unet)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(seeds=[0, 1], num_inference_steps=5, output_type="latent", ag_weight=2.0, ag_sigma_max=10.0).images
    torch.save({"images": images, "evaluations": pipe.network_evaluations}, sys.argv[2])
    """
)


def test_a_guided_pipeline_saves_and_loads_with_its_guide(tmp_path):
    main, guide = tiny_unet(8, seed=0), tiny_unet(4, seed=1)  # the guide: a smaller network
    pipe = EchoDiffPipeline(unet=main, scheduler=EDMHeunScheduler(), guide_unet=guide)
    pipe.set_progress_bar_config(disable=True)
    call = dict(seeds=[0, 1], num_inference_steps=5, output_type="latent", ag_weight=2.0, ag_sigma_max=10.0)
    expected = pipe(**call).images
    assert not torch.equal(expected, pipe(**{**call, "ag_weight": 1.0}).images)

    # diffusers' way of adding a component: from_pretrained(..., guide_unet=...) on a pipeline saved without one
    EchoDiffPipeline(unet=main, scheduler=EDMHeunScheduler()).save_pretrained(tmp_path / "main")
    attached = EchoDiffPipeline.from_pretrained(tmp_path / "main", guide_unet=guide, trust_remote_code=True)
    attached.save_pretrained(tmp_path / "guided")
    assert (tmp_path / "guided" / "guide_unet" / "unet_song.py").is_file()
    loaded = EchoDiffPipeline.from_pretrained(tmp_path / "guided", trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.guide_unet.config.model_channels == 4
    assert torch.equal(loaded(**call).images, expected)

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "guided"), str(tmp_path / "out.pt"),
                             str(torch.get_num_threads())], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(remote["images"], expected)
    schedule = EDMHeunScheduler()
    schedule.set_timesteps(5)
    assert remote["evaluations"] == {"unet": 9, "guide_unet": int((schedule.timesteps <= 10.0).sum())}


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_autoguidance_works_with_every_sampler(sampler):
    """Through the samplers' one adapter of D: autoguided exact denoisers follow the target Gaussian's paths."""
    mu_1, mu_0 = gaussian_means()
    seeds = list(range(200))
    pipe = exact_pipe(mu_1, mu_0)
    guided = latent(pipe, seeds, steps=12, ag_weight=2.0, sampler=sampler)
    assert pipe.network_evaluations["guide_unet"] == pipe.network_evaluations["unet"] == pipe.num_timesteps
    target = latent(exact_pipe(2.0 * mu_1 - mu_0), seeds, steps=12, sampler=sampler)
    assert (guided - target).abs().max().item() < 1e-4
    assert (guided - latent(exact_pipe(mu_1), seeds, steps=12, sampler=sampler)).abs().max().item() > 1e-2

"""Every sampler of samplers.py inside EchoDiffPipeline, with the exact denoiser of Gaussian data.

The network is F whose preconditioned D is exact for data N(MU, SIGMA) (1x2x2 "images"):
D(x; s) = MU + SIGMA (SIGMA + s^2 I)^-1 (x - MU), written here for EDM and VE preconditioning. A
deterministic sampler is then affine in its starting noise n ~ N(0, I), so its output distribution is
N(f(0), A A^T) with A's columns f(e_k) - f(0): exact moments from DIM + 1 pipeline images, no sampling error.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, DiffusionPipeline, EDMDPMSolverMultistepScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from test_dg_sampling import ExactGaussianNet, ExactLogRatio, means
from test_pipeline import tiny_network

from pipelines.components.pipeline_echodiff import EchoDiffPipeline
from pipelines.components.samplers import SAMPLER_NAMES
from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
from pipelines.evaluation.fid import frechet_distance

SIDE, DIM, SD = 2, 4, 0.5
MU = torch.tensor([0.4, -0.3, 0.2, 0.1], dtype=torch.float64)
_Q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
SIGMA = _Q @ torch.diag(torch.tensor([0.02, 0.1, 0.3, 0.6], dtype=torch.float64)) @ _Q.T
DETERMINISTIC = [name for name in SAMPLER_NAMES if "sde" not in name]


class GaussianNet(ModelMixin, ConfigMixin):
    """Raw F of the exact Gaussian denoiser under EDM ("edm") or VE ("ve") preconditioning (EDM Table 1)."""

    @register_to_config
    def __init__(self, kind="edm", sample_size=SIDE, in_channels=1):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # gives the model a dtype / device
        self.sigmas_seen = []

    def forward(self, x_in, c_noise, class_labels=None, return_dict=True):
        c_noise = c_noise.double().reshape(-1, 1)
        if self.config.kind == "edm":
            sigma = torch.exp(4 * c_noise)
            x = x_in.double().reshape(-1, DIM) * torch.sqrt(sigma**2 + SD**2)
            c_skip, c_out = SD**2 / (sigma**2 + SD**2), sigma * SD / torch.sqrt(sigma**2 + SD**2)
        else:
            sigma = 2 * torch.exp(c_noise)
            x, c_skip, c_out = x_in.double().reshape(-1, DIM), 1.0, sigma
        self.sigmas_seen.append(float(sigma[0]))
        gains = SIGMA @ torch.linalg.inv(SIGMA + sigma.reshape(-1, 1, 1) ** 2 * torch.eye(DIM, dtype=torch.float64))
        denoised = MU + torch.einsum("bij,bj->bi", gains, x - MU)
        return ((denoised - c_skip * x) / c_out).float().reshape(x_in.shape),


def gaussian_pipe(kind="edm"):
    pipe = EchoDiffPipeline(unet=GaussianNet(kind), scheduler=EDMHeunScheduler(preconditioning=kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def exact_moments(pipe, sampler, steps):
    """Mean and covariance of the sampler's output distribution (it is affine in the starting noise)."""
    basis = torch.cat([torch.zeros(1, DIM), torch.eye(DIM)]).reshape(DIM + 1, 1, SIDE, SIDE)
    out = pipe(latents=basis, num_inference_steps=steps, sampler=sampler, output_type="latent")
    flat = out.images.double().reshape(DIM + 1, DIM)
    columns = (flat[1:] - flat[0]).T
    return flat[0], columns @ columns.T, out.nfe


def distance_to_truth(mean, cov):
    return frechet_distance(mean.numpy(), cov.numpy(), MU.numpy(), SIGMA.numpy())


# (steps, NFE, bound): Fréchet distance to N(MU, SIGMA) at about 40 NFE below the bound. Measured:
# heun 1.8e-3, euler 4.8e-3, dpmpp2m 1.2e-4, dpmpp3m 2.1e-5, unipc 2.1e-5.
CONVERGENCE = {"heun": (20, 39, 5e-3), "euler": (40, 40, 1e-2), "dpmpp2m": (40, 40, 5e-4),
               "dpmpp3m": (40, 40, 1e-4), "unipc": (40, 40, 1e-4)}


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_every_sampler_converges_to_the_gaussian(sampler):
    assert set(CONVERGENCE) == set(DETERMINISTIC)
    steps, nfe, bound = CONVERGENCE[sampler]
    pipe = gaussian_pipe()
    few = distance_to_truth(*exact_moments(pipe, sampler, 4)[:2])
    mean, cov, counted = exact_moments(pipe, sampler, steps)
    many = distance_to_truth(mean, cov)
    print(f"{sampler}: FD to the truth {few:.2e} at 4 steps, {many:.2e} at {counted} NFE")
    assert counted == nfe == pipe.count_nfe(steps, sampler=sampler) == pipe.num_timesteps
    assert many < bound and many < few / 10


def test_dpmpp2m_error_falls_at_second_order():
    pipe = gaussian_pipe()
    errors = {}
    for steps in (10, 20, 40):
        _, cov, _ = exact_moments(pipe, "dpmpp2m", steps)
        errors[steps] = float((cov - SIGMA).norm() / SIGMA.norm())
    orders = [math.log2(errors[n] / errors[2 * n]) for n in (10, 20)]
    print(f"DPM-Solver++(2M) relative covariance errors {errors}; observed orders {orders}")
    assert all(1.5 < order < 3.0 for order in orders)  # DPM-Solver++(2M) is second order (Lu et al. 2022)
    euler = float((exact_moments(pipe, "euler", 40)[1] - SIGMA).norm() / SIGMA.norm())
    assert euler > 5 * errors[40]  # first order: far behind at the same NFE


def test_stochastic_dpmpp2m_sde_converges_and_keeps_seeds_apart_from_the_batch():
    pipe = gaussian_pipe()
    seeds = list(range(3000))
    samples = pipe(seeds=seeds, num_inference_steps=40, sampler="dpmpp2m_sde", output_type="latent").images
    flat = samples.double().reshape(len(seeds), DIM)
    distance = distance_to_truth(flat.mean(0), torch.cov(flat.T))
    print(f"dpmpp2m_sde: FD of 3000 samples to the truth {distance:.4f}")
    assert distance < 0.01  # sampling error of 3000 samples dominates
    alone = pipe(seeds=[7], num_inference_steps=40, sampler="dpmpp2m_sde", output_type="latent").images
    torch.testing.assert_close(alone[0], samples[7], rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_ve_models_sample_from_0_02_and_seeds_ignore_the_batch(sampler):
    pipe = gaussian_pipe("ve")
    batch = pipe(seeds=[3, 8, 11], num_inference_steps=8, sampler=sampler, output_type="latent").images
    seen = pipe.unet.sigmas_seen[-pipe.num_timesteps:]
    assert min(seen) == pytest.approx(0.02, rel=1e-5) and max(seen) == pytest.approx(80.0, rel=1e-5)
    alone = pipe(seeds=[8], num_inference_steps=8, sampler=sampler, output_type="latent").images
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-5)
    if sampler in DETERMINISTIC:  # from 0.02 the Gaussian is still reached (the smallest variance is 0.02)
        assert distance_to_truth(*exact_moments(pipe, sampler, 30)[:2]) < 1e-2  # measured <= 6.9e-3


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_discriminator_guidance_works_with_every_sampler(sampler):
    """D + sigma^2 grad log r with the exact log ratio is the real data's denoiser: DG samples of the model
    follow the trajectories of sampling the real data with the same sampler."""
    mu_r, mu_g = means()
    model = EchoDiffPipeline(unet=ExactGaussianNet(mean=tuple(mu_g.tolist())), scheduler=EDMHeunScheduler())
    real = EchoDiffPipeline(unet=ExactGaussianNet(mean=tuple(mu_r.tolist())), scheduler=EDMHeunScheduler())
    for pipe in (model, real):
        pipe.set_progress_bar_config(disable=True)
    seeds, options = list(range(8)), dict(num_inference_steps=10, sampler=sampler, output_type="latent")
    guided = model(seeds=seeds, discriminator=ExactLogRatio(mu_r, mu_g), dg_weight_first_order=1.0,
                   dg_weight_second_order=1.0, dg_sigma_min=0.0, **options).images
    plain = model(seeds=seeds, **options).images
    target = real(seeds=seeds, **options).images
    assert (guided - target).abs().max() < 1e-4 < (plain - target).abs().max()


def test_swapped_scheduler_survives_save_and_load(tmp_path):
    pipe = gaussian_pipe("ve")
    pipe.scheduler = EDMDPMSolverMultistepScheduler.from_config(EDMDPMSolverMultistepScheduler().config,
                                                                solver_order=3)
    expected = pipe(seeds=[0, 1], num_inference_steps=6, output_type="latent")
    assert expected.sampler == "dpmpp3m" and expected.nfe == 6
    pipe.save_pretrained(tmp_path)
    for loader in (EchoDiffPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path, trust_remote_code=True)
        loaded.set_progress_bar_config(disable=True)
        assert isinstance(loaded.scheduler, EDMDPMSolverMultistepScheduler) and loaded.preconditioning.kind == "ve"
        again = loaded(seeds=[0, 1], num_inference_steps=6, output_type="latent").images
        assert torch.equal(again, expected.images)


def test_bad_sampler_settings_are_named():
    pipe = gaussian_pipe()
    with pytest.raises(ValueError, match="sampler must be one of"):
        pipe(seeds=[0], sampler="ddim")
    with pytest.raises(TypeError, match="s_chrun"):
        pipe(seeds=[0], sampler="dpmpp2m", s_chrun=1.0)
    with pytest.raises(ValueError, match="precision"):
        pipe(seeds=[0], precision="fp8")
    with pytest.raises(ValueError, match="dg_boost_churn"):
        pipe(seeds=[0], sampler="unipc", discriminator=ExactLogRatio(MU, MU), dg_weight_first_order=1.0,
             dg_boost_churn=True)
    pipe.scheduler = EDMHeunScheduler(preconditioning="vp")
    with pytest.raises(ValueError, match="differs from the pipeline's"):
        pipe(seeds=[0])
    with pytest.raises(ValueError, match="preconditioning="):
        EchoDiffPipeline(unet=GaussianNet(), scheduler=EDMDPMSolverMultistepScheduler())


def test_bf16_autocast_and_channels_last_stay_close_to_fp32():
    pipe = EchoDiffPipeline(unet=tiny_network(), scheduler=EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    fp32 = pipe(seeds=[0, 1], num_inference_steps=6, output_type="latent").images
    for options in ({"precision": "bf16"}, {"channels_last": True}, {"precision": "bf16", "sampler": "dpmpp2m"}):
        out = pipe(seeds=[0, 1], num_inference_steps=6, output_type="latent", **options)
        assert out.images.dtype == torch.float32 and np.isfinite(out.images.numpy()).all()
        assert out.precision == options.get("precision", "fp32")
        if "sampler" not in options:
            torch.testing.assert_close(out.images, fp32, rtol=0, atol=0.1)
    assert not torch.equal(pipe(seeds=[0, 1], num_inference_steps=6, output_type="latent", precision="bf16").images,
                           fp32)  # bf16 really ran
    assert all(p.is_contiguous() for p in pipe.unet.parameters())  # channels-last was for that call only

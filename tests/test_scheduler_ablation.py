"""EDMAblationScheduler: EDM's ablation sampler (the original VP / VE / iDDPM time steps, schedules and scalings).

Its grids against EDM's Table 1 written out here, and its deterministic samplers on Gaussian data with the
exact denoiser converging to the true distribution.
"""

import math

import pytest
import torch
from test_scheduler import DIM, EYE, MU, gaussian_denoiser, relative_cov_error

from pipelines.components.scheduling_edm_ablation import EDMAblationScheduler
from pipelines.components.scheduling_edm_heun import EDMHeunScheduler


def test_vp_ve_iddpm_discretisations():
    n = 6
    i = torch.arange(n, dtype=torch.float64)
    vp = EDMAblationScheduler(preconditioning="vp", discretization="vp")
    vp.set_timesteps(n)
    # Table 1: t_i = 1 + i/(N-1) (eps_s - 1), sigma(t) = sqrt(exp(19.9 t^2 / 2 + 0.1 t) - 1).
    t = 1 + i / (n - 1) * (1e-3 - 1)
    expected = torch.sqrt(torch.exp(19.9 / 2 * t**2 + 0.1 * t) - 1)
    torch.testing.assert_close(vp.sigmas[:-1], expected, rtol=1e-9, atol=0)

    ve = EDMAblationScheduler(preconditioning="ve", discretization="ve")
    ve.set_timesteps(n)
    # sigma_i^2 = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)): geometric from 100 to 0.02.
    torch.testing.assert_close(ve.sigmas[:-1], 100 * (0.02 / 100) ** (i / (n - 1)), rtol=1e-12, atol=0)

    # iDDPM: N of the M+1 levels u_j, evenly picked (Table 1), u_{j-1} from u_j by the recursion.
    levels, alpha_bar = [0.0], lambda j: math.sin(0.5 * math.pi * j / (1000 * 1.008)) ** 2
    for j in range(1000, 0, -1):
        levels.append(math.sqrt((levels[-1] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), 0.001) - 1))
    levels = [u for u in reversed(levels) if 0.002 <= u <= 81]
    iddpm = EDMAblationScheduler(discretization="iddpm")
    iddpm.set_timesteps(n)
    picked = [levels[math.floor((len(levels) - 1) / (n - 1) * k + 0.5)] for k in range(n)]
    assert iddpm.sigmas[:-1].tolist() == pytest.approx(picked, rel=1e-12)


@pytest.mark.parametrize(
    "config, steps, tolerance",
    [  # EDM Table 1's original samplers, deterministic, against the true covariance
        (dict(preconditioning="vp", discretization="vp", schedule="vp", scaling="vp"), 30, 0.01),
        (dict(preconditioning="vp", discretization="vp", schedule="vp", scaling="vp", solver="euler"), 64, 0.01),
        (dict(preconditioning="ve", discretization="ve", schedule="ve"), 256, 0.01),
        (dict(discretization="iddpm"), 64, 0.01),
    ],
)
def test_original_schedules_and_scalings_converge(config, steps, tolerance):
    # Deterministic sampling is affine in the noise: push 0 and the unit vectors through to get the exact output law.
    scheduler = EDMAblationScheduler(**config)
    latents = torch.cat([torch.zeros(1, DIM, dtype=torch.float64), EYE])
    out = scheduler.sample(gaussian_denoiser, latents=latents, num_inference_steps=steps)
    linear_map = (out[1:] - out[0]).T
    assert relative_cov_error(linear_map @ linear_map.T) < tolerance
    assert float((out[0] - MU).abs().max()) < 0.01


def test_vp_scaling_feeds_the_denoiser_unscaled_samples():
    scheduler = EDMAblationScheduler(preconditioning="vp", discretization="vp", schedule="vp", scaling="vp")
    scheduler.set_timesteps(5)
    sample = torch.ones(2, DIM, dtype=torch.float64)
    sigma = float(scheduler.timesteps[0])
    # s(t) = 1 / sqrt(1 + sigma(t)^2): the denoiser sees x / s(t).
    torch.testing.assert_close(scheduler.scale_model_input(sample, sigma), sample * math.sqrt(1 + sigma**2))
    assert scheduler.init_noise_sigma == pytest.approx(sigma / math.sqrt(1 + sigma**2))
    plain = EDMHeunScheduler()
    plain.set_timesteps(5)
    assert plain.scale_model_input(sample, 80.0) is sample


def test_edm_discretisation_equals_the_heun_scheduler():
    ablation, heun = EDMAblationScheduler(s_churn=10.0, s_min=0.1, s_max=20.0), EDMHeunScheduler(s_churn=10.0, s_min=0.1, s_max=20.0)
    ablation.set_timesteps(9)
    heun.set_timesteps(9)
    assert torch.equal(ablation.timesteps, heun.timesteps) and torch.equal(ablation.sigmas, heun.sigmas)


def test_bad_arguments_and_per_sample_churn_outside_edm_time():
    with pytest.raises(ValueError, match="discretization"):
        EDMAblationScheduler(discretization="cosine")
    with pytest.raises(ValueError, match="schedule"):
        EDMAblationScheduler(schedule="cosine")
    scheduler = EDMAblationScheduler(schedule="vp", scaling="vp")
    assert not scheduler.supports_sample_churn and EDMAblationScheduler().supports_sample_churn
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="time parameterisation"):
        scheduler.add_sample_churn(torch.zeros(1, DIM), torch.ones(1))

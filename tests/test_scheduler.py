"""EDMHeunScheduler: grids, NFE, churn, and sampling a Gaussian with its exact denoiser.

For data N(mu, Sigma) the exact denoiser is D(x; s) = mu + Sigma (Sigma + s^2 I)^-1 (x - mu). The sampler
is affine in x for that D, so the exact distribution of its output follows from a few lines of moment
propagation written here from EDM's Algorithm 2 (``algorithm2_moments``), independent of the scheduler.
"""

import math

import pytest
import torch

from pipelines.components.scheduling_edm_heun import EDMHeunScheduler

# facts.md: the EDM sigma grid for 30 steps (rho 7, 80 -> 0.002), as printed there.
FACTS_GRID_30 = ("80 66.10 54.33 44.40 36.07 29.11 23.34 18.58 14.68 11.50 8.93 6.87 5.23 3.94 2.93 2.15 1.56 "
                 "1.11 0.778 0.535 0.360 0.237 0.151 0.094 0.056 0.032 0.018 0.0092 0.0045 0.002").split()

DIM = 3
MU = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
_Q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
SIGMA = _Q @ torch.diag(torch.tensor([0.1, 0.4, 1.0], dtype=torch.float64)) @ _Q.T  # non-trivial covariance
EYE = torch.eye(DIM, dtype=torch.float64)
CHURN = dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003)  # EDM's ImageNet-64 stochastic settings


def gaussian_denoiser(x, sigma):
    gain = SIGMA @ torch.linalg.inv(SIGMA + sigma**2 * EYE)
    return MU + (x - MU) @ gain.T


def edm_grid(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    return [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(n)] + [0.0]


def algorithm2_moments(grid, heun=True, s_churn=0.0, s_min=0.0, s_max=math.inf, s_noise=1.0):
    """Exact output mean and covariance of EDM Algorithm 2 on N(mu, Sigma), started from N(0, t_0^2 I)."""
    n = len(grid) - 1
    mean, cov = torch.zeros(DIM, dtype=torch.float64), grid[0] ** 2 * EYE

    def slope(t):  # d(x - mu)/dt = slope(t) (x - mu), since (x - D(x)) / t = (I - A_t)(x - mu) / t
        return (EYE - SIGMA @ torch.linalg.inv(SIGMA + t**2 * EYE)) / t

    for i in range(n):
        t, t_next = grid[i], grid[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= t <= s_max else 0.0
        t_hat = t + gamma * t
        cov = cov + s_noise**2 * (t_hat**2 - t**2) * EYE
        h = t_next - t_hat
        euler = EYE + h * slope(t_hat)
        step = EYE + h / 2 * (slope(t_hat) + slope(t_next) @ euler) if heun and i < n - 1 else euler
        mean = MU + step @ (mean - MU)
        cov = step @ cov @ step.T
    return mean, cov


def sample_gaussian(num_samples, steps, seed=1, **config):
    scheduler = EDMHeunScheduler(**config)
    generator = torch.Generator().manual_seed(seed)
    return scheduler.sample(gaussian_denoiser, shape=(num_samples, DIM), num_inference_steps=steps, generator=generator)


def standardized_errors(samples, mean, cov):
    """|sample stat - expected| / standard error, for the means and the covariance entries."""
    n = samples.shape[0]
    mean_se = (cov.diagonal() / n).sqrt()
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    mean_z = (samples.mean(0) - mean).abs() / mean_se
    cov_z = (torch.cov(samples.T) - cov).abs() / cov_se
    return float(mean_z.max()), float(cov_z.max())


def relative_cov_error(cov):
    return float((cov - SIGMA).norm() / SIGMA.norm())


def test_edm_grid_matches_facts_30_steps():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(30)
    sigmas = scheduler.sigmas.tolist()
    assert scheduler.sigmas.dtype == torch.float64 and len(sigmas) == 31 and sigmas[-1] == 0.0
    for got, printed in zip(sigmas, FACTS_GRID_30):
        decimals = len(printed.split(".")[1]) if "." in printed else 0
        assert abs(got - float(printed)) <= 0.5 * 10**-decimals + 1e-12, (got, printed)
    assert sigmas == pytest.approx(edm_grid(30), rel=1e-12)


@pytest.mark.parametrize("solver, steps, nfe", [("heun", 30, 59), ("heun", 18, 35), ("euler", 30, 30), ("heun", 2, 3)])
def test_network_evaluations_per_sample(solver, steps, nfe):
    calls = []

    def counting_denoiser(x, sigma):
        calls.append(sigma)
        return torch.zeros_like(x)

    scheduler = EDMHeunScheduler(solver=solver, **CHURN)
    scheduler.sample(counting_denoiser, shape=(2, DIM), num_inference_steps=steps)
    assert len(calls) == nfe == len(scheduler.timesteps)
    assert calls == scheduler.timesteps.tolist()


@pytest.mark.parametrize(
    "steps, churn, max_cov_bias",
    [  # bounds on Algorithm 2's own discretisation error (exact, from algorithm2_moments); churn adds some
        (18, False, 0.12), (30, False, 0.04), (18, True, 0.25), (30, True, 0.12), (256, True, 0.015),
    ],
)
def test_heun_samples_gaussian_as_algorithm2(steps, churn, max_cov_bias, record_property):
    churn_config = CHURN if churn else {}
    samples = sample_gaussian(40_000, steps, **churn_config)
    mean, cov = algorithm2_moments(edm_grid(steps), **churn_config)
    mean_z, cov_z = standardized_errors(samples, mean, cov)
    # The scheduler's samples follow Algorithm 2's exact output distribution, within sampling error.
    assert mean_z < 4.5 and cov_z < 4.5
    # ... and that distribution is N(mu, Sigma) up to the solver's discretisation error, which shrinks
    # with the steps. (The mean offset ~ |mu| sqrt(Sigma) / 80 comes from starting at N(0, 80^2 I).)
    mean_bias, cov_bias = float((mean - MU).abs().max()), relative_cov_error(cov)
    assert mean_bias < 0.01 and cov_bias < max_cov_bias
    sample_mean_error = float((samples.mean(0) - MU).abs().max())
    sample_cov_error = relative_cov_error(torch.cov(samples.T))
    assert sample_mean_error < 0.03 and sample_cov_error < cov_bias + 0.03
    record_property("gaussian_errors", dict(mean_z=mean_z, cov_z=cov_z, mean_error=sample_mean_error,
                                            cov_rel_error=sample_cov_error, cov_rel_bias=cov_bias))
    print(f"heun {steps} churn={churn}: max |mean err| {sample_mean_error:.4f}, rel cov err {sample_cov_error:.4f} "
          f"(exact bias {cov_bias:.4f}); vs Algorithm 2: mean z {mean_z:.2f}, cov z {cov_z:.2f}")


def test_euler_is_measurably_worse_than_heun():
    heun = relative_cov_error(torch.cov(sample_gaussian(40_000, 18).T))
    euler = relative_cov_error(torch.cov(sample_gaussian(40_000, 18, solver="euler").T))
    euler_same_nfe = relative_cov_error(torch.cov(sample_gaussian(40_000, 35, solver="euler").T))
    # Exact (noise-free) errors from the moment propagation: Euler's is first order.
    exact_heun = relative_cov_error(algorithm2_moments(edm_grid(18))[1])
    exact_euler = relative_cov_error(algorithm2_moments(edm_grid(18), heun=False)[1])
    print(f"rel cov error at 18 steps: heun {heun:.4f} (exact {exact_heun:.4f}), euler {euler:.4f} "
          f"(exact {exact_euler:.4f}); euler 35 steps (same NFE as heun 18) {euler_same_nfe:.4f}")
    assert exact_euler > 2 * exact_heun
    assert euler > 2 * heun and euler_same_nfe > heun
    samples = sample_gaussian(40_000, 18, solver="euler")
    mean_z, cov_z = standardized_errors(samples, *algorithm2_moments(edm_grid(18), heun=False))
    assert mean_z < 4.5 and cov_z < 4.5


def test_churn_lifts_noise_levels_inside_its_window():
    n = 10
    scheduler = EDMHeunScheduler(s_churn=1000.0, s_min=0.05, s_max=10.0, s_noise=1.5, solver="euler")
    scheduler.set_timesteps(n)
    grid = edm_grid(n)
    gamma = math.sqrt(2) - 1  # S_churn / N is capped at sqrt(2) - 1
    expected = [t * (1 + gamma) if 0.05 <= t <= 10.0 else t for t in grid[:-1]]
    assert scheduler.timesteps.tolist() == pytest.approx(expected, rel=1e-12)
    assert scheduler.init_noise_sigma == pytest.approx(80.0)  # t_0 = 80 is outside the window

    wide = EDMHeunScheduler(s_churn=3.0, s_noise=1.5)
    wide.set_timesteps(n)
    t_hat_0 = 80.0 * (1 + 3.0 / n)  # gamma = 0.3, under the cap
    assert wide.init_noise_sigma == pytest.approx(math.sqrt(80.0**2 + 1.5**2 * (t_hat_0**2 - 80.0**2)), rel=1e-12)
    heun_sigmas = wide.timesteps.tolist()
    assert heun_sigmas[0] == pytest.approx(t_hat_0) and heun_sigmas[1] == pytest.approx(grid[1])
    assert heun_sigmas[2] == pytest.approx(grid[1] * (1 + 3.0 / n))


def test_churn_noise_comes_from_the_generators():
    first = sample_gaussian(6, 8, seed=3, **CHURN)
    again = sample_gaussian(6, 8, seed=3, **CHURN)
    other = sample_gaussian(6, 8, seed=4, **CHURN)
    assert torch.equal(first, again) and not torch.allclose(first, other)

    # One generator per sample: a sample depends only on its own generator, not on the batch.
    def per_sample(seeds):
        scheduler = EDMHeunScheduler(**CHURN)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return scheduler.sample(gaussian_denoiser, shape=(len(seeds), DIM), num_inference_steps=8,
                                generator=generators)

    batch = per_sample([10, 11, 12])
    torch.testing.assert_close(per_sample([11])[0], batch[1], rtol=0, atol=1e-12)


def test_grid_is_clipped_to_the_preconditioning_range():
    ve_model = EDMHeunScheduler(preconditioning="ve")  # EDM grid on a VE model: 80 -> 0.02 (facts.md)
    ve_model.set_timesteps(18)
    assert ve_model.sigmas[0] == 80.0 and ve_model.sigmas[-2] == pytest.approx(0.02)
    vp_model = EDMHeunScheduler(preconditioning="vp", sigma_max=500.0, sigma_min=1e-5)
    assert vp_model.sigma_max == pytest.approx(152.17, abs=0.01) and vp_model.sigma_min == pytest.approx(1e-3, rel=1e-3)


def test_heun_state_and_order():
    scheduler = EDMHeunScheduler()
    assert scheduler.order == 2 and EDMHeunScheduler(solver="euler").order == 1
    scheduler.set_timesteps(3)
    x = torch.zeros(1, DIM, dtype=torch.float64)
    states = []
    for t in scheduler.timesteps:
        states.append((scheduler.state_in_first_order, scheduler.current_step, scheduler.step_index))
        x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    assert states == [(True, 0, 0), (False, 0, 1), (True, 1, 2), (False, 1, 3), (True, 2, 4)]
    assert scheduler.current_step is None
    with pytest.raises(RuntimeError, match="evaluations are done"):
        scheduler.step(torch.zeros_like(x), 0.0, x)


def test_config_round_trip_and_overrides(tmp_path):
    scheduler = EDMHeunScheduler(preconditioning="ve", s_churn=3.0)
    scheduler.save_pretrained(tmp_path)
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    assert loaded.config.s_max == math.inf and loaded.config.sigma_min == 0.002 and loaded.sigma_min == 0.02
    assert loaded.preconditioning.kind == "ve" and loaded.config.s_churn == 3.0
    overridden = EDMHeunScheduler.from_config(loaded.config, s_churn=0.0, solver="euler")
    assert overridden.config.s_churn == 0.0 and overridden.order == 1 and loaded.config.s_churn == 3.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="solver"):
        EDMHeunScheduler(solver="rk4")
    with pytest.raises(ValueError, match="sigma range"):
        EDMHeunScheduler(preconditioning="ve", sigma_max=0.01)
    with pytest.raises(ValueError, match="num_inference_steps"):
        EDMHeunScheduler().set_timesteps(1)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        EDMHeunScheduler().step(torch.zeros(1), 80.0, torch.zeros(1))
    with pytest.raises(ValueError, match="s_churn"):
        EDMHeunScheduler(s_churn=-1.0)


def test_a_fresh_scheduler_is_usable_as_diffusers_expects():
    scheduler = EDMHeunScheduler()
    assert scheduler.init_noise_sigma == 80.0 and scheduler.timesteps is None and scheduler.current_step is None
    churned = EDMHeunScheduler(s_churn=40.0)
    assert churned.init_noise_sigma == 80.0
    churned.set_timesteps(10)  # step 0's lift to t_hat_0 = t_0 (1 + gamma) is folded into the initial noise
    gamma = min(40.0 / 10, math.sqrt(2) - 1)
    assert churned.init_noise_sigma == pytest.approx(80.0 * math.sqrt(1 + (1 + gamma) ** 2 - 1), rel=1e-12)


def test_per_sample_churn_lifts_only_the_chosen_samples_and_steps_each_from_its_own_level():
    """add_sample_churn: sample 1 is lifted at step 2 to t_2 (1 + gamma); its trajectory then follows Algorithm 2
    with that t_hat (written out here), while sample 0 follows the plain sampler."""
    steps, gamma, lift_at = 6, 0.3, 2
    grid = edm_grid(steps)
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(steps)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    x = torch.randn(2, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * grid[0]
    expected = x.clone()
    noise = torch.randn(DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(6))  # sample 1's stream
    for i in range(steps):  # the reference: Algorithm 2 per sample, S_churn 0 except the one lift
        t, t_next = grid[i], grid[i + 1]
        for b in range(2):
            t_hat = t * (1 + gamma) if (b == 1 and i == lift_at) else t
            x_hat = expected[b] + (math.sqrt(t_hat**2 - t**2) * noise if t_hat != t else 0)
            d = (x_hat - gaussian_denoiser(x_hat[None], t_hat)[0]) / t_hat
            x_next = x_hat + (t_next - t_hat) * d
            if i < steps - 1:
                d_prime = (x_next - gaussian_denoiser(x_next[None], t_next)[0]) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
            expected[b] = x_next
    for t in scheduler.timesteps:
        if scheduler.state_in_first_order and scheduler.current_step == lift_at:
            x = scheduler.add_sample_churn(x, torch.tensor([0.0, gamma], dtype=torch.float64), generators)
            assert scheduler.per_sample_sigma.tolist() == pytest.approx([grid[lift_at], grid[lift_at] * (1 + gamma)])
        sigma = t if scheduler.per_sample_sigma is None else scheduler.per_sample_sigma
        denoised = torch.stack([gaussian_denoiser(x[b:b + 1], float(s))[0] for b, s in
                                enumerate(torch.as_tensor(sigma).expand(2))])
        x = scheduler.step(denoised, t, x, generator=generators).prev_sample
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="first"):
        scheduler.set_timesteps(3)
        scheduler.step(torch.zeros_like(x), scheduler.timesteps[0], x)
        scheduler.add_sample_churn(x, torch.zeros(2))

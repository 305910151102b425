"""Discriminator Guidance inside EchoDiffPipeline: closed-form Gaussian checks, DG-off = plain, boost /
extra churn against an independent per-sample loop, reproducibility, save/load (incl. remote code)."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pipelines.components.discriminator import EchoDiffDiscriminator
from pipelines.components.guidance import (
    Denoiser,
    DiscriminatorGuidance,
    Evaluation,
    Guidance,
    GuidanceInterval,
)
from pipelines.components.pipeline_echodiff import EchoDiffPipeline
from pipelines.components.scheduling_edm_ablation import EDMAblationScheduler
from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
from tests.exact_gaussian import LOGIT_CLIP, RES, ExactGaussianNet, ExactLogRatio, S


def means():
    g = torch.Generator().manual_seed(0)
    mu_g = 0.2 * torch.randn(RES * RES, generator=g, dtype=torch.float64)
    mu_r = mu_g + 0.15 * torch.randn(RES * RES, generator=g, dtype=torch.float64)  # |log r| << clip
    return mu_r, mu_g


def gaussian_pipe(mean):
    # Plain nn.Module discriminators go in per call (a registered component must be a diffusers model).
    pipe = EchoDiffPipeline(unet=ExactGaussianNet(mean=tuple(mean.tolist())), scheduler=EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoise(pipe, x, sigma):
    """The pipeline's unguided D(x; sigma): its UNet under its scheduler's preconditioning."""
    return pipe.scheduler.preconditioning.denoise(pipe.unet, x, torch.tensor(sigma, dtype=torch.float64)).double()


def latent(pipe, seeds, steps=30, **kw):
    return pipe(seeds=seeds, num_inference_steps=steps, output_type="latent", **kw).images.double()


# ------------------------------------------------------------------ closed form
def test_dg_with_exact_log_ratio_turns_model_samples_into_real_samples():
    mu_r, mu_g = means()
    seeds = list(range(1500))
    disc = ExactLogRatio(mu_r, mu_g)
    model = gaussian_pipe(mu_g)
    guided = latent(model, seeds, discriminator=disc, dg_weight_first_order=1.0, dg_weight_second_order=1.0,
                    dg_sigma_min=0.0)
    # D + sigma^2 grad log r is exactly the real data's denoiser: same trajectories as sampling N(mu_r, S^2 I)
    real = latent(gaussian_pipe(mu_r), seeds)
    print("max |DG samples - real-model samples|:", (guided - real).abs().max().item())
    assert (guided - real).abs().max().item() < 1e-4
    flat = guided.reshape(len(seeds), -1)
    stderr = S / math.sqrt(len(seeds))
    mean_error = (flat.mean(0) - mu_r).abs()
    assert mean_error.max().item() < 4.5 * stderr, mean_error  # 16 dims, each within sampling error
    assert (flat.mean(0) - mu_g).abs().mean().item() > 5 * stderr  # really moved away from the model
    # 30 Heun steps inflate a 0.5-std Gaussian by ~1.8% (the sampler's own error, not DG's)
    assert flat.std(0).mean().item() == pytest.approx(S, rel=0.04)

    unguided = latent(model, seeds, discriminator=disc, dg_weight_first_order=0.0, dg_weight_second_order=0.0)
    flat = unguided.reshape(len(seeds), -1)
    assert (flat.mean(0) - mu_g).abs().max().item() < 4.5 * stderr
    assert (flat.mean(0) - mu_r).abs().mean().item() > 5 * stderr


def test_second_order_weight_zero_never_evaluates_the_discriminator_on_corrections():
    mu_r, mu_g = means()
    disc = ExactLogRatio(mu_r, mu_g)
    pipe = gaussian_pipe(mu_g)
    latent(pipe, [0, 1], discriminator=disc, dg_weight_first_order=5.0, dg_weight_second_order=0.0)
    sched = EDMHeunScheduler()
    sched.set_timesteps(30)
    euler_sigmas = sched.sigmas[:-1]
    expected = euler_sigmas[euler_sigmas >= 0.0447]
    assert len(expected) == 25  # the paper's setting: the first 25 of 30 steps
    seen = torch.stack([c[0] for c in disc.calls])
    torch.testing.assert_close(seen, expected.float().double(), rtol=1e-6, atol=0)
    disc.calls.clear()
    latent(pipe, [0, 1], discriminator=disc, dg_weight_first_order=5.0, dg_weight_second_order=1.0, dg_sigma_min=1.0,
           dg_sigma_max=10.0)
    seen = torch.stack([c[0] for c in disc.calls])
    inside = sched.timesteps[(sched.timesteps >= 1.0) & (sched.timesteps <= 10.0)]
    torch.testing.assert_close(seen, inside.float().double(), rtol=1e-6, atol=0)  # Euler and corrections


def _grad_log_ratio(disc, x, sigma):
    x = x.detach().float().requires_grad_(True)
    log_r = disc(x, sigma.float()).clamp(-LOGIT_CLIP, LOGIT_CLIP)
    return log_r.detach(), torch.autograd.grad(log_r.sum(), x)[0].double()


def reference_dg_sampler(pipe, disc, seeds, steps, w1, w2, boost, churn, sigma_min):
    """The DG reference's EDM sampler written out per sample (per-sample t_hat), independent of the
    pipeline's scheduler bookkeeping; noise drawn from one generator per seed as the pipeline does."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, 1, RES, RES), generator=g) for g in gens]).double()
    rho, smin, smax = 7.0, 0.002, 80.0
    i = torch.arange(steps, dtype=torch.float64)
    t_steps = (smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])
    x = x * t_steps[0]
    log_ratio = torch.full((len(seeds),), math.inf)
    denoise = pipe.scheduler.preconditioning.denoise
    view = (-1, 1, 1, 1)
    for i in range(steps):
        t_cur, t_next = t_steps[i].item(), t_steps[i + 1].item()
        lifted = (log_ratio < 0) & churn & (i % 5 == 0)
        t_hat = torch.where(lifted, torch.tensor(t_cur * (1 + min(4 / steps, math.sqrt(2) - 1)), dtype=torch.float64),
                            torch.tensor(t_cur, dtype=torch.float64))
        x_hat = x.clone()
        for b in torch.nonzero(lifted).flatten().tolist():
            noise = torch.randn((1, RES, RES), generator=gens[b], dtype=torch.float64)
            x_hat[b] = x[b] + math.sqrt(t_hat[b].item() ** 2 - t_cur**2) * noise
        d_cur = (x_hat - denoise(pipe.unet, x_hat, t_hat).double()) / t_hat.reshape(view)
        if w1:
            inside = t_hat >= sigma_min
            lr, grad = _grad_log_ratio(disc, x_hat, t_hat)
            factor = torch.where((lr < 0) & torch.tensor(i % 2 == 0), boost, 1.0).double() * inside
            d_cur = d_cur - w1 * (factor * t_hat).reshape(view) * grad
            log_ratio = torch.where(inside, lr, torch.full_like(lr, math.inf))
        x_next = x_hat + (t_next - t_hat).reshape(view) * d_cur
        if i < steps - 1:
            d_prime = (x_next - denoise(pipe.unet, x_next, torch.tensor(t_next, dtype=torch.float64)).double()) / t_next
            if w2 and t_next >= sigma_min:
                d_prime = d_prime - w2 * t_next * _grad_log_ratio(disc, x_next, torch.full((len(seeds),), t_next))[1]
            x_next = x_hat + (t_next - t_hat).reshape(view) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


@pytest.mark.parametrize("churn", [False, True])
def test_boost_and_extra_churn_match_an_independent_per_sample_loop(churn):
    mu_r, mu_g = means()
    disc = ExactLogRatio(mu_r, mu_g)
    pipe = gaussian_pipe(mu_g)
    seeds, steps = list(range(40)), 12
    kw = dict(w1=3.0, w2=0.5, boost=2.0, churn=churn, sigma_min=0.0447)
    out = latent(pipe, seeds, steps, discriminator=disc, dg_weight_first_order=kw["w1"], dg_weight_second_order=kw["w2"],
                 dg_boost=kw["boost"], dg_boost_churn=churn, dg_sigma_min=kw["sigma_min"])
    ref = reference_dg_sampler(pipe, disc, seeds, steps, **kw)
    print("max |pipeline - reference loop|:", (out - ref).abs().max().item())
    assert (out - ref).abs().max().item() < 1e-5
    no_boost = latent(pipe, seeds, steps, discriminator=disc, dg_weight_first_order=kw["w1"], dg_weight_second_order=kw["w2"],
                      dg_boost_churn=churn)
    assert (out - no_boost).abs().max().item() > 1e-2  # boosting changes the samples
    if churn:
        plain_churnless = latent(pipe, seeds, steps, discriminator=disc, dg_weight_first_order=kw["w1"], dg_weight_second_order=kw["w2"],
                                 dg_boost=2.0)
        assert (out - plain_churnless).abs().max().item() > 1e-2  # the extra churn happened


def test_dg_vector_boost_only_on_even_steps_and_for_fake_judged_samples():
    # A discriminator with a constant gradient a and logit a.x - 0.05: log r < 0 exactly where a.x < 0.05
    # (|a| small enough that the logit stays inside the clip even at sigma = 80).
    a = 0.01 * torch.linspace(-1, 1, RES * RES, dtype=torch.float64)

    class Linear(torch.nn.Module):
        def forward(self, x, sigma):
            logit = x.double().reshape(x.shape[0], -1) @ a - 0.05
            assert logit.abs().max() < LOGIT_CLIP
            return logit.float()

    pipe = gaussian_pipe(torch.zeros(RES * RES))
    seeds, steps, w1 = list(range(16)), 6, 2.0
    captured = []
    original_step = pipe.scheduler.step

    def recording_step(model_output, timestep=None, sample=None, **kw):
        captured.append((pipe.scheduler.state_in_first_order, float(timestep), sample.clone(), model_output.clone()))
        return original_step(model_output, timestep, sample, **kw)

    pipe.scheduler.step = recording_step
    latent(pipe, seeds, steps, discriminator=Linear(), dg_weight_first_order=w1, dg_weight_second_order=0.0,
           dg_boost=3.0, dg_sigma_min=0.0)
    euler = [c for c in captured if c[0]]
    assert len(euler) == steps and len(captured) == 2 * steps - 1
    for i, (_, sigma, x, d_dg) in enumerate(euler):
        plain = denoise(pipe, x, sigma)
        fake = (x.reshape(len(seeds), -1).double() @ a - 0.05) < 0
        assert 0 < fake.sum() < len(seeds) or i > 0  # both kinds at the first (boosted) step
        factor = torch.where(fake & torch.tensor(i % 2 == 0), 3.0, 1.0).double()
        expected = plain + (w1 * sigma**2 * factor).reshape(-1, 1, 1, 1) * a.reshape(1, 1, RES, RES)
        torch.testing.assert_close(d_dg.double(), expected, rtol=1e-5, atol=1e-4 * max(1.0, sigma**2))
    for first, sigma, x, d in captured:  # corrections untouched (w2 = 0)
        if not first:
            torch.testing.assert_close(d.double(), denoise(pipe, x, sigma),
                                       rtol=0, atol=0)


# ------------------------------------------------------------------ DG off, reproducibility, errors
def tiny_pipe(with_disc=True, variant="adm"):
    from pipelines.networks import build_network, tiny_config
    from pipelines.training.discriminator import build_discriminator

    torch.manual_seed(0)
    unet = build_network("adm", channels=1, **tiny_config("adm")).eval()
    disc = None
    if with_disc:
        torch.manual_seed(1)
        disc = build_discriminator(variant, resolution=16, channels=1, unet=unet, tiny=True).eval()
        with torch.no_grad():  # a head that is not ~zero, so the guidance visibly acts
            for p in disc.parameters():
                p.add_(0.05 * torch.randn_like(p))
    pipe = EchoDiffPipeline(unet=unet, scheduler=EDMHeunScheduler(), discriminator=disc)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dg_off_is_bitwise_the_plain_sampler():
    plain = tiny_pipe(with_disc=False)
    with_disc = tiny_pipe(with_disc=True)
    seeds = [0, 1, 2]
    ref = latent(plain, seeds, 8)
    assert torch.equal(latent(with_disc, seeds, 8), ref)  # a discriminator alone changes nothing
    assert torch.equal(latent(with_disc, seeds, 8, dg_weight_first_order=0.0, dg_weight_second_order=0.0,
                              dg_boost=2.0, dg_boost_churn=True), ref)
    assert torch.equal(latent(with_disc, seeds, 8, dg_weight_first_order=5.0, dg_sigma_min=100.0), ref)  # empty window
    guided = latent(with_disc, seeds, 8, dg_weight_first_order=5.0, dg_boost=2.0)
    assert (guided - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", ["adm", "unet-encoder"])
def test_dg_is_reproducible_per_seed(variant):
    pipe = tiny_pipe(variant=variant)
    kw = dict(dg_weight_first_order=5.0, dg_weight_second_order=1.0, dg_boost=2.0, dg_boost_churn=True)
    batch = latent(pipe, [7, 8, 9], 8, **kw)
    alone = latent(pipe, [8], 8, **kw)
    again = latent(pipe, [7, 8, 9], 8, **kw)
    assert torch.equal(batch, again)
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-5, atol=1e-5)


def test_dg_bad_arguments_raise_clear_errors():
    plain = tiny_pipe(with_disc=False)
    with pytest.raises(ValueError, match="needs a discriminator"):
        plain(seeds=[0], num_inference_steps=4, dg_weight_first_order=1.0)
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match="dg_boost"):
        pipe(seeds=[0], num_inference_steps=4, dg_weight_first_order=1.0, dg_boost=0.0)
    with pytest.raises(ValueError, match="dg_sigma_min"):
        pipe(seeds=[0], num_inference_steps=4, dg_weight_first_order=1.0, dg_sigma_min=2.0, dg_sigma_max=1.0)
    with pytest.raises(ValueError, match="one logit per sample"):
        pipe(seeds=[0, 1], num_inference_steps=4, dg_weight_first_order=1.0,
             discriminator=lambda x, sigma: torch.zeros(1, 3))
    vp_time = EchoDiffPipeline(unet=pipe.unet, scheduler=EDMAblationScheduler(schedule="vp", scaling="vp"),
                               discriminator=pipe.discriminator)
    with pytest.raises(ValueError, match="dg_boost_churn"):
        vp_time(seeds=[0], num_inference_steps=4, dg_weight_first_order=1.0, dg_boost_churn=True)


def test_guidance_wrappers_compose_passing_networks_and_extra_churn_through():
    pipe = tiny_pipe()
    plain = Denoiser(pipe.unet, pipe.scheduler.preconditioning)
    dg = DiscriminatorGuidance(plain, pipe.discriminator, weight_first_order=5.0, boost_churn=True,
                               interval=GuidanceInterval(0.0, math.inf, "dg"))
    outer = Guidance(dg)  # e.g. another guidance wrapping DG
    assert outer.networks() == [pipe.unet, pipe.discriminator]
    x, evaluation = torch.randn(2, 1, 16, 16), Evaluation(index=5, num_steps=10, first_order=True)
    assert torch.equal(outer(x, 2.0, evaluation), dg(x, 2.0, evaluation))  # also sets DG's log r
    expected = (dg.log_ratio < 0).double() * min(4 / 10, math.sqrt(2) - 1)
    assert torch.equal(outer.extra_churn(evaluation), expected)
    assert outer.extra_churn(Evaluation(index=4, num_steps=10)) is None and plain.extra_churn(evaluation) is None


# ------------------------------------------------------------------ save / load
def test_pipeline_with_discriminator_saves_and_loads_with_dg(tmp_path):
    pipe = tiny_pipe(variant="unet-encoder")
    kw = dict(dg_weight_first_order=5.0, dg_weight_second_order=0.0, dg_boost=2.0)
    expected = latent(pipe, [3, 4], 6, **kw)
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["discriminator"] == ["discriminator", "EchoDiffDiscriminator"]
    assert (tmp_path / "p" / "discriminator" / "discriminator.py").is_file()
    loaded = EchoDiffPipeline.from_pretrained(tmp_path / "p", trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.discriminator).__name__ == EchoDiffDiscriminator.__name__
    assert {p.name for p in (tmp_path / "p" / "discriminator").glob("*.py")} == {"discriminator.py", "layers.py",
                                                                               "preconditioning.py"}
    torch.testing.assert_close(latent(loaded, [3, 4], 6, **kw), expected, rtol=1e-5, atol=1e-5)
    np.save(tmp_path / "expected.npy", expected.float().numpy())

    # A fresh process that never imports EchoDiff: diffusers' remote-code loader.
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "p")!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.discriminator).__name__ == "EchoDiffDiscriminator"
        out = pipe(seeds=[3, 4], num_inference_steps=6, output_type="latent", **{kw!r}).images
        assert not any(m == "pipelines" or m.startswith("pipelines.") for m in sys.modules), "EchoDiff imported"
        np.testing.assert_allclose(out.float().numpy(), np.load({str(tmp_path / "expected.npy")!r}), rtol=1e-5, atol=1e-5)
        print("REMOTE-OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                              "HOME": str(tmp_path), "OMP_NUM_THREADS": "2"})
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]

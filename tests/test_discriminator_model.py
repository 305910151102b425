"""The Discriminator Guidance discriminator as a diffusers model: input scaling, logits, save/load, UNet-encoder variant."""

import math

import pytest
import torch

from pipelines.components.discriminator import EchoDiffDiscriminator
from pipelines.components.guidance import discriminator_logits
from pipelines.training.discriminator import build_discriminator

TINY = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), head_channels=8)


def tiny_disc(**kw):
    torch.manual_seed(0)
    return EchoDiffDiscriminator(sample_size=16, in_channels=1, **{**TINY, **kw})


def tiny_adm_unet():
    from pipelines.networks import build_network, tiny_config

    torch.manual_seed(1)
    return build_network("adm", channels=1, **tiny_config("adm")).eval()


# ------------------------------------------------------------------ input scaling
@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
def test_encoder_sees_the_preconditionings_scaled_input_and_noise_level(kind):
    """The encoder gets c_in x and c_noise of Karras et al. 2022, Table 1 (by hand), like the UNet does."""
    disc = tiny_disc(preconditioning=kind).eval()
    seen = {}
    disc.noise_embedding.register_forward_hook(lambda m, args, out: seen.update(c_noise=args[0].double()))
    disc.conv_in.register_forward_hook(lambda m, args, out: seen.update(x_in=args[0].double()))
    x = torch.randn(3, 1, 16, 16)
    sigma = [0.03, 1.0, 60.0]
    disc(x, torch.tensor(sigma))
    for b, s in enumerate(sigma):
        if kind == "edm":
            c_in, c_noise = 1 / math.sqrt(s**2 + 0.25), math.log(s) / 4
        elif kind == "ve":
            c_in, c_noise = 1.0, math.log(s / 2)
        else:  # c_noise = 999 t with sigma(t) = sqrt(exp(19.9 t^2 / 2 + 0.1 t) - 1), inverted by bisection
            lo, hi = 0.0, 2.0
            for _ in range(200):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if math.sqrt(math.exp(19.9 * mid**2 / 2 + 0.1 * mid) - 1) < s else (lo, mid)
            c_in, c_noise = 1 / math.sqrt(s**2 + 1), 999 * lo
        assert seen["c_noise"][b].item() == pytest.approx(c_noise, rel=1e-6, abs=1e-6)
        torch.testing.assert_close(seen["x_in"][b], c_in * x[b].double(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ model
def test_logits_shape_batch_independence_and_gradient():
    disc = tiny_disc().eval()
    x = torch.randn(5, 1, 16, 16)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    logits = disc(x, sigma).logits
    assert logits.shape == (5,) and logits.dtype == torch.float32
    alone = disc(x[2:3], sigma[2:3]).logits
    torch.testing.assert_close(alone, logits[2:3], rtol=1e-5, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(xg, sigma).logits.sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # sigma conditions the output (the noise embedding is used)
    assert not torch.allclose(disc(x, 0.01).logits, disc(x, 50.0).logits)


def test_save_load_roundtrip_same_logits(tmp_path):
    disc = tiny_disc(pool="mean").eval()
    disc.save_pretrained(tmp_path / "d")
    assert (tmp_path / "d" / "diffusion_pytorch_model.safetensors").is_file()
    again = EchoDiffDiscriminator.from_pretrained(tmp_path / "d").eval()
    x = torch.randn(3, 1, 16, 16)
    # same weights; only float rounding may differ (kernels can depend on tensor memory alignment)
    torch.testing.assert_close(disc(x, 0.7).logits, again(x, 0.7).logits, rtol=1e-6, atol=1e-7)
    assert again.config.pool == "mean"


def test_discriminator_logits_accepts_tensor_tuple_and_output():
    t = torch.tensor([[0.5], [-1.0]])
    for out in (t, (t,), tiny_disc().eval()(torch.zeros(2, 1, 16, 16), 1.0)):
        assert discriminator_logits(out).shape == (2,)
    with pytest.raises(TypeError, match="logits"):
        discriminator_logits("nope")


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="feature_source"):
        EchoDiffDiscriminator(feature_source="resnet")
    with pytest.raises(ValueError, match="preconditioning"):
        EchoDiffDiscriminator(preconditioning="ddpm")
    with pytest.raises(ValueError, match="for_unet"):
        EchoDiffDiscriminator(feature_source="unet")
    with pytest.raises(ValueError, match="divisible"):
        EchoDiffDiscriminator(sample_size=20, channel_mult=(1, 2, 2, 2))
    disc = tiny_disc()
    with pytest.raises(ValueError, match="sigma must be a scalar or have one value per sample"):
        disc(torch.zeros(3, 1, 16, 16), torch.ones(2))
    with pytest.raises(ValueError, match="sample must be"):
        disc(torch.zeros(1, 16, 16), 1.0)


# ------------------------------------------------------------------ frozen UNet-encoder variant
def test_unet_encoder_variant_uses_frozen_encoder_and_saves_only_its_head(tmp_path):
    unet = tiny_adm_unet()
    decoder_calls = []
    unet.dec[list(unet.dec.keys())[0]].register_forward_hook(lambda *a: decoder_calls.append(1))
    disc = build_discriminator("unet-encoder", resolution=16, channels=1, unet=unet, tiny=True).eval()
    cfg = disc.config
    assert cfg.feature_source == "unet" and cfg.unet_feature_module == "enc." + list(unet.enc.keys())[-1]
    assert (cfg.feature_channels, cfg.feature_resolution) == (16, 8)  # tiny ADM: 8 * mult 2 at 16 / 2
    assert not any(p.requires_grad for p in unet.parameters())
    x = torch.randn(4, 1, 16, 16, requires_grad=True)
    logits = disc(x, torch.full((4,), 0.5)).logits
    (grad,) = torch.autograd.grad(logits.sum(), x)
    assert grad.abs().sum() > 0  # guidance gradient flows through the frozen encoder
    assert decoder_calls == []  # the UNet's decoder never runs
    unet_param_ids = {id(p) for p in unet.parameters()}
    assert not any(id(p) in unet_param_ids for p in disc.parameters())

    disc.save_pretrained(tmp_path / "d")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "d" / "diffusion_pytorch_model.safetensors")).keys()
    assert keys and not any(k.startswith(("enc.", "dec.", "unet")) for k in keys)
    loaded = EchoDiffDiscriminator.from_pretrained(tmp_path / "d").eval()
    with pytest.raises(RuntimeError, match="bind_unet"):
        loaded(x, 0.5)
    loaded.bind_unet(unet)
    torch.testing.assert_close(loaded(x.detach(), 0.5).logits, disc(x.detach(), 0.5).logits, rtol=1e-6, atol=1e-7)
    other = tiny_adm_unet()
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="different UNet"):
        loaded.bind_unet(other)

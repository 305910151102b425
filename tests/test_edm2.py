"""EDM2's UNet: parameter counts equal to NVlabs edm2's, the magnitude-preserving primitives against their
defining properties, forced weight normalisation, the uncertainty-weighted loss, the edm2 recipe."""

import math

import pytest
import torch

from pipelines.components import unet_edm2 as mp
from pipelines.components.preconditioning import EDMPreconditioning
from pipelines.losses import DenoisingLoss
from pipelines.networks import ARCHITECTURES, build_network, tiny_config
from pipelines.training.config import ConfigError, config_from_cli_args, config_to_cli_args
from pipelines.training.step import learning_rate

# Counted with NVlabs edm2's own training/networks_edm2.py (Precond: UNet + logvar head) at 64x64,
# presets edm2-img64-{xs,s,m,l,xl} (model_channels 128 ... 384), unconditional unless stated.
EDM2_COUNTS = {
    ("edm2-xs", 1): 124_194_341, ("edm2-xs", 3): 124_198_949,
    ("edm2-s", 1): 279_434_469, ("edm2-s", 3): 279_441_381,
    ("edm2-m", 1): 496_769_957, ("edm2-m", 3): 496_779_173,
    ("edm2-l", 1): 776_200_805, ("edm2-l", 3): 776_212_325,
    ("edm2-xl", 1): 1_117_727_013, ("edm2-xl", 3): 1_117_740_837,
}
EDM2_XS_IMAGENET = 124_710_949  # 3 channels, 1000 classes: EDM2's published "125M" XS


def count(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("arch,channels", sorted(EDM2_COUNTS))
def test_parameter_counts_equal_edm2s(arch, channels):
    with torch.device("meta"):
        net = build_network(arch, resolution=64, channels=channels)
    assert count(net) == EDM2_COUNTS[(arch, channels)]
    if channels == 1:
        assert ARCHITECTURES[arch].num_parameters == EDM2_COUNTS[(arch, 1)]


def test_class_conditional_count_equals_edm2s():
    with torch.device("meta"):
        assert count(build_network("edm2-xs", channels=3, label_dim=1000)) == EDM2_XS_IMAGENET


def unit_normal(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_mp_silu_sum_and_cat_keep_unit_variance():
    x = unit_normal(2_000_000)
    assert mp.mp_silu(x).square().mean().item() == pytest.approx(1.0, rel=2e-3)
    a, b = unit_normal(1_000_000, seed=1), unit_normal(1_000_000, seed=2)
    for t in (0.3, 0.5, 0.9):
        assert mp.mp_sum(a, b, t).var().item() == pytest.approx(1.0, rel=5e-3)
    a, b = unit_normal(4000, 8, 4, 4, seed=3), unit_normal(4000, 24, 4, 4, seed=4)
    for t in (0.25, 0.5):
        out = mp.mp_cat(a, b, dim=1, t=t)
        assert out.shape[1] == 32
        assert out.square().mean().item() == pytest.approx(1.0, rel=5e-3)
        # b's share of the energy is t^2 / ((1-t)^2 + t^2), whatever the channel counts
        share = out[:, 8:].square().sum() / out.square().sum()
        assert share.item() == pytest.approx(t**2 / ((1 - t) ** 2 + t**2), rel=5e-3)


def test_normalize_and_fourier_features_have_unit_magnitude():
    x = 7 * unit_normal(5, 3, 4, 4).float()
    rms = mp.normalize(x).square().mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.ones(5), rtol=1e-4, atol=0)
    pixel_rms = mp.normalize(x, dim=1).square().mean(dim=1).sqrt()  # pixel norm
    torch.testing.assert_close(pixel_rms, torch.ones(5, 4, 4), rtol=1e-3, atol=0)
    torch.manual_seed(0)
    features = mp.MPFourier(4096)(torch.linspace(-2, 2, 9))
    torch.testing.assert_close(features.square().mean(dim=1), torch.ones(9), rtol=0.06, atol=0)


@pytest.mark.parametrize("kernel", [(), (1, 1)])
def test_mp_conv_maps_unit_variance_to_unit_variance_whatever_the_weight_scale(kernel):
    torch.manual_seed(0)
    layer = mp.MPConv(256, 64, kernel).eval()
    x = unit_normal(4096, 256, *(1 for _ in kernel)).float()
    y = layer(x)
    # each output is a unit-norm combination of independent unit-variance inputs
    assert y.var().item() == pytest.approx(1.0, rel=0.03)
    with torch.no_grad():
        layer.weight.mul_(7.0)
    # equal up to EDM2's eps = 1e-4 on the (unit-RMS) weight norm
    torch.testing.assert_close(layer(x), y, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(layer(x, gain=0.25), 0.25 * layer(x), rtol=1e-5, atol=1e-6)


def test_forced_weight_normalisation_renormalises_the_stored_weight_while_training():
    torch.manual_seed(0)
    layer = mp.MPConv(16, 8, (3, 3))
    x = torch.randn(4, 16, 8, 8)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.5)
    layer(x).square().mean().backward()
    optimizer.step()
    row_rms = layer.weight.detach().square().mean(dim=(1, 2, 3)).sqrt()
    assert (row_rms - 1).abs().max() > 0.05  # Adam's step moved the weight off the unit sphere ...
    layer.eval()
    before = layer.weight.detach().clone()
    eval_out = layer(x)
    assert torch.equal(layer.weight, before)  # ... evaluation leaves it there ...
    layer.train()
    train_out = layer(x)  # ... and the next training forward puts it back
    row_rms = layer.weight.detach().square().mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(row_rms, torch.ones(8), rtol=1e-4, atol=0)
    torch.testing.assert_close(train_out, eval_out, rtol=1e-4, atol=1e-5)


def tiny_edm2(channels=1, label_dim=0, **overrides):
    torch.manual_seed(0)
    return build_network("edm2-xs", channels=channels, label_dim=label_dim, dropout=0.0,
                         **{**tiny_config("edm2-xs"), **overrides})


def test_network_starts_at_zero_output_and_has_no_biases_or_norms():
    net = tiny_edm2(channels=3, label_dim=4).eval()
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([0.1, -1.0]), class_labels=torch.eye(4)[:2], return_logvar=True)
    assert out.sample.shape == x.shape and torch.count_nonzero(out.sample) == 0  # out_gain starts at 0
    assert out.logvar.shape == (2, 1, 1, 1)
    assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for m in net.modules())
    assert not any(name.endswith("bias") for name, _ in net.named_parameters())
    assert net(x, 0.3, class_labels=torch.eye(4)[:2], return_dict=False)[0].shape == x.shape


def test_uncertainty_loss_is_edm2s_equation():
    """EDM2 Eq. 21 per pixel: weight(sigma) / exp(u(sigma)) * (D - y)^2 + u(sigma), with EDM's weight."""
    net = tiny_edm2()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    net.eval()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    pre = EDMPreconditioning("edm")
    loss, sigma = DenoisingLoss(pre, P_mean=-0.8, P_std=1.6, uncertainty=True)(
        net, images, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    plain, sigma_plain = DenoisingLoss(pre, P_mean=-0.8, P_std=1.6)(
        net, images, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    assert torch.equal(sigma, sigma_plain)
    u = net.logvar(sigma.log() / 4).double()
    assert u.abs().max() > 0.01  # a head that does something
    torch.testing.assert_close(loss.double(), plain.double() / u.exp() + u, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="uncertainty head"):
        DenoisingLoss(pre, uncertainty=True)(build_network("ddpmpp", **tiny_config("ddpmpp")), images)


def test_edm2_recipe_fills_unset_settings_and_explicit_flags_win(tmp_path):
    base = ["--dataset", "d", "--output_dir", str(tmp_path), "--arch", "edm2-m", "--recipe", "edm2"]
    cfg = config_from_cli_args(base)
    assert (cfg.lr, cfg.dropout, cfg.batch_size, cfg.lr_ref_batches, cfg.lr_rampup_kimg) == (0.009, 0.1, 2048, 35000,
                                                                                            10000)
    assert (cfg.p_mean, cfg.p_std, cfg.adam_beta1, cfg.adam_beta2) == (-0.8, 1.6, 0.9, 0.99)
    assert cfg.phema and cfg.phema_std == (0.05, 0.1) and cfg.ema_rampup_ratio is None
    assert cfg.duration_nimg == 2048 << 20
    # EDM's default values given explicitly are kept, and the CLI round trip keeps them.
    explicit = config_from_cli_args(base + ["--lr", "0.001", "--dropout", "0.05", "--no_phema"])
    assert (explicit.lr, explicit.dropout, explicit.phema) == (0.001, 0.05, False)
    for c in (cfg, explicit):
        assert config_from_cli_args(config_to_cli_args(c)) == c
    assert config_from_cli_args(base[:6]).lr == 1e-3  # recipe edm: nothing changes
    with pytest.raises(ConfigError, match="--recipe edm2: expected --arch"):
        config_from_cli_args(base[:5] + ["adm", "--recipe", "edm2"])


def test_learning_rate_decay_closed_form(tmp_path):
    cfg = config_from_cli_args(["--dataset", "d", "--output_dir", str(tmp_path), "--arch", "edm2-xs", "--recipe",
                                "edm2", "--batch_size", "8", "--lr_ref_batches", "10", "--lr_rampup_kimg", "0.04"])
    assert learning_rate(cfg, 0) == 0.0
    assert learning_rate(cfg, 20) == pytest.approx(0.012 * 0.5)  # ramp-up half way, no decay yet (< 80 images)
    assert learning_rate(cfg, 80) == pytest.approx(0.012)
    assert learning_rate(cfg, 320) == pytest.approx(0.012 / math.sqrt(4))  # 40 steps = 4 x 10 reference batches

"""DenoisingLoss: weights, noise-level distributions, and the loss as the weighted error of D."""

import math

import pytest
import torch

from pipelines.components.preconditioning import EDMPreconditioning
from pipelines.losses import DenoisingLoss
from pipelines.networks import build_network, tiny_config


class _RecordingNet(torch.nn.Module):
    """A fixed nonlinear F(x, c_noise) that records its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))
        self.inputs = []

    def forward(self, x, c_noise, class_labels=None):
        self.inputs.append((x.detach().clone(), c_noise.detach().clone()))
        return torch.tanh(self.scale * x) + 0.1 * c_noise.reshape(-1, 1, 1, 1)


def test_weights_match_table_values():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    edm = DenoisingLoss("edm").weight(sigma)
    # (sigma^2 + 0.25) / (0.5 sigma)^2 by hand: 0.5 / 0.0625 = 8 at sigma 0.5, 1.25 / 0.25 = 5 at sigma 1.
    assert edm[1].item() == pytest.approx(0.5 / 0.0625) and edm[2].item() == pytest.approx(1.25 / 0.25)
    _, c_out, _, _ = EDMPreconditioning("edm").coefficients(sigma)
    torch.testing.assert_close(edm, 1 / c_out**2, rtol=1e-12, atol=0)  # EDM's weight is 1 / c_out^2
    for kind in ("vp", "ve"):
        torch.testing.assert_close(DenoisingLoss(kind).weight(sigma), 1 / sigma**2)


@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
def test_loss_is_weighted_squared_error_of_the_denoiser(kind):
    loss_fn = DenoisingLoss(kind)
    net = _RecordingNet()
    images = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss, sigma = loss_fn(net, images, generator=torch.Generator().manual_seed(1))
    assert loss.shape == images.shape and sigma.shape == (64,) and loss.dtype == torch.float32

    (net_input, c_noise), = net.inputs
    c_skip, c_out, c_in, c_noise_ref = (c.float() for c in loss_fn.preconditioning.coefficients(sigma.double()))
    view = (-1, 1, 1, 1)
    noisy = net_input / c_in.view(view)  # the network saw c_in (y + n)
    noise = (noisy - images) / sigma.view(view)
    assert abs(noise.mean().item()) < 0.1 and noise.std().item() == pytest.approx(1.0, abs=0.1)
    torch.testing.assert_close(c_noise, c_noise_ref)
    with torch.no_grad():
        denoised = c_skip.view(view) * noisy + c_out.view(view) * net(net_input, c_noise)
    expected = loss_fn.weight(sigma).view(view) * (denoised - images) ** 2
    torch.testing.assert_close(loss, expected, rtol=2e-4, atol=1e-5)

    if kind == "edm":  # EDM: the loss is the plain squared error of F against its effective target
        target = (images - c_skip.view(view) * noisy) / c_out.view(view)
        with torch.no_grad():
            f_error = (net(net_input, c_noise) - target) ** 2
        torch.testing.assert_close(loss, f_error, rtol=2e-3, atol=1e-4)


def test_edm_sigma_is_log_normal():
    sigma = DenoisingLoss("edm", P_mean=-1.2, P_std=1.2).sample_sigma(40_000, torch.Generator().manual_seed(0))
    log_sigma = sigma.double().log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=5 * 1.2 / math.sqrt(40_000))
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)


def test_vp_time_is_uniform_and_ve_sigma_log_uniform():
    n = 40_000
    vp = DenoisingLoss("vp")
    t = vp.preconditioning.vp_sigma_inv(vp.sample_sigma(n, torch.Generator().manual_seed(0)).double())
    assert t.min().item() >= 1e-5 - 1e-7 and t.max().item() <= 1 + 1e-6
    # U(eps, 1): mean (1 + eps) / 2, and the deciles at 0.1, ..., 0.9.
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    deciles = torch.quantile(t.float(), torch.linspace(0.1, 0.9, 9))
    torch.testing.assert_close(deciles, torch.linspace(0.1, 0.9, 9), rtol=0, atol=0.015)

    ve = DenoisingLoss("ve", ve_sigma_min=0.02, ve_sigma_max=100)
    log_sigma = ve.sample_sigma(n, torch.Generator().manual_seed(1)).double().log()
    lo, hi = math.log(0.02), math.log(100)
    assert log_sigma.min().item() >= lo - 1e-6 and log_sigma.max().item() <= hi + 1e-6
    fractions = ((log_sigma - lo) / (hi - lo)).float()
    torch.testing.assert_close(torch.quantile(fractions, torch.linspace(0.1, 0.9, 9)), torch.linspace(0.1, 0.9, 9),
                               rtol=0, atol=0.015)


def test_generator_makes_the_loss_reproducible_and_trains_a_real_network():
    net = build_network("ddpmpp", **tiny_config("ddpmpp"))
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    loss_fn = DenoisingLoss(EDMPreconditioning("edm"))
    net.eval()  # no dropout, so two calls with the same generator agree exactly
    first, sigma_first = loss_fn(net, images, generator=torch.Generator().manual_seed(5))
    second, sigma_second = loss_fn(net, images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second) and torch.equal(sigma_first, sigma_second)
    first.mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
def test_a_list_of_generators_draws_each_images_sigma_then_noise_from_its_own(kind):
    loss_fn = DenoisingLoss(kind)
    images = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def generators():
        return [torch.Generator().manual_seed(100 + i) for i in range(4)]

    net = _RecordingNet()
    loss, sigma = loss_fn(net, images, generator=generators())
    (net_input, _), = net.inputs
    c_in = loss_fn.preconditioning.coefficients(sigma.double())[2].float().view(-1, 1, 1, 1)
    noise = (net_input / c_in - images) / sigma.view(-1, 1, 1, 1)
    for i, generator in enumerate(generators()):
        # Image i: its sigma (the loss's own distribution, one draw), then its noise, from generator i ...
        assert torch.equal(sigma[i:i + 1], loss_fn.sample_sigma(1, generator))
        torch.testing.assert_close(noise[i:i + 1], torch.randn(1, 1, 4, 4, generator=generator), rtol=1e-4, atol=1e-4)
        # ... so alone it gets the same sigma and loss as in the batch.
        alone, sigma_alone = loss_fn(_RecordingNet(), images[i:i + 1], generator=[generators()[i]])
        assert torch.equal(sigma_alone, sigma[i:i + 1])
        torch.testing.assert_close(alone, loss[i:i + 1], rtol=1e-6, atol=0)
    assert len(set(sigma.tolist())) == 4  # the generators really differ
    with pytest.raises(ValueError, match="generator: expected one torch.Generator or a list of 4"):
        loss_fn(_RecordingNet(), images, generator=generators()[:3])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        DenoisingLoss("flow")
    with pytest.raises(ValueError, match="P_std"):
        DenoisingLoss("edm", P_std=0)
    with pytest.raises(ValueError, match="ve_sigma"):
        DenoisingLoss("ve", ve_sigma_min=1.0, ve_sigma_max=0.1)
    with pytest.raises(ValueError, match="images"):
        DenoisingLoss("edm")(_RecordingNet(), torch.zeros(2, 1, 4, 4, dtype=torch.uint8))

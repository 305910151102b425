"""EDMPreconditioning: Table 1 coefficients, EDM's unit-variance property, VP sigma(t), supported ranges, denoise."""

import math

import pytest
import torch

from pipelines.components.preconditioning import EDMPreconditioning

SD = 0.5  # sigma_data


@pytest.mark.parametrize(
    "sigma, expected",
    [  # (c_skip, c_out, c_in, c_noise) worked out by hand from Table 1 with sigma_data 0.5
        (0.5, (0.25 / 0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5), math.log(0.5) / 4)),
        (2.0, (0.25 / 4.25, 1.0 / math.sqrt(4.25), 1 / math.sqrt(4.25), math.log(2.0) / 4)),
        (0.002, (0.25 / 0.250004, 0.001 / math.sqrt(0.250004), 1 / math.sqrt(0.250004), math.log(0.002) / 4)),
        (80.0, (0.25 / 6400.25, 40.0 / math.sqrt(6400.25), 1 / math.sqrt(6400.25), math.log(80.0) / 4)),
    ],
)
def test_edm_coefficients_match_hand_values(sigma, expected):
    got = EDMPreconditioning("edm").coefficients(sigma)
    for value, want in zip(got, expected):
        assert float(value) == pytest.approx(want, rel=1e-12)


def test_vp_and_ve_coefficients_match_hand_values():
    # VP at sigma = 1: t solves 19.9/2 t^2 + 0.1 t = ln 2 (sigma^2 + 1 = 2), the positive root of the quadratic.
    t_at_1 = (-0.1 + math.sqrt(0.1**2 + 4 * (19.9 / 2) * math.log(2))) / (2 * (19.9 / 2))
    c_skip, c_out, c_in, c_noise = EDMPreconditioning("vp").coefficients(1.0)
    assert (float(c_skip), float(c_out), float(c_in)) == pytest.approx((1.0, -1.0, 1 / math.sqrt(2)), rel=1e-12)
    assert float(c_noise) == pytest.approx(999 * t_at_1, rel=1e-10)
    assert t_at_1 == pytest.approx(0.25896, abs=1e-5)

    c_skip, c_out, c_in, c_noise = EDMPreconditioning("ve").coefficients(torch.tensor([2.0, 10.0], dtype=torch.float64))
    assert c_skip.tolist() == [1.0, 1.0] and c_in.tolist() == [1.0, 1.0]
    assert c_out.tolist() == [2.0, 10.0]
    assert c_noise.tolist() == pytest.approx([0.0, math.log(5.0)], abs=1e-12)


def test_edm_effective_target_has_unit_variance_numerically():
    pre = EDMPreconditioning("edm", sigma_data=SD)
    sigma = torch.logspace(-3, 2, 200, dtype=torch.float64)
    c_skip, c_out, c_in, _ = pre.coefficients(sigma)
    lhs = (1 - c_skip) ** 2 * SD**2 + c_skip**2 * sigma**2
    torch.testing.assert_close(lhs, c_out**2, rtol=1e-12, atol=0)
    # c_in normalises the network input: Var(c_in (y + n)) = c_in^2 (sd^2 + sigma^2) = 1.
    torch.testing.assert_close(c_in**2 * (SD**2 + sigma**2), torch.ones_like(sigma), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 50.0])
def test_edm_effective_target_has_unit_variance_on_sampled_data(sigma):
    pre = EDMPreconditioning("edm", sigma_data=SD)
    generator = torch.Generator().manual_seed(1)
    n = 200_000
    y = SD * torch.randn(n, generator=generator, dtype=torch.float64)
    noise = sigma * torch.randn(n, generator=generator, dtype=torch.float64)
    c_skip, c_out, c_in, _ = pre.coefficients(sigma)
    target = (y - c_skip * (y + noise)) / c_out
    tolerance = 5 * math.sqrt(2 / n)  # five standard errors of a sample variance of N(0, 1) data
    assert float(target.var()) == pytest.approx(1.0, abs=tolerance)
    assert float((c_in * (y + noise)).var()) == pytest.approx(1.0, abs=tolerance)


def test_vp_sigma_inverse_round_trip_and_supported_range():
    pre = EDMPreconditioning("vp")
    t = torch.linspace(1e-5, 1.0, 1001, dtype=torch.float64)
    torch.testing.assert_close(pre.vp_sigma_inv(pre.vp_sigma(t)), t, rtol=1e-9, atol=1e-12)
    sigma = torch.logspace(-3, 2, 101, dtype=torch.float64)
    torch.testing.assert_close(pre.vp_sigma(pre.vp_sigma_inv(sigma)), sigma, rtol=1e-9, atol=0)
    # sigma(t) = sqrt(exp(19.9/2 t^2 + 0.1 t) - 1), by hand at t = 1 and t = 1e-5.
    assert pre.sigma_max == pytest.approx(math.sqrt(math.exp(9.95 + 0.1) - 1), rel=1e-12)
    assert pre.sigma_max == pytest.approx(152.17, abs=0.01)
    assert pre.sigma_min == pytest.approx(math.sqrt(math.expm1(9.95e-10 + 1e-6)), rel=1e-9)
    assert pre.sigma_min == pytest.approx(0.001, rel=1e-3)


def test_supported_ranges_per_kind():
    assert (EDMPreconditioning("edm").sigma_min, EDMPreconditioning("edm").sigma_max) == (0.0, math.inf)
    assert (EDMPreconditioning("ve").sigma_min, EDMPreconditioning("ve").sigma_max) == (0.02, 100.0)


class _RecordingNet(torch.nn.Module):
    """F(x, c_noise) = w * x + c_noise (per sample), in ``dtype``; records what it was given."""

    def __init__(self, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.75, dtype=dtype))
        self.calls = []

    def forward(self, x, c_noise, class_labels=None):
        self.calls.append((x, c_noise, class_labels))
        return self.w * x + c_noise.to(x.dtype).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
@pytest.mark.parametrize("net_dtype", [torch.float32, torch.bfloat16])
def test_denoise_combines_network_output_in_float32(kind, net_dtype):
    pre = EDMPreconditioning(kind)
    net = _RecordingNet(net_dtype)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 1.0, 20.0])
    labels = torch.ones(3, 2)
    denoised = pre.denoise(net, x, sigma, class_labels=labels)

    assert denoised.dtype == torch.float32 and denoised.shape == x.shape
    (net_input, c_noise, passed_labels), = net.calls
    assert net_input.dtype == net_dtype and c_noise.shape == (3,)
    assert passed_labels is labels
    c_skip, c_out, c_in, c_noise_ref = (c.float() for c in pre.coefficients(sigma.double()))
    view = (-1, 1, 1, 1)
    torch.testing.assert_close(net_input.float(), (c_in.view(view) * x).to(net_dtype).float())
    torch.testing.assert_close(c_noise, c_noise_ref)
    network_output = net(net_input, c_noise).float()  # the stub's own output for the input it was given
    expected = c_skip.view(view) * x + c_out.view(view) * network_output
    torch.testing.assert_close(denoised, expected, rtol=1e-6, atol=1e-6)


def test_denoise_broadcasts_a_scalar_sigma_and_rejects_a_wrong_count():
    pre = EDMPreconditioning("edm")
    x = torch.randn(4, 1, 2, 2)
    plain_callable = lambda x_in, c_noise: torch.zeros_like(x_in)  # noqa: E731 - F = 0 gives D = c_skip x
    c_skip = float(pre.coefficients(0.7)[0])
    torch.testing.assert_close(pre.denoise(plain_callable, x, 0.7), c_skip * x)
    torch.testing.assert_close(pre.denoise(plain_callable, x, torch.tensor(0.7)), c_skip * x)
    with pytest.raises(ValueError, match="sigma"):
        pre.denoise(plain_callable, x, torch.ones(3))


def test_bad_preconditioning_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        EDMPreconditioning("karras")
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPreconditioning("edm", sigma_data=0.0)
    with pytest.raises(ValueError, match="ve_sigma_max"):
        EDMPreconditioning("ve", ve_sigma_min=1.0, ve_sigma_max=0.5)

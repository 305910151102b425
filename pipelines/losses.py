"""Denoising score matching losses of EDM (Karras et al. 2022, section 5 and Table 1).

One loss per preconditioning, each the per-pixel weighted squared error of the denoiser D:
``weight(sigma) * (D(y + n; sigma) - y)^2`` with n ~ N(0, sigma^2 I).

* edm: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2 (= 1 / c_out^2).
* vp:  t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1 / sigma^2.
* ve:  sigma log-uniform in [ve_sigma_min, ve_sigma_max], weight 1 / sigma^2.

``uncertainty=True`` is EDM2's loss (Karras et al. 2024, Eq. 21): the network's uncertainty head u(sigma)
turns each per-pixel term into ``weight(sigma) / exp(u) * (D - y)^2 + u``, which balances the noise levels'
contributions as training goes (its minimum over u is at u = ln E[weight * (D - y)^2]).
"""

import math
from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from pipelines.components.preconditioning import EDMPreconditioning


class DenoisingLoss:
    """``loss, sigma = DenoisingLoss(pre)(network, images)``: per-pixel loss (B, C, H, W) and sigma (B,).

    ``preconditioning`` is an :class:`EDMPreconditioning` or its kind ("edm", "vp", "ve"); the loss
    follows its kind and uses its denoiser, so training and sampling share one definition of D.
    """

    def __init__(
        self,
        preconditioning: EDMPreconditioning | str = "edm",
        P_mean: float = -1.2,
        P_std: float = 1.2,
        ve_sigma_min: float = 0.02,
        ve_sigma_max: float = 100.0,
        uncertainty: bool = False,
    ):
        if isinstance(preconditioning, str):
            preconditioning = EDMPreconditioning(kind=preconditioning)
        if not isinstance(preconditioning, EDMPreconditioning):
            raise TypeError(
                f"preconditioning must be an EDMPreconditioning or one of 'edm', 'vp', 've', got {type(preconditioning)}"
            )
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std!r}")
        if not 0 < ve_sigma_min < ve_sigma_max:
            raise ValueError(f"need 0 < ve_sigma_min < ve_sigma_max, got {ve_sigma_min!r}, {ve_sigma_max!r}")
        self.preconditioning = preconditioning
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.ve_sigma_min = float(ve_sigma_min)
        self.ve_sigma_max = float(ve_sigma_max)
        self.uncertainty = bool(uncertainty)

    @property
    def kind(self) -> str:
        return self.preconditioning.kind

    def sample_sigma(self, batch_size: int, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                     device: str | torch.device | None = None) -> torch.Tensor:
        """Training noise levels (B,) float32, drawn from this loss's distribution.

        ``generator``: one generator for the batch, or a list of ``batch_size`` generators (image i draws its
        sigma from generator i, so an image's draw does not depend on the batch it is in).
        """
        device = torch.device(device or "cpu")
        if isinstance(generator, (list, tuple)):
            _check_generators(generator, batch_size)
            # Each draw and its transform run on the generator's device, one image at a time: the values do
            # not depend on the batch split (a vectorised exp may round differently from a scalar one).
            return torch.cat([self.sample_sigma(1, g, device=g.device) for g in generator]).to(device)
        if self.kind == "edm":
            normal = randn_tensor((batch_size,), generator=generator, device=device, dtype=torch.float64)
            sigma = (normal * self.P_std + self.P_mean).exp()
        else:
            uniform = _rand((batch_size,), generator, device)
            if self.kind == "vp":
                eps_t = self.preconditioning.vp_epsilon_t
                sigma = self.preconditioning.vp_sigma(uniform * (1 - eps_t) + eps_t)
            else:
                log_min, log_max = math.log(self.ve_sigma_min), math.log(self.ve_sigma_max)
                sigma = (log_min + uniform * (log_max - log_min)).exp()
        return sigma.to(torch.float32)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """The loss weight lambda(sigma): (sigma^2 + sd^2)/(sigma sd)^2 for edm, 1/sigma^2 for vp and ve."""
        if self.kind == "edm":
            sd = self.preconditioning.sigma_data
            return (sigma**2 + sd**2) / (sigma * sd) ** 2
        return 1 / sigma**2

    def __call__(self, network, images: torch.Tensor, class_labels: torch.Tensor | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel weighted squared error of D (same shape as ``images``) and the sigmas drawn (B,).

        ``generator``: one generator for the batch, or a list of B generators; with a list, image i draws
        its sigma and then its noise from generator i (training seeds one per image: the same noise in
        any batch split).
        """
        if not torch.is_tensor(images) or images.ndim < 2 or not images.is_floating_point():
            raise ValueError("images must be a float tensor (B, C, H, W) in [-1, 1]")
        images = images.to(torch.float32)
        if isinstance(generator, tuple):
            generator = list(generator)  # randn_tensor takes a list
        sigma = self.sample_sigma(images.shape[0], generator=generator, device=images.device)
        view = (-1,) + (1,) * (images.ndim - 1)
        noise = randn_tensor(images.shape, generator=generator, device=images.device, dtype=torch.float32)
        noisy = images + noise * sigma.reshape(view)
        weight = self.weight(sigma).reshape(view)
        if not self.uncertainty:
            denoised = self.preconditioning.denoise(network, noisy, sigma, class_labels)
            return weight * (denoised - images) ** 2, sigma
        denoised, logvar = self.preconditioning.denoise_with_logvar(network, noisy, sigma, class_labels)
        return weight / logvar.exp() * (denoised - images) ** 2 + logvar, sigma


def _check_generators(generators: Sequence[torch.Generator], batch_size: int) -> None:
    if len(generators) != batch_size or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"generator: expected one torch.Generator or a list of {batch_size} (one per image), "
                         f"got a list of {len(generators)}")


def _rand(shape: tuple[int, ...], generator, device: torch.device) -> torch.Tensor:
    """U(0, 1) float64 with a CPU or device generator (randn_tensor's device rule, for torch.rand)."""
    generator_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=generator_device, dtype=torch.float64).to(device)

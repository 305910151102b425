"""Denoising score matching losses of EDM (Karras et al. 2022, section 5 and Table 1).

One loss per preconditioning, each the per-pixel weighted squared error of the denoiser D:
``weight(sigma) * (D(y + n; sigma) - y)^2`` with n ~ N(0, sigma^2 I).

* edm: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2 (= 1 / c_out^2).
* vp:  t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1 / sigma^2.
* ve:  sigma log-uniform in [ve_sigma_min, ve_sigma_max], weight 1 / sigma^2.
"""

import math

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

    @property
    def kind(self) -> str:
        return self.preconditioning.kind

    def sample_sigma(self, batch_size: int, generator: torch.Generator | None = None,
                     device: str | torch.device | None = None) -> torch.Tensor:
        """Training noise levels (B,) float32, drawn from this loss's distribution."""
        device = torch.device(device or "cpu")
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
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel weighted squared error of D (same shape as ``images``) and the sigmas drawn (B,)."""
        if not torch.is_tensor(images) or images.ndim < 2 or not images.is_floating_point():
            raise ValueError("images must be a float tensor (B, C, H, W) in [-1, 1]")
        images = images.to(torch.float32)
        sigma = self.sample_sigma(images.shape[0], generator=generator, device=images.device)
        view = (-1,) + (1,) * (images.ndim - 1)
        noise = randn_tensor(images.shape, generator=generator, device=images.device, dtype=torch.float32)
        noisy = images + noise * sigma.reshape(view)
        denoised = self.preconditioning.denoise(network, noisy, sigma, class_labels)
        loss = self.weight(sigma).reshape(view) * (denoised - images) ** 2
        return loss, sigma


def _rand(shape: tuple[int, ...], generator, device: torch.device) -> torch.Tensor:
    """U(0, 1) float64 with a CPU or device generator (randn_tensor's device rule, for torch.rand)."""
    generator_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=generator_device, dtype=torch.float64).to(device)

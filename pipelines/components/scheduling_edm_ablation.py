"""EDM's ablation sampler (Karras et al. 2022, Table 1 and Algorithm 1 generalised) as a diffusers scheduler.

The original samplers' choices as options of EDM's Heun/Euler loop: time discretisations ("edm", "vp",
"ve", "iddpm"), noise schedules sigma(t) ("linear", "vp", "ve") and signal scalings s(t) ("none", "vp").
``EDMAblationScheduler(preconditioning="vp", discretization="vp", schedule="vp", scaling="vp")`` samples a
VP model the original VP way. The loop itself is :class:`EDMHeunScheduler`'s; this class supplies the
grid and the ODE in these parameterisations.

Carried by saved pipelines that use it: imports only torch, diffusers, the standard library and its
siblings ``scheduling_edm_heun.py`` and ``preconditioning.py``.
"""

import math

import torch
from diffusers.configuration_utils import register_to_config

from .preconditioning import check_choice, check_positive, vp_sigma, vp_sigma_deriv, vp_sigma_inv
from .scheduling_edm_heun import EDMHeunScheduler, edm_time_steps

DISCRETIZATIONS = ("edm", "vp", "ve", "iddpm")
SCHEDULES = ("linear", "vp", "ve")
SCALINGS = ("none", "vp")


class EDMAblationScheduler(EDMHeunScheduler):
    """EDM's sampler with the original time steps, schedules and scalings (EDM paper, Table 1).

    ``sigma_min`` / ``sigma_max`` default (None) to the discretisation's own range (edm 0.002-80, vp
    sigma(epsilon_s)-sigma(1), ve 0.02-100, iddpm 0.002-81), clipped to what the preconditioning supports.
    The VP discretisation/schedule uses betas refitted to that range, as EDM's ablation sampler does.
    Note: EDM's code takes the VP default range from beta_d 19.1; here it comes from ``vp_beta_d`` (19.9,
    the paper's value): pass ``sigma_max`` to match it.
    """

    @register_to_config
    def __init__(self, preconditioning: str = "edm", sigma_data: float = 0.5, vp_beta_d: float = 19.9,
                 vp_beta_min: float = 0.1, vp_M: int = 1000, vp_epsilon_t: float = 1e-5, ve_sigma_min: float = 0.02,
                 ve_sigma_max: float = 100.0, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = 7.0, discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
                 solver: str = "heun", s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"),
                 s_noise: float = 1.0, epsilon_s: float = 1e-3, iddpm_C1: float = 0.001, iddpm_C2: float = 0.008,
                 iddpm_M: int = 1000):
        check_choice("discretization", discretization, DISCRETIZATIONS)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("scaling", scaling, SCALINGS)
        check_positive(epsilon_s=epsilon_s, iddpm_C1=iddpm_C1, iddpm_M=iddpm_M)
        if not 0 < epsilon_s < 1:
            raise ValueError(f"epsilon_s must be in (0, 1), got {epsilon_s!r}")
        vp_range = (float(vp_sigma(epsilon_s, vp_beta_d, vp_beta_min)), float(vp_sigma(1.0, vp_beta_d, vp_beta_min)))
        default_min, default_max = {"edm": (0.002, 80.0), "vp": vp_range, "ve": (0.02, 100.0),
                                    "iddpm": (0.002, 81.0)}[discretization]
        self._setup(default_min if sigma_min is None else sigma_min, default_max if sigma_max is None else sigma_max)

    # ----- time discretisation --------------------------------------------------------------------------

    def _fitted_vp_betas(self) -> tuple[float, float]:
        """VP (beta_d, beta_min) whose sigma(epsilon_s) and sigma(1) are this sampler's sigma_min and sigma_max."""
        eps = self.config.epsilon_s
        log_max = math.log1p(self.sigma_max**2)
        beta_d = 2 * (math.log1p(self.sigma_min**2) / eps - log_max) / (eps - 1)
        return beta_d, log_max - 0.5 * beta_d

    def _iddpm_levels(self) -> torch.Tensor:
        """iDDPM's M+1 noise levels u_0 > ... > u_M = 0 (EDM paper, Table 1)."""
        M, C1, C2 = self.config.iddpm_M, self.config.iddpm_C1, self.config.iddpm_C2
        j = torch.arange(M + 1, dtype=torch.float64)
        alpha_bar = torch.sin(0.5 * math.pi * j / (M * (C2 + 1))) ** 2
        u = torch.zeros(M + 1, dtype=torch.float64)
        for k in range(M, 0, -1):  # a recursion: u_{k-1} depends on u_k
            u[k - 1] = ((u[k] ** 2 + 1) / (alpha_bar[k - 1] / alpha_bar[k]).clamp(min=C1) - 1).sqrt()
        return u

    def discretization_sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The N noise levels sigma_0 > ... > sigma_{N-1} of the configured discretisation (float64, no final 0)."""
        n = int(num_inference_steps)
        if n < 2:
            raise ValueError(f"num_inference_steps must be >= 2, got {num_inference_steps!r}")
        i = torch.arange(n, dtype=torch.float64)
        sigma_min, sigma_max = self.sigma_min, self.sigma_max
        kind = self.config.discretization
        if kind == "edm":
            return edm_time_steps(n, sigma_min, sigma_max, self.config.rho)
        if kind == "vp":
            return vp_sigma(1 + i / (n - 1) * (self.config.epsilon_s - 1), *self._fitted_vp_betas())
        if kind == "ve":
            return (sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (i / (n - 1))).sqrt()
        u = self._iddpm_levels()
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        if len(u) < n:
            raise ValueError(f"the iddpm discretisation has only {len(u)} levels in range, asked for {n} steps")
        return u[torch.floor((len(u) - 1) / (n - 1) * i + 0.5).to(torch.int64)]

    def time_steps(self, num_inference_steps: int) -> list[float]:
        return [self.time_of_sigma(float(s)) for s in self.discretization_sigmas(num_inference_steps)] + [0.0]

    # ----- the ODE in the (sigma(t), s(t)) parameterisation, on Python floats -------------------------------

    def sigma(self, t: float) -> float:
        schedule = self.config.schedule
        if schedule == "linear":
            return t
        return math.sqrt(t) if schedule == "ve" else float(vp_sigma(t, *self._fitted_vp_betas()))

    def sigma_deriv(self, t: float) -> float:
        schedule = self.config.schedule
        if schedule == "linear":
            return 1.0
        return 0.5 / math.sqrt(t) if schedule == "ve" else float(vp_sigma_deriv(t, *self._fitted_vp_betas()))

    def time_of_sigma(self, sigma: float) -> float:
        schedule = self.config.schedule
        if schedule == "linear":
            return sigma
        return sigma**2 if schedule == "ve" else float(vp_sigma_inv(sigma, *self._fitted_vp_betas()))

    def scale(self, t: float) -> float:
        return 1.0 if self.config.scaling == "none" else 1 / math.sqrt(1 + self.sigma(t) ** 2)

    def scale_deriv(self, t: float) -> float:
        return 0.0 if self.config.scaling == "none" else -self.sigma(t) * self.sigma_deriv(t) * self.scale(t) ** 3

    def churned_time(self, t: float, gamma: float) -> float:
        if not gamma or self.config.schedule == "linear":
            return super().churned_time(t, gamma)
        sigma = self.sigma(t)
        return self.time_of_sigma(sigma + gamma * sigma)

    def derivative(self, x: torch.Tensor, denoised: torch.Tensor, t) -> torch.Tensor:
        """dx/dt = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x / s; sigma(t)) (EDM paper, eq. 4)."""
        if self.config.schedule == "linear" and self.config.scaling == "none":
            return super().derivative(x, denoised, t)
        sigma, sigma_deriv, s = self.sigma(t), self.sigma_deriv(t), self.scale(t)
        return (sigma_deriv / sigma + self.scale_deriv(t) / s) * x - (sigma_deriv * s / sigma) * denoised

    @property
    def supports_sample_churn(self) -> bool:
        return self.config.schedule == "linear" and self.config.scaling == "none"

    def add_sample_churn(self, sample, gamma, generator=None):
        if not self.supports_sample_churn:
            raise ValueError("per-sample churn needs EDM's time parameterisation (schedule='linear', scaling='none')")
        return super().add_sample_churn(sample, gamma, generator)

"""EDM preconditioning and EDM's Heun sampler (Karras et al. 2022) as a diffusers scheduler.

* :class:`EDMPreconditioning` turns a raw network F into the denoiser
  D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) for the EDM, VP or VE parameterisation (EDM paper,
  Table 1) and knows the sigma range each one supports. It is the one place of this math: the training
  loss, the scheduler and the pipeline all use it.
* :class:`EDMHeunScheduler` is EDM's deterministic / stochastic sampler (Algorithm 2, with churn), with
  Euler as a first-order option and the ablation sampler's time discretisations ("edm", "vp", "ve",
  "iddpm"), noise schedules sigma(t) ("linear", "vp", "ve") and signal scalings s(t) ("none", "vp").
  ``step()`` consumes the *denoised* estimate D(x; sigma) (an x0-prediction), so it samples with any
  callable D(x, sigma): see :meth:`EDMHeunScheduler.sample`.

Standalone on purpose: this file imports only torch, numpy, diffusers and the standard library, because
a saved EchoDiff pipeline carries it next to its scheduler config for
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .preconditioning import (
    EDMPreconditioning,
    check_choice,
    check_positive,
    vp_sigma,
    vp_sigma_deriv,
    vp_sigma_inv,
)

DISCRETIZATIONS = ("edm", "vp", "ve", "iddpm")
SCHEDULES = ("linear", "vp", "ve")
SCALINGS = ("none", "vp")
SOLVERS = ("heun", "euler")


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample for the next network evaluation (or the final sample);
    ``pred_original_sample``: the denoised estimate that was passed in."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) and its ablation variants.

    One ``step()`` per network evaluation, as diffusers' ``HeunDiscreteScheduler``: ``N`` Heun steps are
    ``2N - 1`` evaluations (no correction on the last step), Euler ``N``. ``timesteps`` holds the noise
    level sigma of each evaluation (float64); ``model_output`` of ``step()`` is the denoised estimate
    D(x; sigma) at ``scale_model_input(sample, t)``.

    Churn (S_churn, S_min, S_max, S_noise) follows Algorithm 2: before step i the sample is lifted from
    t_i to t_hat_i = t_i (1 + gamma_i), gamma_i = min(S_churn/N, sqrt(2)-1) when S_min <= sigma(t_i) <= S_max.
    ``step()`` adds that noise right after finishing step i-1, and the lift of step 0 is folded into
    ``init_noise_sigma`` (x_hat_0 ~ N(0, t_0^2 + S_noise^2 (t_hat_0^2 - t_0^2))), so every network evaluation
    sees exactly the sample Algorithm 2 would (in distribution).

    ``sigma_min`` / ``sigma_max`` default (None) to the discretisation's own range (edm 0.002-80, vp
    sigma(epsilon_s)-sigma(1), ve 0.02-100, iddpm 0.002-81) and are clipped to what the preconditioning
    supports, so VE models sample from 0.02. The VP discretisation/schedule uses betas refitted to that
    range, as EDM's ablation sampler does. Note: EDM's code takes the VP default range from beta_d 19.1;
    here it comes from ``vp_beta_d`` (19.9, the paper's value): pass ``sigma_max`` to match it.
    """

    _compatibles = []
    order = 2

    @register_to_config
    def __init__(
        self,
        preconditioning: str = "edm",
        sigma_data: float = 0.5,
        vp_beta_d: float = 19.9,
        vp_beta_min: float = 0.1,
        vp_M: int = 1000,
        vp_epsilon_t: float = 1e-5,
        ve_sigma_min: float = 0.02,
        ve_sigma_max: float = 100.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho: float = 7.0,
        discretization: str = "edm",
        schedule: str = "linear",
        scaling: str = "none",
        solver: str = "heun",
        s_churn: float = 0.0,
        s_min: float = 0.0,
        s_max: float = float("inf"),
        s_noise: float = 1.0,
        epsilon_s: float = 1e-3,
        iddpm_C1: float = 0.001,
        iddpm_C2: float = 0.008,
        iddpm_M: int = 1000,
    ):
        check_choice("discretization", discretization, DISCRETIZATIONS)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("scaling", scaling, SCALINGS)
        check_choice("solver", solver, SOLVERS)
        check_positive(rho=rho, epsilon_s=epsilon_s, iddpm_C1=iddpm_C1, iddpm_M=iddpm_M, s_noise=s_noise)
        if s_churn < 0:
            raise ValueError(f"s_churn must be >= 0, got {s_churn!r}")
        if not 0 < epsilon_s < 1:
            raise ValueError(f"epsilon_s must be in (0, 1), got {epsilon_s!r}")
        self.preconditioning = EDMPreconditioning(
            kind=preconditioning, sigma_data=sigma_data, vp_beta_d=vp_beta_d, vp_beta_min=vp_beta_min, vp_M=vp_M,
            vp_epsilon_t=vp_epsilon_t, ve_sigma_min=ve_sigma_min, ve_sigma_max=ve_sigma_max,
        )
        self.order = 2 if solver == "heun" else 1
        self.sigma_min, self.sigma_max = self._sigma_range()  # validates the range
        self._sigma_fn, self._sigma_deriv, self._sigma_inv = self._schedule_fns()
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._init_noise_sigma = None
        self._evaluations = None  # (is_first_order, step i) per network evaluation
        self._step_index = None
        self._x_hat = self._d_cur = self._h = None

    # ----- noise level range and time discretisation -------------------------------------------------

    def _sigma_range(self) -> tuple[float, float]:
        config = self.config
        vp_range = (float(vp_sigma(config.epsilon_s, config.vp_beta_d, config.vp_beta_min)),
                    float(vp_sigma(1.0, config.vp_beta_d, config.vp_beta_min)))
        defaults = {"edm": (0.002, 80.0), "vp": vp_range, "ve": (0.02, 100.0), "iddpm": (0.002, 81.0)}
        default_min, default_max = defaults[config.discretization]
        sigma_min = default_min if config.sigma_min is None else float(config.sigma_min)
        sigma_max = default_max if config.sigma_max is None else float(config.sigma_max)
        check_positive(sigma_min=sigma_min, sigma_max=sigma_max)
        sigma_min = max(sigma_min, self.preconditioning.sigma_min)
        sigma_max = min(sigma_max, self.preconditioning.sigma_max)
        if not sigma_max > sigma_min:
            raise ValueError(
                f"sigma range [{sigma_min}, {sigma_max}] is empty after clipping to the {self.preconditioning.kind!r} "
                f"preconditioning's supported range [{self.preconditioning.sigma_min}, {self.preconditioning.sigma_max}]"
            )
        return sigma_min, sigma_max

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
            inv_rho = 1 / self.config.rho
            return (sigma_max**inv_rho + i / (n - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** self.config.rho
        if kind == "vp":
            t = 1 + i / (n - 1) * (self.config.epsilon_s - 1)
            return vp_sigma(t, *self._fitted_vp_betas())
        if kind == "ve":
            t = sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (i / (n - 1))
            return t.sqrt()
        u = self._iddpm_levels()
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        if len(u) < n:
            raise ValueError(f"the iddpm discretisation has only {len(u)} levels in range, asked for {n} steps")
        index = torch.floor((len(u) - 1) / (n - 1) * i + 0.5).to(torch.int64)
        return u[index]

    # ----- noise schedule sigma(t) and scaling s(t), on Python floats (float64) ------------------------

    def _schedule_fns(self) -> tuple[Callable, Callable, Callable]:
        schedule = self.config.schedule
        if schedule == "linear":
            return (lambda t: t), (lambda t: 1.0), (lambda sigma: sigma)
        if schedule == "ve":
            return math.sqrt, (lambda t: 0.5 / math.sqrt(t)), (lambda sigma: sigma**2)
        betas = self._fitted_vp_betas()
        return (lambda t: float(vp_sigma(t, *betas)), lambda t: float(vp_sigma_deriv(t, *betas)),
                lambda sigma: float(vp_sigma_inv(sigma, *betas)))

    def _scale(self, t: float) -> float:
        if self.config.scaling == "none":
            return 1.0
        return 1 / math.sqrt(1 + self._sigma_fn(t) ** 2)

    def _scale_deriv(self, t: float) -> float:
        if self.config.scaling == "none":
            return 0.0
        return -self._sigma_fn(t) * self._sigma_deriv(t) * self._scale(t) ** 3

    # ----- diffusers scheduler API ---------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Prepare the grid for ``num_inference_steps`` steps: ``sigmas`` (N+1, ends in 0) and ``timesteps``."""
        config = self.config
        n = int(num_inference_steps)
        sigma_steps = self.discretization_sigmas(n)
        sigma_inv = self._sigma_inv
        linear = config.schedule == "linear"
        t_steps = [float(s) if linear else sigma_inv(float(s)) for s in sigma_steps] + [0.0]
        gamma_max = min(config.s_churn / n, math.sqrt(2) - 1)
        t_hat = []
        for t in t_steps[:-1]:
            sigma = self._sigma_fn(t)
            gamma = gamma_max if config.s_min <= sigma <= config.s_max else 0.0
            if gamma == 0:
                t_hat.append(t)
            else:
                t_hat.append(t + gamma * t if linear else sigma_inv(sigma + gamma * sigma))
        self._t_steps, self._t_hat = t_steps, t_hat

        heun = config.solver == "heun"
        evaluations, eval_sigmas = [], []
        for i in range(n):
            evaluations.append((True, i))
            eval_sigmas.append(self._sigma_fn(t_hat[i]))
            if heun and i < n - 1:
                evaluations.append((False, i))
                eval_sigmas.append(self._sigma_fn(t_steps[i + 1]))
        self._evaluations = evaluations
        self._eval_t = [t_hat[i] if first else t_steps[i + 1] for first, i in evaluations]
        self.num_inference_steps = n
        self.sigmas = torch.tensor([self._sigma_fn(t) for t in t_steps], dtype=torch.float64, device=device)
        self.timesteps = torch.tensor(eval_sigmas, dtype=torch.float64, device=device)

        sigma_0, sigma_hat_0 = self._sigma_fn(t_steps[0]), self._sigma_fn(t_hat[0])
        self._init_noise_sigma = self._scale(t_hat[0]) * math.sqrt(
            sigma_0**2 + config.s_noise**2 * (sigma_hat_0**2 - sigma_0**2))
        self._step_index = 0
        self._x_hat = self._d_cur = self._h = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial sample x_hat_0 (includes step 0's churn and scaling)."""
        if self._init_noise_sigma is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before reading init_noise_sigma")
        return self._init_noise_sigma

    @property
    def step_index(self) -> int | None:
        """Index of the next network evaluation in ``timesteps``."""
        return self._step_index

    @property
    def current_step(self) -> int | None:
        """The EDM step i (0..N-1) that the next evaluation belongs to (None once sampling is done)."""
        if self._evaluations is None or self._step_index >= len(self._evaluations):
            return None
        return self._evaluations[self._step_index][1]

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step()`` is a first-order (Euler) evaluation at t_hat_i."""
        return self._x_hat is None

    def _check_ready(self) -> tuple[bool, int]:
        if self._evaluations is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step() / scale_model_input()")
        if self._step_index >= len(self._evaluations):
            raise RuntimeError(f"all {len(self._evaluations)} evaluations are done; call set_timesteps again")
        return self._evaluations[self._step_index]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The denoiser's input x / s(t) at the current evaluation (the sample itself unless scaling="vp")."""
        self._check_ready()
        if self.config.scaling == "none":
            return sample
        return sample / self._scale(self._eval_t[self._step_index])

    def _derivative(self, x: torch.Tensor, denoised: torch.Tensor, t: float) -> torch.Tensor:
        """dx/dt of the probability-flow ODE at time t, given D(x / s(t); sigma(t))."""
        if self.config.schedule == "linear" and self.config.scaling == "none":
            return (x - denoised) / t
        sigma, sigma_deriv, s = self._sigma_fn(t), self._sigma_deriv(t), self._scale(t)
        return (sigma_deriv / sigma + self._scale_deriv(t) / s) * x - (sigma_deriv * s / sigma) * denoised

    def _add_churn(self, x: torch.Tensor, i: int, generator) -> torch.Tensor:
        """Lift x_i (at t_i) to x_hat_i (at t_hat_i) with fresh noise, Algorithm 2 lines 5-6."""
        t, t_hat = self._t_steps[i], self._t_hat[i]
        if t_hat == t:
            return x
        sigma, sigma_hat = self._sigma_fn(t), self._sigma_fn(t_hat)
        std = math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * self._scale(t_hat) * self.config.s_noise
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self._scale(t_hat) / self._scale(t) * x + std * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep=None,
        sample: torch.Tensor = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> EDMHeunSchedulerOutput | tuple:
        """Advance by one network evaluation. ``model_output`` is D(x; sigma), the denoised estimate.

        ``generator`` (one, or one per sample) draws the churn noise; ``timestep`` is accepted for
        diffusers' loop convention, the internal evaluation index decides the step.
        """
        if sample is None:
            raise ValueError("step() needs the current sample")
        first_order, i = self._check_ready()
        n = self.num_inference_steps
        if first_order:
            t_hat, t_next = self._t_hat[i], self._t_steps[i + 1]
            h = t_next - t_hat
            d_cur = self._derivative(sample, model_output, t_hat)
            prev_sample = sample + h * d_cur
            step_done = not (self.config.solver == "heun" and i < n - 1)
            if not step_done:  # keep x_hat and d_cur for the correction at t_{i+1}
                self._x_hat, self._d_cur, self._h = sample, d_cur, h
        else:
            d_prime = self._derivative(sample, model_output, self._t_steps[i + 1])
            prev_sample = self._x_hat + self._h * (0.5 * self._d_cur + 0.5 * d_prime)
            self._x_hat = self._d_cur = self._h = None
            step_done = True
        if step_done and i + 1 < n:
            prev_sample = self._add_churn(prev_sample, i + 1, generator)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, model_output)
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, pred_original_sample=model_output)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x0 + sigma * noise, with ``timesteps`` the noise levels sigma (a number or one per sample)."""
        sigma = torch.as_tensor(timesteps, device=original_samples.device).to(original_samples.dtype)
        if sigma.numel() > 1:
            sigma = sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
        return original_samples + sigma * noise

    # ----- plain sampling loop --------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        denoiser: Callable[[torch.Tensor, float], torch.Tensor],
        latents: torch.Tensor | None = None,
        *,
        shape: tuple[int, ...] | None = None,
        num_inference_steps: int = 18,
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """Run the sampler with any callable ``denoiser(x, sigma) -> D(x; sigma)`` (sigma a Python float).

        ``latents``: unit-variance starting noise (drawn with ``generator`` in ``shape`` if None). The loop
        runs in ``dtype`` (float64, as EDM's sampler) and returns the final sample.
        """
        if latents is None:
            if shape is None:
                raise ValueError("sample() needs latents or a shape")
            latents = randn_tensor(tuple(shape), generator=generator, device=torch.device(device or "cpu"),
                                   dtype=torch.float32)
        self.set_timesteps(num_inference_steps, device=latents.device)
        x = latents.to(dtype) * self.init_noise_sigma
        for sigma in self.timesteps.tolist():
            denoised = denoiser(self.scale_model_input(x, sigma), sigma)
            x = self.step(denoised, sigma, x, generator=generator).prev_sample
        return x


"""EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) as a diffusers scheduler.

``step()`` consumes the *denoised* estimate D(x; sigma) (an x0-prediction), so the sampler runs with any
callable D(x, sigma): see :meth:`EDMHeunScheduler.sample`. EDM's ablation sampler (VP / VE / iDDPM time
steps, noise schedules and scalings) lives apart, in ``scheduling_edm_ablation.py``.

Carried by saved pipelines: imports only torch, diffusers, the standard library and its sibling
``preconditioning.py``.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .preconditioning import EDMPreconditioning, check_choice, check_positive

SOLVERS = ("heun", "euler")


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample for the next network evaluation (or the final sample);
    ``pred_original_sample``: the denoised estimate that was passed in."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def edm_time_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM's grid t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N (float64)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    inv_rho = 1 / rho
    return (sigma_max**inv_rho + i / (num_steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    """EDM's Algorithm 2: the rho grid, churn (S_churn, S_min, S_max, S_noise), Heun's 2nd-order correction.

    One ``step()`` per network evaluation, as diffusers' ``HeunDiscreteScheduler``: ``N`` Heun steps are
    ``2N - 1`` evaluations (no correction on the last step), Euler ``N``. ``timesteps`` holds the noise
    level sigma of each evaluation (float64). Before step i the sample is lifted from t_i to
    t_hat_i = t_i (1 + gamma_i), gamma_i = min(S_churn/N, sqrt(2)-1) where S_min <= t_i <= S_max:
    ``step()`` adds that noise right after finishing step i-1, and the lift of step 0 is folded into
    ``init_noise_sigma``. The grid [sigma_min, sigma_max] is clipped to the range the preconditioning
    supports (a VE model samples from 0.02).
    """

    _compatibles = []
    order = 2
    supports_sample_churn = True  # add_sample_churn (DG's per-sample extra churn)

    @register_to_config
    def __init__(self, preconditioning: str = "edm", sigma_data: float = 0.5, vp_beta_d: float = 19.9,
                 vp_beta_min: float = 0.1, vp_M: int = 1000, vp_epsilon_t: float = 1e-5, ve_sigma_min: float = 0.02,
                 ve_sigma_max: float = 100.0, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 solver: str = "heun", s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"),
                 s_noise: float = 1.0):
        self._setup(sigma_min, sigma_max)

    def _setup(self, sigma_min: float, sigma_max: float) -> None:
        """Validation and state shared with the ablation sampler's scheduler."""
        config = self.config
        check_choice("solver", config.solver, SOLVERS)
        check_positive(rho=config.rho, s_noise=config.s_noise)
        if config.s_churn < 0:
            raise ValueError(f"s_churn must be >= 0, got {config.s_churn!r}")
        self.preconditioning = EDMPreconditioning.from_config(config)
        self.sigma_min, self.sigma_max = self.preconditioning.clip_sigma_range(sigma_min, sigma_max)
        self.order = 2 if config.solver == "heun" else 1
        self.num_inference_steps = self.timesteps = self.sigmas = None
        self._step_index = self._init_noise_sigma = None
        self._x_hat = self._d_cur = self._h = None
        self.per_sample_sigma = None  # (B,) t_hat of this step's Euler evaluation after add_sample_churn

    # ----- the grid ------------------------------------------------------------------------------------

    def time_steps(self, num_inference_steps: int) -> list[float]:
        """t_0 > ... > t_{N-1} > t_N = 0 (EDM's time t = sigma)."""
        return edm_time_steps(num_inference_steps, self.sigma_min, self.sigma_max, self.config.rho).tolist() + [0.0]

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Prepare ``sigmas`` (t_0..t_{N-1}, 0) and ``timesteps`` (sigma of each network evaluation)."""
        n = int(num_inference_steps)
        if n < 2:
            raise ValueError(f"num_inference_steps must be >= 2, got {num_inference_steps!r}")
        config = self.config
        t_steps = self.time_steps(n)
        gamma_max = min(config.s_churn / n, math.sqrt(2) - 1)
        gammas = [gamma_max if config.s_min <= self.sigma(t) <= config.s_max else 0.0 for t in t_steps[:-1]]
        self._t, self._t_hat = t_steps, [self.churned_time(t, gamma) for t, gamma in zip(t_steps, gammas)]
        # One evaluation at t_hat_i per step, plus Heun's correction at t_{i+1} on all but the last step.
        heun = config.solver == "heun"
        self._evaluations = [(first, i) for i in range(n) for first in (True, False) if first or (heun and i < n - 1)]
        self._eval_t = [self._t_hat[i] if first else t_steps[i + 1] for first, i in self._evaluations]
        self.num_inference_steps = n
        self.sigmas = torch.tensor([self.sigma(t) for t in t_steps], dtype=torch.float64, device=device)
        self.timesteps = torch.tensor([self.sigma(t) for t in self._eval_t], dtype=torch.float64, device=device)
        sigma_0, sigma_hat_0 = self.sigma(t_steps[0]), self.sigma(self._t_hat[0])
        self._init_noise_sigma = self.scale(self._t_hat[0]) * math.sqrt(
            sigma_0**2 + config.s_noise**2 * (sigma_hat_0**2 - sigma_0**2))
        self._step_index = 0
        self._x_hat = self._d_cur = self._h = self.per_sample_sigma = None

    # EDM's own parameterisation: sigma(t) = t, s(t) = 1 (the ablation sampler generalises these).
    def sigma(self, t: float) -> float:
        return t

    def scale(self, t: float) -> float:
        return 1.0

    def churned_time(self, t: float, gamma: float) -> float:
        """t_hat = the time whose noise level is sigma(t) (1 + gamma)."""
        return t + gamma * t if gamma else t

    def derivative(self, x: torch.Tensor, denoised: torch.Tensor, t) -> torch.Tensor:
        """dx/dt of the probability-flow ODE given D(x; sigma(t)): (x - D) / t (Algorithm 2, line 8)."""
        return (x - denoised) / t

    # ----- diffusers scheduler API ---------------------------------------------------------------------

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial sample (after set_timesteps: with step 0's churn)."""
        return self.sigma_max if self._init_noise_sigma is None else self._init_noise_sigma

    @property
    def step_index(self) -> int | None:
        """Index of the next network evaluation in ``timesteps``."""
        return self._step_index

    @property
    def current_step(self) -> int | None:
        """The EDM step i (0..N-1) the next evaluation belongs to (None before set_timesteps or when done)."""
        if self._step_index is None or self._step_index >= len(self._evaluations):
            return None
        return self._evaluations[self._step_index][1]

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step()`` is a first-order (Euler) evaluation at t_hat_i."""
        return self._x_hat is None

    def _check_ready(self) -> int:
        if self._step_index is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step() / scale_model_input()")
        if self._step_index >= len(self._evaluations):
            raise RuntimeError(f"all {len(self._evaluations)} evaluations are done; call set_timesteps again")
        return self._evaluations[self._step_index][1]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The denoiser's input x / s(t) at the current evaluation (the sample itself: s = 1 here)."""
        self._check_ready()
        scale = self.scale(self._eval_t[self._step_index])
        return sample if scale == 1.0 else sample / scale

    def step(self, model_output: torch.Tensor, timestep=None, sample: torch.Tensor = None,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> EDMHeunSchedulerOutput | tuple:
        """Advance by one network evaluation; ``model_output`` is D(x; sigma), the denoised estimate.

        ``generator`` (one, or one per sample) draws the churn noise; ``timestep`` is accepted for
        diffusers' loop convention, the internal evaluation index decides the step.
        """
        if sample is None:
            raise ValueError("step() needs the current sample")
        i, n = self._check_ready(), self.num_inference_steps
        t_next = self._t[i + 1]
        if self.state_in_first_order:  # Euler step from t_hat_i (lines 7-8)
            t_hat = self._t_hat[i] if self.per_sample_sigma is None else self._per_sample_time(sample)
            self.per_sample_sigma = None
            d_cur = self.derivative(sample, model_output, t_hat)
            prev_sample = sample + (t_next - t_hat) * d_cur
            if self.config.solver == "heun" and i < n - 1:  # kept for the correction at t_{i+1}
                self._x_hat, self._d_cur, self._h = sample, d_cur, t_next - t_hat
        else:  # Heun's correction (lines 9-11)
            d_prime = self.derivative(sample, model_output, t_next)
            prev_sample = self._x_hat + self._h * (0.5 * self._d_cur + 0.5 * d_prime)
            self._x_hat = self._d_cur = self._h = None
        if self.state_in_first_order and i + 1 < n:  # step i is finished: lift to t_hat_{i+1} (lines 5-6)
            prev_sample = self._add_churn(prev_sample, i + 1, generator)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, model_output)
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, pred_original_sample=model_output)

    def _add_churn(self, x: torch.Tensor, i: int, generator) -> torch.Tensor:
        t, t_hat = self._t[i], self._t_hat[i]
        if t_hat == t:
            return x
        sigma, sigma_hat = self.sigma(t), self.sigma(t_hat)
        std = math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * self.scale(t_hat) * self.config.s_noise
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x if self.scale(t_hat) == self.scale(t) else self.scale(t_hat) / self.scale(t) * x
        return x + std * noise

    def add_sample_churn(self, sample: torch.Tensor, gamma: torch.Tensor,
                         generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Extra churn for chosen samples before this step's Euler evaluation: sample b is lifted to
        t_i (1 + gamma_b) where that exceeds t_hat_i (inside the S_min..S_max window), with noise drawn from its
        own generator; the evaluation and the step then use each sample's own t_hat (``per_sample_sigma``)."""
        i = self._check_ready()
        if not self.state_in_first_order:
            raise RuntimeError("add_sample_churn must be called before a step's first (Euler) evaluation")
        t, t_hat = self._t[i], self._t_hat[i]
        if not self.config.s_min <= self.sigma(t) <= self.config.s_max:
            return sample
        target = t * (1 + gamma.to(torch.float64))
        lifted = target > t_hat
        if not bool(lifted.any()):
            return sample
        noise = torch.zeros_like(sample)
        for b in torch.nonzero(lifted).flatten().tolist():  # only the lifted samples draw noise
            gen = generator[b] if isinstance(generator, (list, tuple)) else generator
            noise[b] = torch.randn(sample.shape[1:], generator=gen, device=gen.device if gen is not None else "cpu",
                                   dtype=sample.dtype).to(sample.device)
        view = (-1,) + (1,) * (sample.ndim - 1)
        std = (target**2 - t_hat**2).clamp(min=0).sqrt().to(sample.device)
        self.per_sample_sigma = torch.where(lifted, target, torch.full_like(target, t_hat)).to(sample.device)
        return torch.where(lifted.to(sample.device).reshape(view), sample + std.reshape(view) * noise, sample)

    def _per_sample_time(self, sample: torch.Tensor) -> torch.Tensor:
        return self.per_sample_sigma.to(sample.dtype).reshape((-1,) + (1,) * (sample.ndim - 1))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x0 + sigma * noise, with ``timesteps`` the noise levels sigma (a number or one per sample)."""
        sigma = torch.as_tensor(timesteps, device=original_samples.device).to(original_samples.dtype)
        if sigma.numel() > 1:
            sigma = sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
        return original_samples + sigma * noise

    # ----- plain sampling loop --------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, denoiser: Callable[[torch.Tensor, float], torch.Tensor], latents: torch.Tensor | None = None,
               *, shape: tuple[int, ...] | None = None, num_inference_steps: int = 18,
               generator: torch.Generator | list[torch.Generator] | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
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

"""Samplers by name, and the one adapter between our denoiser D(x; sigma) and diffusers' schedulers.

EDM's Heun sampler (Algorithm 2) is ours (diffusers has none); every other sampler is a diffusers scheduler:
``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler`` (DPM-Solver++ 2M / 3M / SDE) and
``UniPCMultistepScheduler`` on EDM's rho-7 grid. Our preconditioning stays the one source of D: the pipeline
evaluates D(x; sigma) and :class:`SchedulerAdapter` turns it into what the scheduler's ``step()`` expects,
in one place:

* EDM-formulation schedulers (``precondition_outputs``, sample x at noise level sigma): the raw output
  F' = (D - c_skip x) / c_out under the scheduler's own c_skip, c_out, so its ``precondition_outputs`` gives D back.
* VP-formulation schedulers (sample x_vp = x / sqrt(1 + sigma^2)): D itself for ``prediction_type="sample"``,
  else the epsilon or v that D implies.

Carried by saved pipelines: imports only torch, diffusers, the standard library and its siblings.
"""

import inspect
import math

import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, UniPCMultistepScheduler

from .preconditioning import EDMPreconditioning
from .scheduling_edm_heun import EDMHeunScheduler

# name -> (scheduler class, its settings); every one on EDM's grid sigma_min..sigma_max with rho 7.
SAMPLERS = {
    "heun": (EDMHeunScheduler, {"solver": "heun"}),  # EDM Algorithm 2: 2N - 1 evaluations
    "euler": (EDMEulerScheduler, {}),
    "dpmpp2m": (EDMDPMSolverMultistepScheduler, {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    "dpmpp3m": (EDMDPMSolverMultistepScheduler, {"solver_order": 3, "algorithm_type": "dpmsolver++"}),
    "dpmpp2m_sde": (EDMDPMSolverMultistepScheduler, {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 3, "prediction_type": "sample", "use_karras_sigmas": True,
                                        "final_sigmas_type": "zero", "lower_order_final": True}),
}
SAMPLER_NAMES = tuple(SAMPLERS)
GRID_FIELDS = ("sigma_min", "sigma_max", "rho")  # carried over from the scheduler a sampler replaces
EDM_GRID = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def sampler_names() -> tuple[str, ...]:
    """The names ``EchoDiffPipeline(..., sampler=name)`` accepts."""
    return SAMPLER_NAMES


def uses_edm_preconditioning_fields(scheduler) -> bool:
    """True for our own schedulers, which carry the preconditioning's fields in their config."""
    return "preconditioning" in getattr(scheduler, "config", {})


def make_scheduler(name: str, preconditioning: EDMPreconditioning, base_config=None, **overrides):
    """The scheduler of sampler ``name`` with the grid of ``base_config`` (a scheduler config; default EDM's
    0.002..80, rho 7) and ``overrides``; the sigma range is clipped to what the preconditioning supports."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {name!r}")
    cls, settings = SAMPLERS[name]
    grid = {field: (base_config or {}).get(field, default) for field, default in EDM_GRID.items()}
    grid = {field: EDM_GRID[field] if value is None else value for field, value in grid.items()}
    config = {**grid, **settings, **overrides}
    if cls is EDMHeunScheduler:
        return cls(**config, **preconditioning.to_config())
    if cls is UniPCMultistepScheduler:  # diffusers' Karras grid there is rho 7, with no setting
        if config.pop("rho") != EDM_GRID["rho"]:
            raise ValueError(f"sampler 'unipc' uses EDM's grid with rho 7, got rho={grid['rho']}")
    return configure_for(cls(**config), preconditioning)


def sampler_name(scheduler) -> str:
    """The SAMPLERS name that describes ``scheduler``'s configuration, else its class name."""
    config = scheduler.config
    for name, (cls, settings) in SAMPLERS.items():
        # by class name: a remote-code load gives our classes other module paths (and other class objects)
        if type(scheduler).__name__ == cls.__name__ and all(config.get(k) == v for k, v in settings.items()):
            return name
    return type(scheduler).__name__


def configure_for(scheduler, preconditioning: EDMPreconditioning):
    """A diffusers scheduler whose sigma range is clipped to the preconditioning's (a copy when that changes it),
    so a VE model samples from 0.02 whatever the scheduler. Our own schedulers clip by themselves."""
    if uses_edm_preconditioning_fields(scheduler):
        return scheduler
    config = scheduler.config
    if isinstance(scheduler, UniPCMultistepScheduler) and not config.get("use_karras_sigmas"):
        raise ValueError("UniPCMultistepScheduler samples EchoDiff models on EDM's grid only: build it with "
                         "use_karras_sigmas=True, sigma_min and sigma_max (or use sampler='unipc')")
    if config.get("sigma_min") is None or config.get("sigma_max") is None:
        raise ValueError(f"{type(scheduler).__name__} needs sigma_min and sigma_max in its config (EDM's grid)")
    low, high = preconditioning.clip_sigma_range(config.sigma_min, config.sigma_max)
    if (low, high) == (config.sigma_min, config.sigma_max):
        return scheduler
    return type(scheduler).from_config(config, sigma_min=low, sigma_max=high)


class SchedulerAdapter:
    """The one place where D(x; sigma) meets a diffusers scheduler's sample and model output conventions.

    One network evaluation per entry of ``scheduler.timesteps``, at noise level ``scheduler.sigmas[i]``.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.edm_formulation = hasattr(scheduler, "precondition_outputs")
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if not self.edm_formulation and prediction not in ("sample", "epsilon", "v_prediction"):
            raise ValueError(f"{type(scheduler).__name__} with prediction_type={prediction!r} is not supported "
                             "(sample, epsilon or v_prediction)")
        self.prediction = prediction
        self.takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # stochastic ones

    def sigma(self, i: int) -> float:
        return float(self.scheduler.sigmas[i])

    def vp_scale(self, sigma: float) -> float:
        """alpha = 1 / sqrt(1 + sigma^2): x_vp = alpha x (1 for EDM-formulation schedulers)."""
        return 1.0 if self.edm_formulation else 1 / math.sqrt(1 + sigma**2)

    def initial_sample(self, latents: torch.Tensor) -> torch.Tensor:
        """Unit-variance noise -> the starting sample at sigma_0, as EDM starts: x = sigma_0 n."""
        sigma = self.sigma(0)
        return latents * (sigma * self.vp_scale(sigma))

    def denoiser_input(self, sample: torch.Tensor, i: int, timestep) -> torch.Tensor:
        """EDM's x at evaluation i (scale_model_input runs for the scheduler's bookkeeping only: our
        preconditioning computes the network input c_in x itself)."""
        self.scheduler.scale_model_input(sample, timestep)
        sigma = self.sigma(i)
        return sample if self.edm_formulation else sample / self.vp_scale(sigma)

    def model_output(self, denoised: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """What ``step()`` expects, given D(x; sigma_i) (see the module doc)."""
        sigma = self.scheduler.sigmas[i]
        if self.edm_formulation:  # c_skip x and c_out from the scheduler's own (linear) output preconditioning
            skip = self.scheduler.precondition_outputs(x, torch.zeros_like(x), sigma)
            c_out = self.scheduler.precondition_outputs(torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype),
                                                        sigma)
            return (denoised.to(x.dtype) - skip) / c_out
        denoised = denoised.to(x.dtype)
        if self.prediction == "sample":
            return denoised
        sigma = float(sigma)
        epsilon = (x - denoised) / sigma
        if self.prediction == "epsilon":
            return epsilon
        alpha = self.vp_scale(sigma)  # v = alpha_t eps - sigma_t x0, with sigma_t = alpha sigma
        return alpha * epsilon - alpha * sigma * denoised

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator) -> torch.Tensor:
        options = {"generator": generator} if self.takes_generator else {}
        return self.scheduler.step(model_output, timestep, sample, **options).prev_sample

    def final(self, sample: torch.Tensor) -> torch.Tensor:
        """The sample at the grid's end as EDM's x (sigma 0, or the last sigma with final_sigmas_type="sigma_min")."""
        last = float(self.scheduler.sigmas[-1])
        return sample if self.edm_formulation else sample / self.vp_scale(last)

"""Guidance as wrappers around the denoiser D(x; sigma), as k-diffusion composes them.

A denoiser here is any callable ``D(x, sigma, evaluation)`` returning the denoised estimate; ``evaluation``
says which network evaluation of the sampler this is (EDM step i of N, Euler or Heun correction), for
guidance whose strength depends on it. A guidance wraps a denoiser and is one itself, so guidances
compose; each acts only inside its :class:`GuidanceInterval` of noise levels.

* :class:`Denoiser`: the network under its preconditioning (no guidance).
* :class:`Guidance`: the base of the wrappers (what the sampler asks passes through to the wrapped one).
* :class:`ClassifierFreeGuidance` (Ho & Salimans 2022): D = D_uncond + s (D_cond - D_uncond), one network
  under its label and under the null label.
* :class:`AutoGuidance` (Karras et al. 2024): D_w = D_0 + w (D_1 - D_0), D_0 a weaker guide model.
* :class:`DiscriminatorGuidance` (Kim et al. 2023): D_dg = D + w sigma^2 grad_x log r.

Every denoiser counts its network evaluations (``evaluation_counts``), so a guided sampler reports what it cost.

Carried by saved pipelines: imports only torch and the standard library.
"""

import math
from dataclasses import dataclass

import torch

DG_LOGIT_CLIP = math.log((1 - 1e-5) / 1e-5)  # d clipped to [1e-5, 1 - 1e-5]  <=>  logit clipped to +-11.51
DG_SIGMA_MIN = 0.0447  # the DG reference's VP time 0.01: guidance on the first 25 of 30 EDM steps


@dataclass(frozen=True)
class Evaluation:
    """One network evaluation of a sampler: EDM step ``index`` of ``num_steps``, Euler (first order) or not."""

    index: int
    num_steps: int
    first_order: bool = True


@dataclass(frozen=True)
class GuidanceInterval:
    """Guide only for sigma in [sigma_min, sigma_max] (Kynkaenniemi et al. 2024's guidance interval)."""

    sigma_min: float = 0.0
    sigma_max: float = math.inf
    name: str = "guidance"  # the call arguments' prefix, for error messages

    def __post_init__(self):
        if not 0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(f"the {self.name} interval needs 0 <= {self.name}_sigma_min <= {self.name}_sigma_max, "
                             f"got [{self.sigma_min}, {self.sigma_max}]")

    def contains(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma >= self.sigma_min) & (sigma <= self.sigma_max)


def per_sample(sigma, batch: int, device) -> torch.Tensor:
    """sigma as a float64 (B,) tensor (a number or one value per sample)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
    return sigma.expand(batch) if sigma.numel() == 1 else sigma


class Denoiser:
    """D(x; sigma) of ``network`` under ``preconditioning`` (an EDMPreconditioning), optionally label-conditioned.

    ``name`` labels its evaluations in :meth:`evaluation_counts` (the pipeline component's name).
    """

    def __init__(self, network, preconditioning, class_labels: torch.Tensor | None = None, name: str = "unet"):
        self.network, self.preconditioning, self.class_labels = network, preconditioning, class_labels
        self.name, self.calls = name, 0

    def __call__(self, x: torch.Tensor, sigma, evaluation: Evaluation | None = None) -> torch.Tensor:
        self.calls += 1
        return self.preconditioning.denoise(self.network, x, sigma, self.class_labels)

    def networks(self) -> list:
        """The modules this denoiser runs (the sampler switches them to eval mode)."""
        return [self.network]

    def evaluation_counts(self) -> dict[str, int]:
        """Batched evaluations of each network so far, by name (a guided step costs more than one)."""
        return {self.name: self.calls}

    def extra_churn(self, evaluation: Evaluation) -> torch.Tensor | None:
        """Per-sample gamma of extra churn the sampler should add before this Euler evaluation (None: none)."""
        return None


class Guidance:
    """Base of the guidance wrappers: a guided denoiser is a denoiser, and what the sampler asks of it
    (``networks``, ``extra_churn``) reaches the denoisers it wraps, so guidances compose."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor, sigma, evaluation: Evaluation) -> torch.Tensor:
        return self.denoiser(x, sigma, evaluation)

    def networks(self) -> list:
        return self.denoiser.networks()

    def extra_churn(self, evaluation: Evaluation) -> torch.Tensor | None:
        return self.denoiser.extra_churn(evaluation)

    def evaluation_counts(self) -> dict[str, int]:
        return self.denoiser.evaluation_counts()


class CallArgumentError(ValueError):
    """A pipeline call argument (guidance weight, sizes, labels, output type) that cannot be used; the message
    names it."""

    user_input = True  # a saved pipeline's code cannot import pipelines.errors: run_cli recognises this mark


class UnexpectedArgumentError(TypeError):
    """A call argument the pipeline does not take (neither a sampler override nor a named condition)."""

    user_input = True


def check_finite(**values: float) -> None:
    for name, value in values.items():
        try:
            finite = not isinstance(value, (str, bytes)) and math.isfinite(value)
        except TypeError:  # e.g. a list or None: not a number at all
            finite = False
        if not finite:
            raise CallArgumentError(f"{name} must be a finite number, got {value!r}")


def _per_sample_view(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


class ExtrapolatingGuidance(Guidance):
    """D = D_ref + w (D - D_ref) on the evaluations whose sigma is inside ``interval``; D elsewhere.

    D is the wrapped denoiser, D_ref ``reference``; w = 1 is D alone and D_ref is then never evaluated.
    Classifier-free guidance and autoguidance are this formula with different references.
    """

    weight_name = "weight"  # the call argument named in errors

    def __init__(self, denoiser, reference, weight: float, interval: GuidanceInterval):
        check_finite(**{self.weight_name: weight})
        super().__init__(denoiser)
        self.reference, self.weight, self.interval = reference, float(weight), interval

    def __call__(self, x: torch.Tensor, sigma, evaluation: Evaluation) -> torch.Tensor:
        d = self.denoiser(x, sigma, evaluation)
        inside = self.interval.contains(per_sample(sigma, x.shape[0], x.device))
        if self.weight == 1 or not bool(inside.any()):
            return d
        d_ref = self.reference(x, sigma, evaluation).to(d.dtype)
        guided = d_ref + self.weight * (d - d_ref)
        return torch.where(_per_sample_view(inside, guided), guided, d)

    def evaluation_counts(self) -> dict[str, int]:
        return {**super().evaluation_counts(), **self.reference.evaluation_counts()}


class ClassifierFreeGuidance(ExtrapolatingGuidance):
    """D = D_u + s (D_c - D_u): D_c the network under the requested labels (the wrapped denoiser), D_u
    ``unconditional``, the same network under the null label (what label dropout trained)."""

    weight_name = "guidance_scale"

    def __init__(self, denoiser, unconditional, scale: float = 1.0,
                 interval: GuidanceInterval = GuidanceInterval(name="cfg")):
        super().__init__(denoiser, unconditional, scale, interval)


class AutoGuidance(ExtrapolatingGuidance):
    """D_w = D_0 + w (D_1 - D_0): D_1 the main model (the wrapped denoiser), D_0 ``guide``, a denoiser of the
    same data and preconditioning that is worse in the same ways (smaller and/or trained for less); w > 1
    pushes samples away from the guide's errors."""

    weight_name = "ag_weight"

    def __init__(self, denoiser, guide, weight: float = 1.0, interval: GuidanceInterval = GuidanceInterval(name="ag")):
        super().__init__(denoiser, guide, weight, interval)

    def networks(self) -> list:  # the guide is another network (CFG's reference is the same one)
        return [*super().networks(), *self.reference.networks()]


def discriminator_logits(output) -> torch.Tensor:
    """(B,) logits from a discriminator's output: a tensor, a tuple, or an object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)):
        logits = output[0]
    else:
        raise TypeError(f"discriminator output must be a tensor or carry .logits, got {type(output).__name__}")
    return logits.reshape(logits.shape[0], -1)[:, 0] if logits.ndim > 1 else logits


def discriminator_log_ratio(discriminator, x: torch.Tensor, sigma: torch.Tensor):
    """log r = log(d / (1 - d)) with d = sigmoid(logit) clipped to [1e-5, 1 - 1e-5], and grad_x log r.

    ``discriminator(x, sigma)`` is any module taking the noised sample and one sigma per sample and
    returning the logit of "real". Clipping the logit equals clipping d and keeps log r exact.
    """
    with torch.enable_grad():
        x_in = x.detach().to(torch.float32).requires_grad_(True)
        logits = discriminator_logits(discriminator(x_in, sigma)).to(torch.float32)
        if logits.shape != (x.shape[0],):
            raise ValueError(f"the discriminator must return one logit per sample ({x.shape[0]}), "
                             f"got shape {tuple(logits.shape)}")
        log_ratio = logits.clamp(-DG_LOGIT_CLIP, DG_LOGIT_CLIP)
        (grad,) = torch.autograd.grad(log_ratio.sum(), x_in)
    return log_ratio.detach(), grad


class DiscriminatorGuidance(Guidance):
    """D_dg = D + w sigma^2 grad_x log r on the evaluations whose sigma is inside ``interval``.

    w is ``weight_first_order`` on Euler evaluations and ``weight_second_order`` on Heun corrections
    (0: the discriminator is not evaluated there). As in the DG reference, on every second step
    (step 0, 2, ...) the first-order DG vector of samples with log r < 0 is multiplied by ``boost``; with
    ``boost_churn``, :meth:`extra_churn` asks the sampler to lift those samples (log r < 0 at the previous
    Euler evaluation) by gamma = min(4 / N, sqrt(2) - 1) (S_churn 4) on every fifth step.
    """

    BOOST_PERIOD, CHURN_PERIOD, CHURN = 2, 5, 4.0

    def __init__(self, denoiser, discriminator, weight_first_order: float = 0.0, weight_second_order: float = 0.0,
                 boost: float = 1.0, boost_churn: bool = False,
                 interval: GuidanceInterval = GuidanceInterval(DG_SIGMA_MIN, name="dg")):
        check_finite(dg_weight_first_order=weight_first_order, dg_weight_second_order=weight_second_order,
                     dg_boost=boost)
        if boost <= 0:
            raise ValueError(f"dg_boost must be > 0 (1 = no boosting), got {boost!r}")
        if discriminator is None:
            raise ValueError("Discriminator Guidance needs a discriminator: this pipeline has none "
                             "(pass discriminator=... or load a pipeline folder that holds one)")
        super().__init__(denoiser)
        self.discriminator, self.interval = discriminator, interval
        self.weights = (float(weight_first_order), float(weight_second_order))
        self.boost, self.boost_churn = float(boost), bool(boost_churn)
        self.log_ratio = None  # log r at the last Euler evaluation (+inf outside the interval)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma, evaluation: Evaluation) -> torch.Tensor:
        denoised = self.denoiser(x, sigma, evaluation)
        weight = self.weights[0 if evaluation.first_order else 1]
        if weight == 0:
            return denoised
        sigmas = per_sample(sigma, x.shape[0], x.device)
        inside = self.interval.contains(sigmas)
        if not bool(inside.any()):
            if evaluation.first_order:
                self.log_ratio = torch.full((x.shape[0],), math.inf, device=x.device)
            return denoised
        self.calls += 1
        log_ratio, grad = discriminator_log_ratio(self.discriminator, x, sigmas.to(torch.float32))
        scale = weight * sigmas.to(torch.float32) ** 2 * inside.to(torch.float32)
        if evaluation.first_order:
            if self.boost != 1 and evaluation.index % self.BOOST_PERIOD == 0:
                scale = torch.where(log_ratio < 0, scale * self.boost, scale)
            self.log_ratio = torch.where(inside, log_ratio, torch.full_like(log_ratio, math.inf))
        return denoised + _per_sample_view(scale, denoised) * grad.to(denoised.dtype)

    def networks(self) -> list:
        return [*super().networks(), self.discriminator]

    def evaluation_counts(self) -> dict[str, int]:
        return {**super().evaluation_counts(), "discriminator": self.calls}

    def extra_churn(self, evaluation: Evaluation) -> torch.Tensor | None:
        """Per-sample gamma of the extra churn before this Euler evaluation (see the class doc)."""
        if not (self.boost_churn and self.log_ratio is not None and evaluation.index % self.CHURN_PERIOD == 0):
            return super().extra_churn(evaluation)
        gamma = min(self.CHURN / evaluation.num_steps, math.sqrt(2) - 1)
        return (self.log_ratio < 0).to(torch.float64) * gamma  # float64: t_i (1 + gamma) exactly as EDM

"""EchoDiffPipeline: sample echocardiogram images with an EDM-preconditioned network and EDM's Heun sampler
or any sampler of ``samplers.py`` (diffusers' EDM Euler, DPM-Solver++, UniPC).

Components: ``unet`` (a raw network F(x, c_noise), e.g. SongUNet2DModel / ADMUNet2DModel), ``scheduler``
(EDMHeunScheduler or a supported diffusers scheduler), an optional ``discriminator`` for Discriminator
Guidance and an optional ``guide_unet`` for autoguidance. The preconditioning that turns F into the denoiser D
is the pipeline's own config (``pipe.config.preconditioning``, saved in model_index.json; taken from an
EDMHeunScheduler when not given), so swapping the scheduler keeps it. Loading is diffusers' own
(``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``); ``save_pretrained`` adds the code.

Carried by saved pipelines (at the folder's root, with its siblings ``guidance.py``, ``samplers.py`` and
what they import): imports only torch, diffusers and the standard library.
"""

import ast
import inspect
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .conditioning import ConditionError, check_spec, describe, encode, label_dim
from .guidance import (
    DG_SIGMA_MIN,
    AutoGuidance,
    CallArgumentError,
    ClassifierFreeGuidance,
    Denoiser,
    DiscriminatorGuidance,
    Evaluation,
    GuidanceInterval,
    UnexpectedArgumentError,
)
from .preconditioning import EDMPreconditioning
from .samplers import (
    SAMPLER_NAMES,
    SchedulerAdapter,
    configure_for,
    make_scheduler,
    sampler_name,
    uses_edm_preconditioning_fields,
)
from .scheduling_edm_heun import EDMHeunScheduler

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# What a file carried by a saved pipeline may import besides the standard library and its siblings.
ALLOWED_IMPORTS = {"torch", "numpy", "diffusers", "huggingface_hub"}
PRECISIONS = ("fp32", "bf16")  # bf16: autocast around the network evaluations; the sampler stays float64


@dataclass
class EchoDiffPipelineOutput(ImagePipelineOutput):
    """``images`` as diffusers' ImagePipelineOutput, plus the sampler used and its exact network evaluations
    per image (``nfe``: denoiser calls, e.g. 2N - 1 for N Heun steps, N for Euler / DPM-Solver++ / UniPC)."""

    nfe: int | None = None
    sampler: str | None = None
    precision: str | None = None


class EchoDiffPipeline(DiffusionPipeline):
    """Unconditional (or label-conditioned) image sampling with EDM's sampler.

    ``pipe(seeds=[0, 1, 2, 3], num_inference_steps=30)`` returns an ``ImagePipelineOutput``. With ``seeds``
    each image has its own random stream (EDM's practice), so the image for a seed does not depend on the
    batch it is generated in.
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["discriminator", "guide_unet"]
    _callback_tensor_inputs = ["latents", "denoised"]

    def __init__(self, unet, scheduler, discriminator=None, guide_unet=None, preconditioning: dict | None = None,
                 conditions: dict | None = None):
        super().__init__()
        if preconditioning is None:  # folders saved before the pipeline held it: the scheduler's
            if not uses_edm_preconditioning_fields(scheduler):
                raise ValueError(f"EchoDiffPipeline needs preconditioning=... (e.g. {{'preconditioning': 've'}}) "
                                 f"when its scheduler ({type(scheduler).__name__}) is not an "
                                 f"{EDMHeunScheduler.__name__}, which carries one")
            preconditioning = EDMPreconditioning.from_config(scheduler.config).to_config()
        preconditioning = EDMPreconditioning.from_config(dict(preconditioning)).to_config()  # validated, complete
        self.register_modules(unet=unet, scheduler=scheduler, discriminator=discriminator, guide_unet=guide_unet)
        if conditions is not None:  # named conditions (conditioning.py): validated against the UNet's label width
            conditions = check_spec(dict(conditions))
            unet_labels = getattr(unet.config, "label_dim", 0) or 0
            if label_dim(conditions) != unet_labels:
                raise ConditionError(f"conditions {describe(conditions)} need label_dim={label_dim(conditions)}, "
                                     f"the unet has label_dim={unet_labels}")
        self.register_to_config(preconditioning=preconditioning, conditions=conditions)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    @property
    def preconditioning(self) -> EDMPreconditioning:
        """The preconditioning that turns the UNet's F into D (the one source, whatever the scheduler)."""
        return EDMPreconditioning.from_config(dict(self.config.preconditioning))

    @property
    def condition_names(self) -> tuple[str, ...]:
        """The named conditions a call takes (``pipe(ef=35.0, phase="ES")``); empty for an unconditional model."""
        spec = self.config.get("conditions")
        return tuple(c["name"] for c in spec["conditions"]) if spec else ()

    def split_conditions(self, call_kwargs: dict) -> tuple[dict, dict]:
        """(named conditions, the other keyword arguments) of a call."""
        names = self.condition_names
        return ({k: v for k, v in call_kwargs.items() if k in names},
                {k: v for k, v in call_kwargs.items() if k not in names})

    @staticmethod
    def sampler_names() -> tuple[str, ...]:
        """The names ``pipe(sampler=...)`` accepts (samplers.SAMPLER_NAMES)."""
        return SAMPLER_NAMES

    @property
    def num_timesteps(self) -> int:
        """Network (denoiser) evaluations per image of the call: during it, the number it will make (one per entry
        of the scheduler's timesteps, for progress bars); after it, the counted exact NFE."""
        return self._num_timesteps

    @property
    def network_evaluations(self) -> dict[str, int]:
        """Batched evaluations of each network in the last call: {"unet": ..., "guide_unet": ...,
        "discriminator": ...}; a guided evaluation costs more than one network."""
        return dict(self._network_evaluations)

    def count_nfe(self, num_inference_steps: int, sampler: str | None = None, **call_kwargs) -> int:
        """The NFE a call with these arguments makes (without running it): one denoiser evaluation per entry of
        the scheduler's ``timesteps`` (2N - 1 for Heun, N for the others); tested against counted calls.
        ``call_kwargs`` are any other call arguments; only the scheduler overrides among them matter."""
        scheduler = self.scheduler_for_call(sampler, self._scheduler_overrides(call_kwargs))
        scheduler.set_timesteps(num_inference_steps)
        return len(scheduler.timesteps)

    def _scheduler_overrides(self, call_kwargs: dict) -> dict:
        """The per-call scheduler settings among a call's keyword arguments."""
        call_arguments = set(inspect.signature(type(self).__call__).parameters) | set(self.condition_names)
        return {k: v for k, v in call_kwargs.items() if k not in call_arguments}

    def sampler_description(self, num_inference_steps: int, sampler: str | None = None, **call_kwargs) -> dict:
        """What a call with these arguments samples with: sampler name, steps, exact NFE, precision (for model
        cards and metrics files)."""
        return {"sampler": sampler_name(self.scheduler_for_call(sampler, self._scheduler_overrides(call_kwargs))),
                "num_inference_steps": int(num_inference_steps),
                "nfe": self.count_nfe(num_inference_steps, sampler, **call_kwargs),
                "precision": call_kwargs.get("precision", "fp32")}

    @torch.no_grad()
    def __call__(self, batch_size: int | None = None, num_inference_steps: int = 30,
                 generator: torch.Generator | list[torch.Generator] | None = None, seeds: list[int] | None = None,
                 latents: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None,
                 discriminator=None, dg_weight_first_order: float = 0.0, dg_weight_second_order: float = 0.0,
                 dg_boost: float = 1.0, dg_boost_churn: bool = False, dg_sigma_min: float = DG_SIGMA_MIN,
                 dg_sigma_max: float | None = None, guide_unet=None, ag_weight: float = 1.0, ag_sigma_min: float = 0.0,
                 ag_sigma_max: float | None = None, guidance_scale: float = 1.0, cfg_sigma_min: float = 0.0,
                 cfg_sigma_max: float | None = None, sampler: str | None = None, precision: str = "fp32",
                 channels_last: bool = False, **scheduler_overrides) -> EchoDiffPipelineOutput | tuple:
        """Generate images.

        Args:
            batch_size: the number of class-label rows (or unconditional "prompts"); each gives
                ``num_images_per_prompt`` images (default: from ``seeds``, ``generator``, ``latents`` or 1).
            num_inference_steps: EDM steps N (Heun: 2N-1 network evaluations).
            generator: a torch.Generator or one per image; or ``seeds``: one integer per image.
            latents: the unit-variance starting noise (B, C, H, W), instead of drawing it.
            class_labels: (P, label_dim) float, for networks with ``label_dim > 0``; each row gives
                ``num_images_per_prompt`` images.
            output_type: "pil", "np" (float (B, H, W, C) in [0, 1]), "pt" (float (B, C, H, W) in [0, 1]), or
                "latent" (the raw float32 samples (B, C, H, W), about [-1, 1]; FID writes these with EDM's
                uint8 rule).
            callback_on_step_end: ``callback(pipe, i, t, tensors) -> dict`` after every network evaluation,
                with ``tensors`` holding ``callback_on_step_end_tensor_inputs`` ("latents", "denoised"); a
                returned "latents" replaces the sample.
            discriminator: a discriminator for this call instead of the pipeline's (any module
                ``discriminator(x, sigma) -> logit of "real"``).
            dg_weight_first_order, dg_weight_second_order: Discriminator Guidance weight w on Euler evaluations
                and on Heun corrections: D_dg = D + w sigma^2 grad_x log r (paper: 5 and 0). Both 0 (default):
                no guidance, bitwise the plain sampler.
            dg_boost: on steps 0, 2, 4, ... the first-order DG vector of samples with log r < 0 is multiplied by
                this (the paper's "scaling of 2"; 1 = off).
            dg_boost_churn: the DG reference's extra churn (S_churn 4 every fifth step) for samples with log r < 0.
            dg_sigma_min, dg_sigma_max: DG's guidance interval (default 0.0447 .. no limit).
            guide_unet: a guide network for this call instead of the pipeline's ``guide_unet``.
            ag_weight: autoguidance weight w: D_w = D_0 + w (D_1 - D_0), D_1 the UNet, D_0 the guide under the same
                preconditioning (Karras et al. 2024; 1, the default: no guidance and the guide is never run).
            ag_sigma_min, ag_sigma_max: autoguidance's interval (default: every noise level); outside it D_1 alone.
            guidance_scale: classifier-free guidance scale s on the named conditions: D = D_u + s (D_c - D_u), D_u
                the UNet under the null label (1, the default: the conditional model alone; D_u is never run).
            cfg_sigma_min, cfg_sigma_max: classifier-free guidance's interval (default: every noise level).
            sampler: one of :meth:`sampler_names` ("heun", "euler", "dpmpp2m", "dpmpp3m", "dpmpp2m_sde", "unipc")
                for this call instead of ``pipe.scheduler`` (its sigma_min, sigma_max and rho carry over).
            precision: "fp32" (default) or "bf16" (autocast around the network evaluations; the sampler's own
                arithmetic stays float64).
            channels_last: run the networks in channels-last memory format for this call.
            scheduler_overrides: sampler settings for this call only (any scheduler config field but the
                preconditioning's, e.g. s_churn, s_min, s_max, s_noise, solver, sigma_min, sigma_max, rho); for a
                conditional model also its named conditions (``pipe.condition_names``), each one value or one per
                image, e.g. ``ef=35.0, phase="ES"``; none of them: unconditional samples (the null label).
        """
        conditions, scheduler_overrides = self.split_conditions(scheduler_overrides)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = self.check_inputs(output_type, callback_on_step_end_tensor_inputs, precision)
        device = self._execution_device
        count, generator = self.prepare_batch(batch_size, num_images_per_prompt, seeds, generator, class_labels,
                                              latents, device)
        labels = self.prepare_class_labels(class_labels, num_images_per_prompt, device, conditions, count)
        scheduler = self.scheduler_for_call(sampler, scheduler_overrides)
        scheduler.set_timesteps(num_inference_steps, device=device)
        denoiser = self.prepare_denoiser(
            scheduler, labels, guide_unet=guide_unet, guidance_scale=guidance_scale,
            cfg_interval=GuidanceInterval(cfg_sigma_min, _no_limit(cfg_sigma_max), "cfg"), ag_weight=ag_weight,
            ag_interval=GuidanceInterval(ag_sigma_min, _no_limit(ag_sigma_max), "ag"), discriminator=discriminator,
            dg_weight_first_order=dg_weight_first_order, dg_weight_second_order=dg_weight_second_order,
            dg_boost=dg_boost, dg_boost_churn=dg_boost_churn,
            dg_interval=GuidanceInterval(dg_sigma_min, _no_limit(dg_sigma_max), "dg"))
        noise = self.prepare_latents(count, generator, latents, device)
        self._num_timesteps = len(scheduler.timesteps)  # diffusers' meaning, known before the loop (callbacks)
        nfe = 0
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

        def evaluate(x, sigma, evaluation):  # every network evaluation of the call goes through here
            nonlocal nfe
            nfe += 1
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                return denoiser(x, sigma, evaluation).contiguous()

        def callback(i, t, tensors):
            if callback_on_step_end is None:
                return tensors["latents"]
            outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in tensor_inputs})
            return outputs.pop("latents", tensors["latents"])

        loop = self._edm_loop if uses_edm_preconditioning_fields(scheduler) else self._diffusers_loop
        with _eval_mode(*denoiser.networks()), _memory_format(denoiser.networks(), channels_last):
            latents = loop(scheduler, denoiser, evaluate, noise, generator, num_inference_steps, callback)

        self._network_evaluations = denoiser.evaluation_counts()
        self._num_timesteps = nfe  # the counted evaluations are the truth
        images = latents.to(torch.float32)
        if output_type != "latent":
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return EchoDiffPipelineOutput(images=images, nfe=nfe, sampler=sampler_name(scheduler),
                                      precision=precision)

    # ----- the sampling loops -------------------------------------------------------------------------------

    def _edm_loop(self, scheduler, denoiser, evaluate, noise, generator, num_inference_steps, callback):
        """EDM's own schedulers: step() takes D; per-sample churn for DG's boost."""
        latents = noise * scheduler.init_noise_sigma
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            evaluation = Evaluation(scheduler.current_step, num_inference_steps, scheduler.state_in_first_order)
            gamma = denoiser.extra_churn(evaluation) if evaluation.first_order else None
            if gamma is not None:
                latents = scheduler.add_sample_churn(latents, gamma, generator)
            sigma = t if getattr(scheduler, "per_sample_sigma", None) is None else scheduler.per_sample_sigma
            denoised = evaluate(scheduler.scale_model_input(latents, t), sigma, evaluation)
            latents = scheduler.step(denoised, t, latents, generator=generator).prev_sample
            latents = callback(i, t, {"latents": latents, "denoised": denoised})
        return latents

    def _diffusers_loop(self, scheduler, denoiser, evaluate, noise, generator, num_inference_steps, callback):
        """diffusers' schedulers, through the one adapter of D (samplers.SchedulerAdapter); each evaluation is a
        first-order one for guidance. ``latents`` in the callback is the scheduler's own sample."""
        adapter = SchedulerAdapter(scheduler)
        sample = adapter.initial_sample(noise)
        num_evaluations = len(scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            x = adapter.denoiser_input(sample, i, t)
            denoised = evaluate(x, adapter.sigma(i), Evaluation(i, num_evaluations, True))
            sample = adapter.step(adapter.model_output(denoised, x, i), t, sample, generator)
            sample = callback(i, t, {"latents": sample, "denoised": denoised})
        return adapter.final(sample)

    # ----- the pieces of a call -----------------------------------------------------------------------------

    def check_inputs(self, output_type: str, callback_on_step_end_tensor_inputs, precision: str = "fp32") -> list[str]:
        if output_type not in OUTPUT_TYPES:
            raise CallArgumentError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if precision not in PRECISIONS:
            raise CallArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        tensor_inputs = ["latents"] if callback_on_step_end_tensor_inputs is None else list(
            callback_on_step_end_tensor_inputs)
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise CallArgumentError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, "
                             f"got {unknown}")
        return tensor_inputs

    def prepare_batch(self, batch_size, num_images_per_prompt, seeds, generator, class_labels, latents, device):
        """(number of images, generator(s)); every way of giving the batch size must agree."""
        per_prompt = int(num_images_per_prompt)
        if per_prompt < 1:
            raise CallArgumentError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if seeds is not None and generator is not None:
            raise CallArgumentError("pass either generator or seeds, not both")
        sizes = {}
        if batch_size is not None:
            sizes["batch_size x num_images_per_prompt"] = int(batch_size) * per_prompt
        if class_labels is not None:
            sizes["len(class_labels) x num_images_per_prompt"] = len(class_labels) * per_prompt
        for name, given in (("seeds", seeds), ("generator", generator), ("latents", latents)):
            if given is not None and not isinstance(given, torch.Generator):
                sizes[f"len({name})"] = len(given)
        if len(set(sizes.values())) > 1:
            raise CallArgumentError(f"the number of images is given inconsistently: {sizes}")
        count = next(iter(sizes.values()), per_prompt)
        if count < 1:
            raise CallArgumentError(f"the number of images must be >= 1, got {sizes}")
        if seeds is not None:  # one generator per image, seeded as EDM does: a seed's image ignores its batch
            generator = [torch.Generator(device=device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]
        return count, generator

    def prepare_class_labels(self, class_labels, num_images_per_prompt: int, device, conditions: dict | None = None,
                             count: int | None = None) -> torch.Tensor | None:
        """The (B, label_dim) labels of a call: from ``class_labels``, or encoded from the named ``conditions``
        (the null label when a conditional pipeline gets none), or None for an unconditional network."""
        label_dim = getattr(self.unet.config, "label_dim", 0) or 0
        spec = self.config.get("conditions")
        if conditions and class_labels is not None:
            raise CallArgumentError(f"pass either class_labels or named conditions {sorted(conditions)}, not both")
        if spec and class_labels is None:
            if not conditions and not spec["label_dropout"]:
                logger.warning("this model was trained without label dropout, so its null label (unconditional "
                               "samples) is untrained: pass %s", describe(spec))
            return encode(spec, conditions or {}, count).to(device)
        if class_labels is None:
            if label_dim:
                raise CallArgumentError(f"this network is conditional (label_dim={label_dim}): pass class_labels "
                                 f"(B, {label_dim})")
            return None
        labels = torch.as_tensor(class_labels, device=device, dtype=torch.float32)
        if labels.ndim != 2 or labels.shape[1] != label_dim:
            raise CallArgumentError(f"class_labels must have shape (B, {label_dim}), got {tuple(labels.shape)}")
        return labels.repeat_interleave(int(num_images_per_prompt), dim=0)

    def sampler_settings(self, scheduler=None) -> list[str]:
        """The scheduler config fields a call may override (all but the preconditioning's)."""
        scheduler = self.scheduler if scheduler is None else scheduler
        fields = set(inspect.signature(type(scheduler).__init__).parameters) - {"self"}
        return sorted(fields - set(EDMPreconditioning.CONFIG_FIELDS.values()))

    def scheduler_for_call(self, sampler: str | None = None, overrides: dict | None = None):
        """The scheduler of a call: ``pipe.scheduler``, or the named ``sampler`` on its grid, configured with the
        per-call ``overrides`` (a copy: the saved one stays as is) and the pipeline's preconditioning's sigma
        range (VE from 0.02)."""
        overrides = dict(overrides or {})
        preconditioning = self.preconditioning
        if sampler is not None:
            scheduler = make_scheduler(sampler, preconditioning, self.scheduler.config)
        else:
            scheduler = self.scheduler
            if uses_edm_preconditioning_fields(scheduler) and \
                    EDMPreconditioning.from_config(scheduler.config).to_config() != preconditioning.to_config():
                raise ValueError(f"pipe.scheduler's preconditioning {scheduler.preconditioning} differs from the "
                                 f"pipeline's {preconditioning} (pipe.config.preconditioning, the one source of D): "
                                 "build the scheduler from_config(pipe.scheduler.config, ...) to keep it")
        if overrides:
            unknown = sorted(set(overrides) - set(self.sampler_settings(scheduler)))
            if unknown:
                named = (f"; this model's named conditions are {list(self.condition_names)}" if self.condition_names
                         else "; this pipeline has no named conditions")
                raise UnexpectedArgumentError(f"unexpected argument(s) {unknown}; sampler overrides are "
                                f"{self.sampler_settings(scheduler)}{named}")
            scheduler = type(scheduler).from_config(scheduler.config, **overrides)
        return configure_for(scheduler, preconditioning)

    def prepare_denoiser(self, scheduler, class_labels, guide_unet=None, guidance_scale: float = 1.0,
                         cfg_interval: GuidanceInterval = GuidanceInterval(name="cfg"), ag_weight: float = 1.0,
                         ag_interval: GuidanceInterval = GuidanceInterval(name="ag"), discriminator=None,
                         dg_weight_first_order: float = 0.0, dg_weight_second_order: float = 0.0, dg_boost: float = 1.0,
                         dg_boost_churn: bool = False, dg_interval: GuidanceInterval = GuidanceInterval(name="dg")):
        """D(x; sigma) of the UNet under the pipeline's preconditioning, wrapped in classifier-free guidance
        when ``guidance_scale != 1``, then in autoguidance when ``ag_weight != 1`` and then in DG when a DG weight
        is set (with none of them: exactly the plain sampler)."""
        denoiser = Denoiser(self.unet, self.preconditioning, class_labels)
        denoiser = self.prepare_classifier_free_guidance(denoiser, class_labels, guidance_scale, cfg_interval)
        denoiser = self.prepare_autoguidance(denoiser, class_labels, guide_unet, ag_weight, ag_interval)
        return self.prepare_discriminator_guidance(denoiser, scheduler, discriminator, dg_weight_first_order,
                                                   dg_weight_second_order, dg_boost, dg_boost_churn, dg_interval)

    def prepare_classifier_free_guidance(self, denoiser, class_labels, scale: float, interval: GuidanceInterval):
        if scale == 1:
            return denoiser  # s = 1 is D_c itself: the null label is never evaluated
        spec = self.config.get("conditions")
        if not spec:
            raise ConditionError(f"guidance_scale={scale} needs a conditional pipeline with named conditions "
                             "(config.conditions); this one has none (guidance_scale=1 is unguided)")
        if not bool(class_labels.any()):
            raise ConditionError(f"guidance_scale={scale} guides towards the named conditions: give "
                                 f"{describe(spec)}")
        unconditional = Denoiser(self.unet, self.preconditioning, torch.zeros_like(class_labels),
                                 name="unet_unconditional")
        return ClassifierFreeGuidance(denoiser, unconditional, scale, interval)

    def prepare_autoguidance(self, denoiser, class_labels, guide_unet, weight: float,
                             interval: GuidanceInterval):
        if weight == 1:
            return denoiser  # w = 1 is D_1 itself: the guide is not even needed
        guide_unet = self.guide_unet if guide_unet is None else guide_unet
        if guide_unet is None:
            raise CallArgumentError(f"ag_weight={weight} needs a guide network: this pipeline has no guide_unet (pass "
                             "guide_unet=... or load a pipeline folder that holds one; ag_weight=1 is unguided)")
        for field in ("in_channels", "sample_size", "label_dim"):
            ours, theirs = getattr(self.unet.config, field, None), getattr(guide_unet.config, field, None)
            if ours != theirs:
                raise CallArgumentError(f"guide_unet must match the unet it guides: {field} is {theirs!r}, the unet's is {ours!r}")
        guide = Denoiser(guide_unet, self.preconditioning, class_labels, name="guide_unet")
        return AutoGuidance(denoiser, guide, weight, interval)

    def prepare_discriminator_guidance(self, denoiser, scheduler, discriminator, weight_first_order: float,
                                       weight_second_order: float, boost: float, boost_churn: bool,
                                       interval: GuidanceInterval):
        if not (weight_first_order or weight_second_order):
            return denoiser  # DG off
        if boost_churn and not getattr(scheduler, "supports_sample_churn", False):
            raise CallArgumentError(f"dg_boost_churn needs per-sample churn in EDM's time parameterisation, which "
                             f"{type(scheduler).__name__} with this config does not do")
        discriminator = self.discriminator if discriminator is None else discriminator
        if getattr(getattr(discriminator, "config", None), "feature_source", None) == "unet" and \
                discriminator.bound_unet is not self.unet:
            discriminator.bind_unet(self.unet)  # it reads this pipeline's UNet encoder
        return DiscriminatorGuidance(denoiser, discriminator, weight_first_order, weight_second_order, boost,
                                     boost_churn, interval)

    def prepare_latents(self, count: int, generator, latents: torch.Tensor | None, device) -> torch.Tensor:
        """Unit-variance starting noise (drawn, or the given ``latents``) in the sampler's float64."""
        config = self.unet.config
        size = config.sample_size
        shape = (count, config.in_channels, *((size, size) if isinstance(size, int) else tuple(size)))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise CallArgumentError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        # The sampler runs in float64, as EDM's does (MPS has no float64).
        return latents.to(device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)

    # ----- saving: diffusers' save_pretrained plus the code that loads it -------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size=None, push_to_hub: bool = False, **kwargs):
        """diffusers' ``save_pretrained`` plus each custom component's code file (and the sibling files it imports)
        next to its weights and the pipeline's at the root, so the folder loads in a process without EchoDiff
        with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size)
        folder = Path(save_directory)
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        for name, component in self.components.items():
            entry = index.get(name)
            if component is None or not isinstance(entry, list) or entry[0] is None or _installed(entry[0]):
                continue
            component_class = type(getattr(component, "_orig_mod", component))  # unwrap torch.compile
            index[name] = [copy_code(component_class, folder / name), component_class.__name__]
        index["_class_name"] = [copy_code(type(self), folder), type(self).__name__]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if push_to_hub:  # diffusers' push (saves through this method, code included); EchoNet-derived: private
            kwargs["private"] = kwargs.get("private", True) is not False
            self.push_to_hub(kwargs.pop("repo_id", folder.name), safe_serialization=safe_serialization,
                             variant=variant, **kwargs)


def _no_limit(sigma_max: float | None) -> float:
    return math.inf if sigma_max is None else sigma_max


@contextmanager
def _eval_mode(*modules):
    """Switch networks in training mode to eval for the block, then back."""
    training = [m for m in modules if isinstance(m, torch.nn.Module) and m.training]
    for module in training:
        module.eval()
    try:
        yield
    finally:
        for module in training:
            module.train()


@contextmanager
def _memory_format(modules, channels_last: bool):
    """Channels-last weights for the block (when asked), then back to contiguous."""
    modules = [m for m in modules if channels_last and isinstance(m, torch.nn.Module)]
    for module in modules:
        module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for module in modules:
            module.to(memory_format=torch.contiguous_format)


def _installed(library: str) -> bool:
    return library in LOADABLE_CLASSES or library.split(".")[0] in LOADABLE_CLASSES


def _imports(source: Path) -> list[tuple[int, str]]:
    """(level, module) of every import statement in ``source``: level 1 for ``from .x import``, 0 otherwise."""
    found = []
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def relative_imports(source: str | os.PathLike) -> list[Path]:
    """The sibling files ``source`` imports relatively (``from .layers import ...``)."""
    source = Path(source)
    return [source.parent / f"{module}.py" for level, module in _imports(source) if level == 1 and module]


def foreign_imports(source_file: str | os.PathLike) -> list[str]:
    """Modules a source file imports beyond ALLOWED_IMPORTS, the standard library and ``from .sibling import``
    (other relative forms, which diffusers' loader does not copy, count as foreign)."""
    foreign = set()
    for level, module in _imports(Path(source_file)):
        root = module.split(".")[0]
        if (level and (level != 1 or not module or "." in module)) or (
                not level and root not in ALLOWED_IMPORTS and root not in sys.stdlib_module_names):
            foreign.add("." * level + module)
    return sorted(foreign)


def copy_code(cls, destination: Path) -> str:
    """Copy the file defining ``cls`` and the siblings it imports into ``destination``; returns its module name.

    diffusers' remote-code loader copies a file's relative imports from the same folder (one level deep), so
    every carried file imports directly each sibling it needs.
    """
    source = inspect.getsourcefile(cls)
    if source is None:
        raise ValueError(f"cannot save {cls.__name__}: its source file is unknown (defined interactively?)")
    source = Path(source)
    foreign = foreign_imports(source)
    if foreign:
        logger.warning(f"{source} imports {foreign}: a saved pipeline's files should import only "
                       f"{sorted(ALLOWED_IMPORTS)} and the standard library, or it will not load as remote code.")
    destination.mkdir(parents=True, exist_ok=True)
    for path in [source, *relative_imports(source)]:
        target = destination / path.name
        if path.resolve() != target.resolve():
            shutil.copyfile(path, target)
    return source.stem

"""EchoDiffPipeline: sample echocardiogram images with an EDM-preconditioned network and EDM's Heun sampler.

Components: ``unet`` (a raw network F(x, c_noise), e.g. SongUNet2DModel / ADMUNet2DModel), ``scheduler``
(an EDMHeunScheduler, which also holds the preconditioning that turns F into the denoiser D) and an
optional ``discriminator`` for Discriminator Guidance.

``save_pretrained`` writes diffusers' remote-code layout: this file at the folder's root, named as
``_class_name[0]`` in ``model_index.json``, and each custom component's source file in its subfolder,
named as its library entry. So the folder (or its Hub copy) loads in a process without EchoDiff with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``, and again after a re-save.

Standalone on purpose: imports only torch, numpy, diffusers, huggingface_hub and the standard library.
"""

import importlib
import inspect
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.utils import logging
from diffusers.utils.constants import DIFFUSERS_DYNAMIC_MODULE_NAME
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SCHEDULER_OVERRIDES = ("s_churn", "s_min", "s_max", "s_noise", "solver", "discretization", "sigma_min", "sigma_max", "rho")
# What a file carried by a saved pipeline may import (besides the standard library).
ALLOWED_IMPORTS = {"torch", "numpy", "diffusers", "huggingface_hub"}
# The same patterns diffusers' check_imports uses for remote code.
_IMPORT_PATTERNS = (re.compile(r"^\s*import\s+(\S+)\s*$", re.MULTILINE), re.compile(r"^\s*from\s+(\S+)\s+import", re.MULTILINE))


def foreign_imports(source_file: str | os.PathLike) -> list[str]:
    """Top-level modules a source file imports beyond ALLOWED_IMPORTS and the standard library (relative ones too)."""
    found = set()
    text = Path(source_file).read_text(encoding="utf-8")
    for module in (m for pattern in _IMPORT_PATTERNS for m in pattern.findall(text)):
        root = module.split(".")[0]
        if module.startswith("."):
            continue  # a sibling: copied along with the file
        if root not in ALLOWED_IMPORTS and root not in sys.stdlib_module_names:
            found.add(module)
    return sorted(found)


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def _relative_import_closure(source: Path) -> list[Path]:
    """``source`` and the sibling files it imports relatively (recursively): what its folder must carry."""
    found, todo = [], [source]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.append(path)
        todo += [path.parent / f"{name}.py" for name in _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8"))]
    return found


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """EDM's image writer: x * 127.5 + 128, clipped to [0, 255], truncated."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _is_installed_library(library: str) -> bool:
    return library in LOADABLE_CLASSES or library.split(".")[0] in LOADABLE_CLASSES


# ----------------------------------------------------------------------------------------------------
# Discriminator Guidance (Kim et al. 2023), applied inside the sampling loop
# ----------------------------------------------------------------------------------------------------
DG_LOGIT_CLIP = math.log((1 - 1e-5) / 1e-5)  # d clipped to [1e-5, 1 - 1e-5]  <=>  logit clipped to +-11.51
DG_SIGMA_MIN = 0.0447  # the DG reference's VP time 0.01: guidance on the first 25 of 30 EDM steps


def _discriminator_logits(output) -> torch.Tensor:
    """(B,) logits from any discriminator output: a tensor, a tuple, or an object with ``.logits``."""
    if not isinstance(output, torch.Tensor):
        output = output.logits if hasattr(output, "logits") else output[0]
    return output.reshape(output.shape[0], -1)[:, 0] if output.ndim > 1 else output


def discriminator_log_ratio(discriminator, x: torch.Tensor, sigma: torch.Tensor):
    """log r = log(d / (1 - d)) with d = sigmoid(logit) clipped to [1e-5, 1 - 1e-5], and grad_x log r.

    ``discriminator(x, sigma)`` is any module taking the noised sample and one sigma per sample and
    returning the logit of "real". Clipping the logit equals clipping d and keeps log r exact.
    """
    with torch.enable_grad():
        x_in = x.detach().to(torch.float32).requires_grad_(True)
        logits = _discriminator_logits(discriminator(x_in, sigma)).to(torch.float32)
        if logits.shape != (x.shape[0],):
            raise ValueError(f"the discriminator must return one logit per sample ({x.shape[0]}), "
                             f"got shape {tuple(logits.shape)}")
        log_ratio = logits.clamp(-DG_LOGIT_CLIP, DG_LOGIT_CLIP)
        (grad,) = torch.autograd.grad(log_ratio.sum(), x_in)
    return log_ratio.detach(), grad


class DiscriminatorGuidance:
    """Per-call DG state: D_dg = D + w sigma^2 grad_x log r on the evaluations inside the sigma window.

    w is ``weight_first_order`` on Euler evaluations and ``weight_second_order`` on Heun corrections
    (0: the discriminator is not evaluated there). As in the DG reference, on every second step
    (step 0, 2, ...) the first-order DG vector of samples with log r < 0 is multiplied by ``boost``; with
    ``boost_churn`` those samples (log r < 0 at the previous Euler evaluation) get extra churn
    (S_churn 4, i.e. gamma = min(4 / N, sqrt(2) - 1)) on every fifth step.
    """

    BOOST_PERIOD, CHURN_PERIOD, CHURN = 2, 5, 4.0

    def __init__(self, discriminator, scheduler, weight_first_order: float = 0.0, weight_second_order: float = 0.0,
                 boost: float = 1.0, boost_churn: bool = False, sigma_min: float = DG_SIGMA_MIN,
                 sigma_max: float = math.inf):
        for name, value in (("dg_weight_first_order", weight_first_order),
                            ("dg_weight_second_order", weight_second_order), ("dg_boost", boost)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if boost <= 0:
            raise ValueError(f"dg_boost must be > 0 (1 = no boosting), got {boost!r}")
        if not 0 <= sigma_min <= sigma_max:
            raise ValueError(f"the DG sigma window must satisfy 0 <= dg_sigma_min <= dg_sigma_max, got "
                             f"[{sigma_min}, {sigma_max}]")
        if discriminator is None and (weight_first_order or weight_second_order):
            raise ValueError("Discriminator Guidance needs a discriminator: this pipeline has none "
                             "(pass discriminator=... or load a pipeline folder that holds one)")
        if boost_churn and (scheduler.config.schedule != "linear" or scheduler.config.scaling != "none"):
            raise ValueError("dg_boost_churn needs the EDM time parameterisation (scheduler schedule='linear', "
                             "scaling='none')")
        self.discriminator = discriminator
        self.scheduler = scheduler
        self.weights = (float(weight_first_order), float(weight_second_order))
        self.boost, self.boost_churn = float(boost), bool(boost_churn)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.step = None  # EDM step i of the current evaluation
        self.log_ratio = None  # log r at the last first-order evaluation (+inf outside the window)
        self._churn = None  # (mask, per-sample sigma, derivative factor k) on an extra-churn step

    @property
    def active(self) -> bool:
        return any(self.weights)

    def before_evaluation(self, sample: torch.Tensor, sigma: float, first_order: bool, generator) -> torch.Tensor:
        """Track the step; on churn steps lift samples judged fake to a higher sigma (Algorithm 2 lines 5-6)."""
        if not first_order:
            return sample
        self.step = self.scheduler.current_step
        self._churn = None
        if not (self.boost_churn and self.log_ratio is not None and self.step % self.CHURN_PERIOD == 0):
            return sample
        sched = self.scheduler
        i, n = self.step, sched.num_inference_steps
        t_cur, t_next = sched.sigmas[i].item(), sched.sigmas[i + 1].item()
        if not sched.config.s_min <= t_cur <= sched.config.s_max:
            return sample
        t_target = t_cur * (1 + min(self.CHURN / n, math.sqrt(2) - 1))
        mask = self.log_ratio < 0
        if t_target <= sigma or not bool(mask.any()):
            return sample
        # Each sample its own noise stream (per-seed generators), drawn only for the lifted samples.
        noise = torch.zeros_like(sample)
        for b in torch.nonzero(mask).flatten().tolist():
            gen = generator[b] if isinstance(generator, (list, tuple)) else generator
            noise[b] = torch.randn(sample.shape[1:], generator=gen, device=gen.device if gen is not None else "cpu",
                                   dtype=sample.dtype).to(sample.device)
        std = math.sqrt(t_target**2 - sigma**2)
        view = (-1,) + (1,) * (sample.ndim - 1)
        lifted = sample + std * noise
        sample = torch.where(mask.reshape(view), lifted, sample)
        # The scheduler steps the whole batch from `sigma`; a lifted sample's step from t_target to t_next
        # equals the scheduler's step with its derivative scaled by k (exact for the EDM linear schedule).
        as64 = dict(dtype=torch.float64, device=mask.device)
        sigma_per_sample = torch.where(mask, torch.tensor(t_target, **as64), torch.tensor(sigma, **as64))
        k = (t_next - sigma_per_sample) / (t_next - sigma)
        self._churn = (mask, sigma_per_sample, k.reshape(view))
        return sample

    def evaluation_sigma(self, t, first_order: bool):
        """The noise level to denoise at: ``t``, or one per sample on an extra-churn step."""
        if first_order and self._churn is not None:
            return self._churn[1]
        return t

    def _sigmas(self, sigma: float, batch: int, device, first_order: bool) -> torch.Tensor:
        if first_order and self._churn is not None:
            return self._churn[1]
        return torch.full((batch,), float(sigma), dtype=torch.float64, device=device)

    def guide(self, denoised: torch.Tensor, model_input: torch.Tensor, sigma: float, first_order: bool) -> torch.Tensor:
        """The denoised estimate to hand to ``scheduler.step`` (D_dg, adapted for extra-churned samples)."""
        weight = self.weights[0 if first_order else 1]
        sigmas = self._sigmas(sigma, model_input.shape[0], model_input.device, first_order)
        if weight != 0:
            inside = (sigmas >= self.sigma_min) & (sigmas <= self.sigma_max)
            if bool(inside.any()):
                log_ratio, grad = discriminator_log_ratio(self.discriminator, model_input, sigmas.to(torch.float32))
                scale = weight * sigmas.to(torch.float32) ** 2 * inside.to(torch.float32)
                if first_order and self.boost != 1 and self.step % self.BOOST_PERIOD == 0:
                    scale = torch.where(log_ratio < 0, scale * self.boost, scale)
                denoised = denoised + scale.reshape((-1,) + (1,) * (denoised.ndim - 1)) * grad.to(denoised.dtype)
                if first_order:
                    self.log_ratio = torch.where(inside, log_ratio, torch.full_like(log_ratio, math.inf))
            elif first_order:
                self.log_ratio = torch.full((model_input.shape[0],), math.inf, device=model_input.device)
        if self._churn is not None:
            denoised = self._rescale_for_churn(denoised, model_input, sigma, first_order)
        return denoised

    def _rescale_for_churn(self, denoised, x, sigma, first_order):
        mask, sigma_per_sample, k = self._churn
        view = k.shape
        if first_order:  # scheduler: d = (x - D') / sigma; wanted: k (x - D) / t_target
            own = sigma_per_sample.reshape(view).to(x.dtype)
            rescaled = x - sigma * k.to(x.dtype) * (x - denoised) / own
        else:  # scheduler: d' = (x - D'') / t_next; wanted: k (x - D) / t_next
            rescaled = x - k.to(x.dtype) * (x - denoised)
            self._churn = None
        return torch.where(mask.reshape(view), rescaled, denoised)


class EchoDiffPipeline(DiffusionPipeline):
    """Unconditional (or label-conditioned) image sampling with EDM's sampler.

    ``pipe(batch_size=4, num_inference_steps=30, seeds=[0, 1, 2, 3], output_type="pil")`` returns an
    ``ImagePipelineOutput``. With ``seeds`` each image has its own random stream (EDM's practice), so the
    image for a seed does not depend on the batch it is generated in.
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["discriminator"]

    def __init__(self, unet, scheduler, discriminator=None):
        super().__init__()
        if not hasattr(scheduler, "preconditioning"):
            raise TypeError(f"scheduler must carry a .preconditioning (an EDMHeunScheduler), got {type(scheduler).__name__}")
        self.register_modules(unet=unet, scheduler=scheduler, discriminator=discriminator)

    # ----- sampling ---------------------------------------------------------------------------------------

    def denoise(self, sample: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                scheduler=None) -> torch.Tensor:
        """The denoised estimate D(x; sigma) used by the sampler: the one place where it is formed.

        ``scheduler`` is the one running this call (default ``self.scheduler``); its
        ``state_in_first_order`` and ``current_step`` say which evaluation this is. Discriminator
        Guidance adds its correction to this estimate.
        """
        scheduler = self.scheduler if scheduler is None else scheduler
        return scheduler.preconditioning.denoise(self.unet, sample, sigma, class_labels)

    def _sample_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        config = self.unet.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, config.in_channels, height, width)

    def _generators(self, batch_size, generator, seeds, device):
        if seeds is not None:
            if generator is not None:
                raise ValueError("pass either generator or seeds, not both")
            seeds = [int(seed) for seed in seeds]
            if batch_size is not None and batch_size != len(seeds):
                raise ValueError(f"batch_size={batch_size} but {len(seeds)} seeds were given")
            # One generator per sample, seeded as EDM does, so a seed's image is independent of its batch.
            return len(seeds), [torch.Generator(device=device).manual_seed(seed % (1 << 32)) for seed in seeds]
        if isinstance(generator, list):
            if batch_size is not None and batch_size != len(generator):
                raise ValueError(f"batch_size={batch_size} but {len(generator)} generators were given")
            return len(generator), generator
        return (1 if batch_size is None else int(batch_size)), generator

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int = 30,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seeds: list[int] | None = None,
        class_labels: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        discriminator=None,
        dg_weight_first_order: float = 0.0,
        dg_weight_second_order: float = 0.0,
        dg_boost: float = 1.0,
        dg_boost_churn: bool = False,
        dg_sigma_min: float = DG_SIGMA_MIN,
        dg_sigma_max: float | None = None,
        **scheduler_overrides,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            batch_size: number of images (default: ``len(seeds)``, the number of generators, or 1).
            num_inference_steps: EDM steps N (Heun: 2N-1 network evaluations).
            generator: a torch.Generator or one per image; or ``seeds``: one integer per image.
            class_labels: (B, label_dim) float, for networks with ``label_dim > 0``.
            output_type: "pil" (PIL images), "np" (uint8 (B, H, W, C)), "pt" (uint8 (B, C, H, W)), all written
                as EDM writes images; or "latent" (the raw float32 samples (B, C, H, W), about [-1, 1]).
            discriminator: a discriminator for this call instead of the pipeline's (any module
                ``discriminator(x, sigma) -> logit of "real"``).
            dg_weight_first_order, dg_weight_second_order: Discriminator Guidance weight w on Euler evaluations
                and on Heun corrections: D_dg = D + w sigma^2 grad_x log r (paper: 5 and 0). Both 0 (default):
                no guidance, bitwise the plain sampler; a second-order weight of 0 skips the discriminator there.
            dg_boost: on steps 0, 2, 4, ... the first-order DG vector of samples with log r < 0 is multiplied by
                this (the paper's "scaling of 2"; 1 = off).
            dg_boost_churn: the DG reference's extra churn (S_churn 4 every fifth step) for samples with log r < 0.
            dg_sigma_min, dg_sigma_max: guidance only for sigma in this window (default 0.0447 .. no limit).
            scheduler_overrides: sampler settings for this call only (s_churn, s_min, s_max, s_noise, solver,
                discretization, sigma_min, sigma_max, rho).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = sorted(set(scheduler_overrides) - set(SCHEDULER_OVERRIDES))
        if unknown:
            raise TypeError(f"unexpected argument(s) {unknown}; sampler overrides are {SCHEDULER_OVERRIDES}")
        device = self._execution_device
        batch_size, generator = self._generators(batch_size, generator, seeds, device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

        label_dim = getattr(self.unet.config, "label_dim", 0) or 0
        if label_dim and class_labels is None:
            raise ValueError(f"this network is conditional (label_dim={label_dim}): pass class_labels (B, {label_dim})")
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=device, dtype=torch.float32)
            if class_labels.shape != (batch_size, label_dim):
                raise ValueError(f"class_labels must have shape ({batch_size}, {label_dim}), got {tuple(class_labels.shape)}")

        scheduler = self.scheduler
        if scheduler_overrides:  # a configured copy, so the pipeline's own scheduler stays as saved
            scheduler = type(self.scheduler).from_config(self.scheduler.config, **scheduler_overrides)
        scheduler.set_timesteps(num_inference_steps, device=device)
        guidance = DiscriminatorGuidance(
            self.discriminator if discriminator is None else discriminator, scheduler, dg_weight_first_order,
            dg_weight_second_order, dg_boost, dg_boost_churn, dg_sigma_min,
            math.inf if dg_sigma_max is None else dg_sigma_max,
        )
        if guidance.active:
            guidance.discriminator = self._discriminator_for_sampling(guidance.discriminator)
        else:
            guidance = None  # DG off: the loop below is exactly the plain sampler

        # The sampler runs in float64, as EDM's does (MPS has no float64).
        sample_dtype = torch.float32 if device.type == "mps" else torch.float64
        noise = randn_tensor(self._sample_shape(batch_size), generator=generator, device=device, dtype=torch.float32)
        sample = noise.to(sample_dtype) * scheduler.init_noise_sigma

        # Sampling never wants dropout: a network still in training mode is switched to eval for this call.
        in_training = [m for m in (self.unet, guidance and guidance.discriminator)
                       if isinstance(m, torch.nn.Module) and m.training]
        for module in in_training:
            module.eval()
        try:
            for t in self.progress_bar(scheduler.timesteps):
                sigma = t
                if guidance is not None:
                    first_order = scheduler.state_in_first_order
                    sample = guidance.before_evaluation(sample, float(t), first_order, generator)
                    sigma = guidance.evaluation_sigma(t, first_order)
                model_input = scheduler.scale_model_input(sample, t)
                denoised = self.denoise(model_input, sigma, class_labels, scheduler=scheduler)
                if guidance is not None:
                    denoised = guidance.guide(denoised, model_input, float(t), first_order)
                sample = scheduler.step(denoised, t, sample, generator=generator).prev_sample
        finally:
            for module in in_training:
                module.train()

        images = sample.to(torch.float32)
        if output_type != "latent":
            images = _to_uint8(images).cpu()
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).numpy()
            elif output_type == "pil":
                # numpy_to_pil rounds x * 255: exact for u8 / 255, so the PIL bytes are EDM's bytes.
                images = self.numpy_to_pil(images.permute(0, 2, 3, 1).numpy().astype(np.float64) / 255)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _discriminator_for_sampling(self, discriminator):
        """A discriminator that reads the UNet's encoder (feature_source "unet") is bound to this pipeline's UNet."""
        config = getattr(discriminator, "config", None)
        if getattr(config, "feature_source", None) == "unet" and getattr(discriminator, "bound_unet", None) is not self.unet:
            discriminator.bind_unet(self.unet)
        return discriminator

    # ----- saving and loading -----------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size=None, push_to_hub: bool = False, **kwargs):
        """diffusers' ``save_pretrained`` plus the code files that make the folder load as remote code."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size, push_to_hub=False, **kwargs)
        self._write_code_layout(Path(save_directory))
        if push_to_hub:
            repo_id = kwargs.get("repo_id") or Path(save_directory).name
            self.push_to_hub(repo_id, private=kwargs.get("private", True), token=kwargs.get("token"),
                             commit_message=kwargs.get("commit_message"))

    def _write_code_layout(self, folder: Path) -> None:
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        for name, component in self.components.items():
            entry = index.get(name)
            if component is None or not isinstance(entry, list) or entry[0] is None or _is_installed_library(entry[0]):
                continue
            component_class = type(getattr(component, "_orig_mod", component))  # unwrap torch.compile
            index[name] = [self._copy_source(component_class, folder / name), component_class.__name__]
        index["_class_name"] = [self._copy_source(type(self), folder), type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @staticmethod
    def _copy_source(cls, destination: Path) -> str:
        """Copy the file defining ``cls`` into ``destination``; returns its module name (file stem)."""
        source = inspect.getsourcefile(cls)
        if source is None:
            raise ValueError(f"cannot save {cls.__name__}: its source file is unknown (defined interactively?)")
        foreign = foreign_imports(source)
        if foreign:
            logger.warning(
                f"{source} imports {foreign}: a saved pipeline's files should import only {sorted(ALLOWED_IMPORTS)} "
                "and the standard library, or it will not load with trust_remote_code in other environments."
            )
        destination.mkdir(parents=True, exist_ok=True)
        for path in _relative_import_closure(Path(source)):
            target = destination / path.name
            if path.resolve() != target.resolve():
                shutil.copyfile(path, target)
        return Path(source).stem

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved pipeline with the component classes installed next to this one (no remote code).

        A pipeline class that was itself loaded as remote code defers to diffusers' loader. Accepts
        ``torch_dtype``, components as keyword arguments, and Hub download options (``revision``,
        ``token``, ``cache_dir``, ``local_files_only``).
        """
        if cls.__module__.split(".")[0] == DIFFUSERS_DYNAMIC_MODULE_NAME:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.pop("trust_remote_code", None)  # nothing remote is executed here
        torch_dtype = kwargs.pop("torch_dtype", None)
        download = {key: kwargs.pop(key) for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs}
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            folder = Path(snapshot_download(str(pretrained_model_name_or_path), **download))
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: not a saved pipeline folder")
        index = json.loads(index_path.read_text(encoding="utf-8"))

        components = {}
        for name in inspect.signature(cls.__init__).parameters:
            if name == "self":
                continue
            if name in kwargs:
                components[name] = kwargs.pop(name)
                continue
            entry = index.get(name)
            if not isinstance(entry, list) or entry[0] is None:
                components[name] = None
                continue
            component_class = cls._installed_class(*entry)
            load_kwargs = {"subfolder": name}
            if torch_dtype is not None and issubclass(component_class, torch.nn.Module):
                load_kwargs["torch_dtype"] = torch_dtype
            components[name] = component_class.from_pretrained(folder, **load_kwargs)
        if kwargs:
            raise TypeError(f"from_pretrained got unexpected argument(s) {sorted(kwargs)}")
        pipeline = cls(**components)
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline

    @classmethod
    def _installed_class(cls, library: str, class_name: str):
        """The class for a model_index entry: from an installed library, or the module next to this file."""
        package = cls.__module__.rpartition(".")[0]
        if _is_installed_library(library):
            candidates = [library]
        else:
            candidates = [f"{package}.{library}", library] if package else [library]
        for module_name in candidates:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            if hasattr(module, class_name):
                return getattr(module, class_name)
        raise ValueError(
            f"model_index.json names {class_name} from {library!r}, which is not importable here (tried {candidates}); "
            "load with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) instead"
        )

    def push_to_hub(self, repo_id: str, private: bool = True, token: str | None = None,
                    commit_message: str | None = None, metrics: dict | None = None, card_data: dict | None = None,
                    api=None, **kwargs):
        """Upload the saved folder with the EchoDiff model card (``pipelines.hub.push_pipeline``).

        Without EchoDiff installed (a pipeline loaded as remote code), falls back to diffusers' push.
        """
        try:
            hub = importlib.import_module("pipelines.hub")  # EchoDiff's card renderer, when installed
            push_pipeline = hub.push_pipeline
        except (ImportError, AttributeError):
            return super().push_to_hub(repo_id, private=private, token=token, commit_message=commit_message, **kwargs)
        return push_pipeline(self, repo_id, private=private, metrics=metrics, card_data=card_data, api=api,
                             token=token, commit_message=commit_message)

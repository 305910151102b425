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
        if module.startswith(".") or (root not in ALLOWED_IMPORTS and root not in sys.stdlib_module_names):
            found.add(module)
    return sorted(found)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """EDM's image writer: x * 127.5 + 128, clipped to [0, 255], truncated."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _is_installed_library(library: str) -> bool:
    return library in LOADABLE_CLASSES or library.split(".")[0] in LOADABLE_CLASSES


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

        # The sampler runs in float64, as EDM's does (MPS has no float64).
        sample_dtype = torch.float32 if device.type == "mps" else torch.float64
        noise = randn_tensor(self._sample_shape(batch_size), generator=generator, device=device, dtype=torch.float32)
        sample = noise.to(sample_dtype) * scheduler.init_noise_sigma

        # Sampling never wants dropout: a network still in training mode is switched to eval for this call.
        was_training = isinstance(self.unet, torch.nn.Module) and self.unet.training
        if was_training:
            self.unet.eval()
        try:
            for t in self.progress_bar(scheduler.timesteps):
                model_input = scheduler.scale_model_input(sample, t)
                denoised = self.denoise(model_input, t, class_labels, scheduler=scheduler)
                sample = scheduler.step(denoised, t, sample, generator=generator).prev_sample
        finally:
            if was_training:
                self.unet.train()

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
        target = destination / Path(source).name
        if Path(source).resolve() != target.resolve():
            shutil.copyfile(source, target)
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

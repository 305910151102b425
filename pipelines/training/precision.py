"""Mixed-precision policy: what ``--mixed_precision auto`` means, and settings refused on a device."""

from __future__ import annotations

import logging
import os

import torch

from pipelines.training.config import ConfigError

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_mixed_precision(requested: str, cpu: bool = False) -> str:
    """The concrete precision for ``--mixed_precision auto``: the accelerate config's choice when the run
    was started by ``accelerate launch`` (it sets ACCELERATE_MIXED_PRECISION); otherwise bf16 on a CPU
    run where the CPU has native bf16 (1.9-2.4x fp32 there, issue 10), else fp32 ("no")."""
    if requested != "auto":
        return requested
    from_config = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if from_config:
        return from_config.lower()
    on_cpu = cpu or not torch.cuda.is_available()
    return "bf16" if on_cpu and cpu_has_native_bf16() else "no"


SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_sampling_precision(requested: str, device: str | torch.device = "cpu") -> str:
    """The pipeline's ``precision`` for ``auto``: bf16 autocast where the hardware has native bf16 (a CUDA
    device that supports it, a CPU with AVX512-BF16 or AMX), else fp32. bf16 keeps the FID of the demo model
    (KID difference within its standard error, issue 19) and runs faster there."""
    if requested not in SAMPLING_PRECISIONS:
        raise ValueError(f"--precision must be one of {SAMPLING_PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def check_device_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuses mixed-precision settings that would silently not do what was asked on ``device``."""
    if device.type == "cpu" and mixed_precision == "fp16":
        raise ConfigError(
            "--mixed_precision fp16: accelerate's fp16 autocast does nothing on the CPU (the run would be "
            "fp32); use --mixed_precision bf16 (fast on CPUs with bf16 support) or no"
        )
    if device.type == "cpu" and mixed_precision == "bf16" and not cpu_has_native_bf16():
        logger.warning("--mixed_precision bf16: this CPU has no native bf16; it runs, but slower than fp32")

"""The paper's three networks and EDM2's img64 UNets by name: presets, a builder, and tiny test-size configs.

``build_network("adm" | "ddpmpp" | "ncsnpp" | "edm2-xs" ... "edm2-xl", resolution=64, channels=1,
dropout=0.05, **overrides)`` gives the raw network F at the authors' default configuration (as in NVlabs
EDM and NVlabs edm2); every config field of the model class can be overridden.
"""

import inspect
from typing import Any, NamedTuple

from diffusers import ModelMixin

from pipelines.components.unet_adm import ADMUNet2DModel
from pipelines.components.unet_edm2 import EDM2UNet2DModel
from pipelines.components.unet_song import SongUNet2DModel


class ArchitecturePreset(NamedTuple):
    model_class: type
    config: dict[str, Any]
    num_parameters: int  # at 64x64, one channel in and out, unconditional (paper Table 1)


ARCHITECTURES: dict[str, ArchitecturePreset] = {
    "adm": ArchitecturePreset(
        ADMUNet2DModel,
        dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
             attn_resolutions=(32, 16, 8), channels_per_head=64),
        295_124_353,
    ),
    "ddpmpp": ArchitecturePreset(
        SongUNet2DModel,
        dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,),
             embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
             resample_filter=(1, 1)),
        55_725_825,
    ),
    "ncsnpp": ArchitecturePreset(
        SongUNet2DModel,
        dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,),
             embedding_type="fourier", fourier_scale=16.0, channel_mult_noise=2, encoder_type="residual",
             decoder_type="standard", resample_filter=(1, 3, 3, 1)),
        56_384_001,
    ),
}

# EDM2's img64 presets (NVlabs edm2 train_edm2.py: edm2-img64-xs ... -xl differ only in model_channels);
# counts from edm2's own Precond at 64x64, one channel, unconditional (UNet + logvar head).
EDM2_PRESETS = {"xs": (128, 124_194_341), "s": (192, 279_434_469), "m": (256, 496_769_957),
                "l": (320, 776_200_805), "xl": (384, 1_117_727_013)}
for _size, (_channels, _count) in EDM2_PRESETS.items():
    ARCHITECTURES[f"edm2-{_size}"] = ArchitecturePreset(
        EDM2UNet2DModel,
        dict(model_channels=_channels, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8),
             channels_per_head=64, logvar_channels=128),
        _count,
    )

# Named by build_network's own arguments instead, so each size is set in one place.
_RESERVED = {"sample_size": "resolution", "in_channels": "channels"}


def _check_arch(arch: str) -> ArchitecturePreset:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch]


def network_config(arch: str, resolution: int = 64, channels: int = 1, dropout: float = 0.05, label_dim: int = 0,
                   **overrides) -> dict[str, Any]:
    """The full constructor config that :func:`build_network` would use (validated, nothing built)."""
    preset = _check_arch(arch)
    for key, instead in _RESERVED.items():
        if key in overrides:
            raise ValueError(f"build_network: pass {instead}= instead of {key}=")
    allowed = set(inspect.signature(preset.model_class.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"build_network({arch!r}): unknown config field(s) {unknown}; "
            f"{preset.model_class.__name__} accepts {sorted(allowed - set(_RESERVED))}"
        )
    config = dict(preset.config)
    config.update(sample_size=resolution, in_channels=channels, out_channels=channels, dropout=dropout,
                  label_dim=label_dim)
    config.update(overrides)
    return config


def build_network(arch: str, resolution: int = 64, channels: int = 1, dropout: float = 0.05, label_dim: int = 0,
                  **overrides) -> ModelMixin:
    """Build the raw network F for ``arch`` (a key of ``ARCHITECTURES``); overrides are config fields."""
    config = network_config(arch, resolution, channels, dropout, label_dim, **overrides)
    return ARCHITECTURES[arch].model_class(**config)


def tiny_config(arch: str, resolution: int = 16) -> dict[str, Any]:
    """Overrides for a small (~50k parameter) test network of ``arch``, at ``resolution`` (16 or 32).

    Keeps the architecture's features: two levels, attention at the lower one (and both for ADM, with
    two heads), the arch's embedding, encoder and resampling filter. Use as
    ``build_network(arch, **tiny_config(arch))``.
    """
    _check_arch(arch)
    if resolution % 2 or resolution < 8:
        raise ValueError(f"tiny_config: resolution must be even and >= 8, got {resolution}")
    config: dict[str, Any] = dict(resolution=resolution, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                                  attn_resolutions=(resolution // 2,))
    if arch == "adm":
        config.update(attn_resolutions=(resolution, resolution // 2), channels_per_head=4)
    if is_edm2(arch):
        config.update(channels_per_head=4, logvar_channels=8)
    return config


def is_edm2(arch: str) -> bool:
    """Whether ``arch`` is one of EDM2's UNets (the ones with an uncertainty head, trained by --recipe edm2)."""
    return arch in ARCHITECTURES and ARCHITECTURES[arch].model_class is EDM2UNet2DModel

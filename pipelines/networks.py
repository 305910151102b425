"""The paper's three networks by name: presets, a builder, and tiny test-size configs.

``build_network("adm" | "ddpmpp" | "ncsnpp", resolution=64, channels=1, dropout=0.05, **overrides)``
gives the raw network F at the authors' default configuration (as in NVlabs EDM); every config field of
the model class can be overridden.
"""

import inspect
from typing import Any, NamedTuple

from diffusers import ModelMixin

from pipelines.components.unet_adm import ADMUNet2DModel
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
    """Build the raw network F for ``arch`` ("adm", "ddpmpp" or "ncsnpp"); overrides are config fields."""
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
    return config

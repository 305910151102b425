"""Noise-conditioned real/fake discriminator for Discriminator Guidance (Kim et al. 2023).

Carried by saved pipelines next to the discriminator's weights (with its siblings ``layers.py`` and
``preconditioning.py``): imports only torch, diffusers and the standard library.

``EchoDiffDiscriminator(x, sigma)`` takes the *noised* image ``x = y + sigma * n`` as the sampler sees
it and the noise level sigma, scales them the way the EDM-family preconditioning scales network inputs
(``c_in * x``, ``c_noise``), and returns one logit per sample for "real".

Two feature sources (a config field):
- ``"pixels"`` (default): an ADM-style encoder trained from scratch (residual blocks with scale-shift
  noise embedding, downsampling residual blocks, multi-head attention at low resolutions, attention
  pooling, linear head).
- ``"unet"``: the trained diffusion UNet's encoder half, frozen, with the same kind of small trainable
  encoder head on its lowest-resolution features. The UNet is *not* stored here: the discriminator is
  bound at run time to the pipeline's own ``unet`` (``bind_unet``), which already holds those exact
  weights, so a saved pipeline does not carry a second copy of them and this file needs no UNet code.
  The config records a fingerprint of the UNet it was trained on; binding any other UNet raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from .layers import PositionalEmbedding, group_norm
from .preconditioning import EDMPreconditioning

FEATURE_SOURCES = ("pixels", "unet")
POOLINGS = ("attention", "mean")


@dataclass
class DiscriminatorOutput(BaseOutput):
    """``logits``: (B,) float32 logit of "real" (sigmoid gives the discriminator's probability)."""

    logits: torch.Tensor


# ADM's noisy-classifier blocks, not layers.UNetBlock: average-pool downsampling, plain torch.nn layers with
# torch's init, and attention pooling, as the DG reference's discriminator; trained weights depend on this layout.
class _ResBlock(nn.Module):
    """ADM residual block: scale-shift noise conditioning, optional 2x average-pool downsampling."""

    # Checked instead of isinstance: diffusers re-executes a remote-code file when another pipeline folder is
    # loaded, and blocks built before that are instances of the previous _ResBlock class.
    takes_embedding = True

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, down: bool = False):
        super().__init__()
        self.down = down
        self.norm0 = group_norm(in_channels, eps=1e-5)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * out_channels)
        self.norm1 = group_norm(out_channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        if self.down:
            h = F.avg_pool2d(h, 2)
            x = F.avg_pool2d(x, 2)
        h = self.conv0(h)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm1(h) * (1 + scale) + shift)
        h = self.conv1(self.dropout(h))
        return (self.skip(x) if self.skip is not None else x) + h


class _SelfAttention(nn.Module):
    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.num_heads = max(1, channels // head_channels)
        self.norm = group_norm(channels, eps=1e-5)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _AttentionPool(nn.Module):
    """ADM-style attention pooling: the mean token (plus a learned position embedding) attends to all."""

    def __init__(self, channels: int, resolution: int, head_channels: int):
        super().__init__()
        self.num_heads = max(1, channels // head_channels)
        self.position = nn.Parameter(torch.randn(channels, resolution * resolution + 1) / channels**0.5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        tokens = x.reshape(b, c, -1)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1) + self.position[None]
        q, k, v = self.qkv(tokens).reshape(b, 3, self.num_heads, c // self.num_heads, -1).unbind(1)
        out = F.scaled_dot_product_attention(q[..., :1].transpose(-1, -2), k.transpose(-1, -2),
                                             v.transpose(-1, -2))
        return self.proj(out.transpose(-1, -2).reshape(b, c, 1))[:, :, 0]


class _FeaturesCaptured(Exception):
    """Raised by a forward hook to stop the UNet once its encoder features exist (skips the decoder)."""


def unet_fingerprint(unet: nn.Module) -> dict:
    """Weight statistics that identify a UNet (tolerant to dtype casts, sensitive to any training)."""
    total, abs_total, sq_total, count = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for param in unet.parameters():
            p = param.detach().double()
            total += p.sum().item()
            abs_total += p.abs().sum().item()
            sq_total += (p * p).sum().item()
            count += p.numel()
    return {"num_parameters": count, "sum": total, "abs_sum": abs_total, "sum_sq": sq_total}


def fingerprints_match(a: dict, b: dict, rtol: float = 1e-4) -> bool:
    if int(a["num_parameters"]) != int(b["num_parameters"]):
        return False
    scale = max(float(a["abs_sum"]), 1e-12)
    return (abs(a["sum"] - b["sum"]) <= rtol * scale and abs(a["abs_sum"] - b["abs_sum"]) <= rtol * scale
            and abs(a["sum_sq"] - b["sum_sq"]) <= rtol * max(float(a["sum_sq"]), 1e-12))


def default_unet_feature_module(unet: nn.Module) -> str:
    """Name of the last block of a UNet's encoder (its lowest-resolution features)."""
    for attr in ("enc", "down_blocks", "encoder", "input_blocks"):
        container = getattr(unet, attr, None)
        if isinstance(container, nn.ModuleDict) and len(container):
            return f"{attr}.{list(container.keys())[-1]}"
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and len(container):
            return f"{attr}.{len(container) - 1}"
    raise ValueError(
        "could not find the encoder of the given UNet (no 'enc', 'down_blocks', 'encoder' or 'input_blocks' "
        "container); pass unet_feature_module= naming the encoder block whose output to use"
    )


def capture_unet_features(unet: nn.Module, module_name: str, scaled_sample: torch.Tensor,
                          c_noise: torch.Tensor) -> torch.Tensor:
    """Output of ``unet.<module_name>`` for network inputs (c_in x, c_noise); the decoder is not run."""
    try:
        target = unet.get_submodule(module_name)
    except AttributeError as err:
        raise ValueError(f"unet_feature_module {module_name!r} is not a submodule of the UNet") from err
    captured = {}

    def hook(_module, _inputs, output):
        captured["features"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _FeaturesCaptured

    handle = target.register_forward_hook(hook)
    try:
        unet(scaled_sample.to(unet.dtype), c_noise.to(unet.dtype))
    except _FeaturesCaptured:
        pass
    finally:
        handle.remove()
    if "features" not in captured:
        raise RuntimeError(f"the UNet never ran its submodule {module_name!r}")
    features = captured["features"]
    if features.ndim != 4:
        raise ValueError(f"unet_feature_module {module_name!r} returned shape {tuple(features.shape)}, "
                         "expected (B, C, H, W) feature maps")
    return features.float()


class EchoDiffDiscriminator(ModelMixin, ConfigMixin):
    """Noise-conditioned encoder returning the logit that a noised image is real (see module docstring).

    Args:
        sample_size, in_channels: image resolution and channels of the data.
        feature_source: ``"pixels"`` (encoder on the image) or ``"unet"`` (encoder head on the frozen
            diffusion UNet's encoder features; call ``bind_unet`` before use).
        feature_channels, feature_resolution, unet_feature_module, unet_fingerprint: for ``"unet"``;
            filled by ``for_unet``.
        model_channels, channel_mult, num_res_blocks, attention_resolutions, head_channels, dropout,
        pool: the encoder's architecture (attention at the listed resolutions; ``head_channels`` per
            attention head; ``pool`` is ``"attention"`` or ``"mean"``).
        preconditioning, sigma_data, vp_beta_d, vp_beta_min, vp_M: how inputs are scaled (c_in,
            c_noise), the same as the diffusion model's preconditioning.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 1,
        feature_source: str = "pixels",
        feature_channels: int | None = None,
        feature_resolution: int | None = None,
        unet_feature_module: str | None = None,
        unet_fingerprint: dict | None = None,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        head_channels: int = 64,
        dropout: float = 0.0,
        pool: str = "attention",
        preconditioning: str = "edm",
        sigma_data: float = 0.5,
        vp_beta_d: float = 19.9,
        vp_beta_min: float = 0.1,
        vp_M: int = 1000,
    ):
        super().__init__()
        if feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source must be one of {FEATURE_SOURCES}, got {feature_source!r}")
        self.preconditioning = EDMPreconditioning.from_config(self.config)  # the same c_in, c_noise as the UNet's
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {POOLINGS}, got {pool!r}")
        if feature_source == "unet":
            if not feature_channels or not feature_resolution or not unet_feature_module:
                raise ValueError("feature_source='unet' needs feature_channels, feature_resolution and "
                                 "unet_feature_module; build it with EchoDiffDiscriminator.for_unet(unet, ...)")
            encoder_in, resolution = int(feature_channels), int(feature_resolution)
        else:
            encoder_in, resolution = int(in_channels), int(sample_size)
        if not channel_mult or any(int(m) < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult!r}")
        if resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"input resolution {resolution} is not divisible by 2^(len(channel_mult)-1)="
                             f"{2 ** (len(channel_mult) - 1)}")
        emb_dim = 4 * model_channels
        self._unet_ref: tuple = ()  # the bound UNet, kept out of this module's parameters on purpose

        self.noise_embedding = PositionalEmbedding(model_channels, endpoint=False)
        self.embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(encoder_in, model_channels * channel_mult[0], 3, padding=1)
        blocks = []
        channels = model_channels * channel_mult[0]
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level > 0:
                blocks.append(_ResBlock(channels, channels, emb_dim, dropout, down=True))
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(channels, model_channels * mult, emb_dim, dropout))
                channels = model_channels * mult
                if res in attention_resolutions:
                    blocks.append(_SelfAttention(channels, head_channels))
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = group_norm(channels, eps=1e-5)
        final_res = resolution >> (len(channel_mult) - 1)
        self.attention_pool = _AttentionPool(channels, final_res, head_channels) if pool == "attention" else None
        self.head = nn.Linear(channels, 1)

    # ------------------------------------------------------------------ UNet-encoder variant
    @classmethod
    def for_unet(cls, unet: nn.Module, unet_feature_module: str | None = None, **config):
        """A ``feature_source="unet"`` discriminator sized for ``unet``'s encoder features, bound to it."""
        unet_config = getattr(unet, "config", {})
        sample_size = int(config.pop("sample_size", _config_value(unet_config, "sample_size", "img_resolution")))
        in_channels = int(config.pop("in_channels", _config_value(unet_config, "in_channels", "img_channels")))
        module_name = unet_feature_module or default_unet_feature_module(unet)
        probe = torch.zeros(1, in_channels, sample_size, sample_size, device=unet.device)
        with torch.no_grad():
            features = capture_unet_features(unet, module_name, probe, torch.zeros(1, device=unet.device))
        model = cls(sample_size=sample_size, in_channels=in_channels, feature_source="unet",
                    feature_channels=features.shape[1], feature_resolution=features.shape[-1],
                    unet_feature_module=module_name, unet_fingerprint=unet_fingerprint(unet), **config)
        model.bind_unet(unet)
        return model

    def bind_unet(self, unet: nn.Module) -> EchoDiffDiscriminator:
        """Use ``unet``'s encoder as the frozen feature extractor (checked against the saved fingerprint)."""
        if self.config.feature_source != "unet":
            return self
        expected = self.config.unet_fingerprint
        if expected is not None and not fingerprints_match(expected, unet_fingerprint(unet)):
            raise ValueError(
                "this discriminator was trained on the features of a different UNet (weight fingerprint "
                f"{expected} does not match the given UNet's {unet_fingerprint(unet)}); retrain it for this UNet"
            )
        self._unet_ref = (unet,)
        return self

    @property
    def bound_unet(self) -> nn.Module | None:
        return self._unet_ref[0] if self._unet_ref else None

    # ------------------------------------------------------------------ forward
    def forward(self, sample: torch.Tensor, sigma: Union[torch.Tensor, float], return_dict: bool = True):
        """Logit of "real" for noised images ``sample`` (B, C, H, W) at noise level ``sigma`` ((B,) or scalar)."""
        if sample.ndim != 4:
            raise ValueError(f"sample must be (B, C, H, W), got shape {tuple(sample.shape)}")
        cfg = self.config
        sigma = torch.as_tensor(sigma, device=sample.device, dtype=torch.float64).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(sample.shape[0])
        if sigma.numel() != sample.shape[0]:
            raise ValueError(f"sigma must be a scalar or have one value per sample ({sample.shape[0]}), "
                             f"got {sigma.numel()}")
        _, _, c_in, c_noise = self.preconditioning.coefficients(sigma)
        x = sample.float() * c_in.float()[:, None, None, None]
        c_noise = c_noise.float()
        if cfg.feature_source == "unet":
            if self.bound_unet is None:
                raise RuntimeError("feature_source='unet' discriminator has no UNet: call bind_unet(pipeline.unet)")
            # The UNet is frozen: without a gradient w.r.t. the input (training), skip its graph.
            with torch.set_grad_enabled(torch.is_grad_enabled() and sample.requires_grad):
                x = capture_unet_features(self.bound_unet, cfg.unet_feature_module, x, c_noise)
        dtype = self.conv_in.weight.dtype
        emb = F.silu(self.embed(self.noise_embedding(c_noise).to(dtype)))
        h = self.conv_in(x.to(dtype))
        for block in self.blocks:
            h = block(h, emb) if getattr(block, "takes_embedding", False) else block(h)
        h = F.silu(self.out_norm(h))
        pooled = self.attention_pool(h) if self.attention_pool is not None else h.mean(dim=(2, 3))
        logits = self.head(pooled)[:, 0].float()
        if not return_dict:
            return (logits,)
        return DiscriminatorOutput(logits=logits)


def _config_value(config, *names):
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"the UNet's config has none of {names}; pass sample_size= and in_channels= explicitly")


__all__ = ["EchoDiffDiscriminator", "DiscriminatorOutput", "capture_unet_features", "default_unet_feature_module",
           "unet_fingerprint", "fingerprints_match"]

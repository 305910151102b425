"""EDM2's magnitude-preserving UNet (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Figure 21, config G) as one diffusers model, with its uncertainty (logvar) head.

Every layer keeps unit expected magnitude: weights are normalised at forward time (and, while training,
re-normalised in place: "forced weight normalisation", Eq. 66), activations go through MP SiLU, MP sum and
MP concat, there are no biases and no group norms. The network is F(x, c_noise) of EDM's preconditioning
(EDM2 keeps EDM's c_skip, c_out, c_in, c_noise = ln(sigma) / 4), so the same ``EDMPreconditioning`` and
``EDMHeunScheduler`` sample it. Module names follow NVlabs edm2's ``UNet`` / ``Precond`` (``enc`` / ``dec``
keyed ``"64x64_block0"``, ``emb_fourier``, ``emb_noise``, ``out_conv``, ``logvar_fourier``, ``logvar_linear``).

Carried by saved pipelines next to the files that import it: imports only torch, diffusers, the standard
library and its sibling ``layers.py``.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .layers import EDMUNetMixin, Resample, prepare_timestep

# E[silu(x)^2] = 0.596^2 for x ~ N(0, 1) (EDM2 Eq. 81).
SILU_GAIN = 0.596


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """``x`` scaled to unit RMS over ``dim`` (default: all but the first), with EDM2's ``eps`` on the norm."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its RMS on unit-normal input (Eq. 81)."""
    return F.silu(x) / SILU_GAIN


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b rescaled so two independent unit-variance inputs give unit variance (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation weighting ``b``'s share by ``t`` and keeping unit overall magnitude (Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """sqrt(2) cos(2 pi (f t + phase)), f ~ N(0, bandwidth^2), phase ~ U(0, 1): unit RMS features (Eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        y = torch.outer(t.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(t.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel`` (k, k)) or linear layer (``kernel`` ()), no bias (Eq. 47).

    The weight used is each output channel's weight vector normalised to unit norm and scaled by
    ``gain / sqrt(fan_in)``. While training, the stored weight is also re-normalised in place before use
    (forced weight normalisation, Eq. 66), so Adam's updates change directions, not magnitudes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class EDM2Block(nn.Module):
    """EDM2's encoder / decoder block (Figure 21): pixel norm (encoder), residual branch modulated by the
    embedding, MP sum with the main branch, optional cosine attention, activation clipping."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[int] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256.0):
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"EDM2Block: flavor 'enc'|'dec' and resample_mode 'keep'|'up'|'down', got "
                             f"{flavor!r}, {resample_mode!r}")
        if attention and out_channels % channels_per_head:
            raise ValueError(f"channels_per_head={channels_per_head} must divide {out_channels} channels of an "
                             f"attention block")
        self.in_channels, self.out_channels, self.flavor = in_channels, out_channels, flavor
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.resample = (None if resample_mode == "keep" else
                         Resample(in_channels, up=resample_mode == "up", down=resample_mode == "down",
                                  resample_filter=tuple(resample_filter)))
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is not None:
            x = self.resample(x)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            batch, channels, height, width = x.shape
            # qkv channels ordered (head, channel-in-head, q/k/v) as EDM2's; q, k, v normalised per pixel and head.
            qkv = self.attn_qkv(x).reshape(batch, self.num_heads, channels // self.num_heads, 3, height * width)
            q, k, v = normalize(qkv, dim=2).permute(3, 0, 1, 4, 2).contiguous().unbind(0)  # (B, heads, HW, c)
            y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, EDM2's einsum pair
            y = self.attn_proj(y.transpose(-1, -2).reshape(batch, channels, height, width))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


@dataclass
class EDM2UNet2DOutput(BaseOutput):
    """``sample``: F(x, c_noise), shaped like the input; ``logvar``: u(sigma) (B, 1, 1, 1) when asked for."""

    sample: torch.Tensor
    logvar: torch.Tensor | None = None


class EDM2UNet2DModel(EDMUNetMixin, ModelMixin, ConfigMixin):
    """EDM2's UNet F(x, c_noise) and its uncertainty head u(c_noise) (EDM2 Eq. 21), as NVlabs edm2 builds them.

    ``model_channels`` 128 / 192 / 256 / 320 / 384 are EDM2's XS / S / M / L / XL (``pipelines.networks``
    names them ``edm2-xs`` ... ``edm2-xl``). ``forward(..., return_logvar=True)`` also returns the head's
    log-variance, which only the training loss uses.
    """

    _supports_gradient_checkpointing = True
    dtype_probe = "emb_noise"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 1,
        out_channels: int = 1,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
        logvar_channels: int = 128,
        resample_filter: Sequence[int] = (1, 1),
    ):
        super().__init__()
        if sample_size % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"sample_size {sample_size} must be divisible by 2**(len(channel_mult)-1)")
        if min(in_channels, out_channels, model_channels, num_blocks, channels_per_head, logvar_channels,
               len(channel_mult)) < 1:
            raise ValueError("in_channels, out_channels, model_channels, num_blocks, channels_per_head, "
                             "logvar_channels and channel_mult must be >= 1")
        self.gradient_checkpointing = False
        block_channels = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else block_channels[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(block_channels)
        block_kwargs = dict(resample_filter=tuple(resample_filter), channels_per_head=channels_per_head,
                            dropout=dropout, res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, ())
        self.emb_label = MPConv(label_dim, emb_channels, ()) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels + 1  # the constant-one channel EDM2 appends to the input
        for level, channels in enumerate(block_channels):
            res = sample_size >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, (3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = EDM2Block(cout, cout, emb_channels, "enc", "down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, emb_channels, "enc",
                                                                attention=res in attn_resolutions, **block_kwargs)

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(block_channels))):
            res = sample_size >> level
            if level == len(block_channels) - 1:
                self.dec[f"{res}x{res}_in0"] = EDM2Block(cout, cout, emb_channels, "dec", attention=True,
                                                         **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = EDM2Block(cout, cout, emb_channels, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = EDM2Block(cout, cout, emb_channels, "dec", "up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, emb_channels, "dec",
                                                                attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, out_channels, (3, 3))

        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, ())

    def _embedding(self, timestep: torch.Tensor, labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(timestep).to(dtype))
        if self.emb_label is not None:
            label_emb = self.emb_label((labels * math.sqrt(labels.shape[1])).to(dtype))
            emb = mp_sum(emb, label_emb, t=self.config.label_balance)
        return mp_silu(emb)

    def logvar(self, timestep: torch.Tensor) -> torch.Tensor:
        """u(c_noise) of EDM2 Eq. 21 as (B, 1, 1, 1) float32: the log-variance of the loss at that noise level."""
        return self.logvar_linear(self.logvar_fourier(timestep.to(torch.float32))).reshape(-1, 1, 1, 1)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, return_logvar: bool = False):
        """sample (B, C, H, W); timestep: c_noise, (B,) or scalar; class_labels (B, label_dim) if label_dim > 0."""
        sample, emb = self.prepare_inputs(sample, timestep, class_labels)
        x = torch.cat([sample, torch.ones_like(sample[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else self._block(block, x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.config.concat_balance)
            x = self._block(block, x, emb)
        x = self.out_conv(x, gain=self.out_gain)

        logvar = self.logvar(prepare_timestep(timestep, sample)) if return_logvar else None
        if not return_dict:
            return (x, logvar) if return_logvar else (x,)
        return EDM2UNet2DOutput(sample=x, logvar=logvar)

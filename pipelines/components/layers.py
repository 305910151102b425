"""Layers shared by the UNets (DDPM++ / NCSN++ and ADM, as NVlabs EDM re-implements them) and the discriminator.

``Linear`` and ``Conv2d`` are ``torch.nn.Linear`` / ``torch.nn.Conv2d`` with EDM's explicit init schemes (and,
for convolutions, 2x FIR up/down-sampling), so diffusers' layer-type tools (``enable_layerwise_casting``)
see them. Carried by saved pipelines next to the files that import it: imports only torch and the
standard library.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT_HALF = math.sqrt(0.5)


def init_uniform_(tensor: torch.Tensor | None, scheme: str, fan_in: int, fan_out: int, gain: float) -> None:
    """Uniform init: ``xavier`` bound sqrt(6/(fan_in+fan_out)), ``kaiming`` bound sqrt(3/fan_in), times gain."""
    if tensor is None:
        return
    if scheme == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
    elif scheme == "kaiming":
        bound = math.sqrt(3.0 / fan_in)
    else:
        raise ValueError(f"init scheme must be 'xavier' or 'kaiming', got {scheme!r}")
    with torch.no_grad():
        tensor.uniform_(-bound * gain, bound * gain)


class Linear(nn.Linear):
    """``torch.nn.Linear`` initialised with ``scheme`` scaled by ``weight_gain`` / ``bias_gain``."""

    def __init__(self, in_features, out_features, bias=True, scheme="xavier", weight_gain=1.0, bias_gain=0.0):
        self.init_scheme = (scheme, weight_gain, bias_gain)  # read by reset_parameters, which nn.Linear calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        scheme, weight_gain, bias_gain = self.init_scheme
        init_uniform_(self.weight, scheme, self.in_features, self.out_features, weight_gain)
        init_uniform_(self.bias, scheme, self.in_features, self.out_features, bias_gain)


def _fir_filter(resample_filter) -> torch.Tensor:
    """The separable 2-D FIR kernel (1, 1, k, k) of 1-D taps, normalised to sum 1."""
    taps = torch.as_tensor(resample_filter, dtype=torch.float32)
    return (torch.outer(taps, taps) / taps.sum().square())[None, None]


def _upsample(x: torch.Tensor, f: torch.Tensor, channels: int, padding: int) -> torch.Tensor:
    return F.conv_transpose2d(x, (f * 4).tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)


def _downsample(x: torch.Tensor, f: torch.Tensor, channels: int, padding: int) -> torch.Tensor:
    return F.conv2d(x, f.tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` ('same' padding) with EDM's init and optional 2x FIR up- or down-sampling.

    ``fused_resample`` convolves first and then filters with stride 2 (down), as the NCSN++ residual
    encoder does; otherwise the resampling filter is applied before the convolution.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, scheme="xavier", weight_gain=1.0, bias_gain=0.0):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        self.init_scheme = (scheme, weight_gain, bias_gain)  # read by reset_parameters, which nn.Conv2d calls
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2, bias=bias)
        self.up, self.down, self.fused_resample = up, down, fused_resample
        # Derived from the config, so not saved with the weights.
        self.register_buffer("resample_filter", _fir_filter(resample_filter) if (up or down) else None,
                             persistent=False)

    def reset_parameters(self) -> None:
        scheme, weight_gain, bias_gain = self.init_scheme
        kernel = self.kernel_size[0]
        fan_in, fan_out = self.in_channels * kernel * kernel, self.out_channels * kernel * kernel
        init_uniform_(self.weight, scheme, fan_in, fan_out, weight_gain)
        init_uniform_(self.bias, scheme, fan_in, fan_out, bias_gain)

    def forward(self, x):
        w, b, f = self.weight, self.bias, self.resample_filter
        w_pad = w.shape[-1] // 2
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if f is not None:
            f = f.to(x.dtype)
        if self.fused_resample and self.up:
            x = F.conv2d(_upsample(x, f, self.in_channels, w_pad + f_pad), w)
        elif self.fused_resample and self.down:
            x = _downsample(F.conv2d(x, w, padding=w_pad + f_pad), f, self.out_channels, 0)
        else:
            if self.up:
                x = _upsample(x, f, self.in_channels, f_pad)
            if self.down:
                x = _downsample(x, f, self.in_channels, f_pad)
            x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class Resample(nn.Module):
    """2x FIR up- or down-sampling with no weights (EDM's ``Conv2d`` with ``kernel=0``)."""

    def __init__(self, channels, up=False, down=False, resample_filter=(1, 1)):
        super().__init__()
        if up == down:
            raise ValueError("Resample: exactly one of up and down")
        self.channels, self.up = channels, up
        self.register_buffer("resample_filter", _fir_filter(resample_filter), persistent=False)

    def forward(self, x):
        f = self.resample_filter.to(x.dtype)
        pad = (f.shape[-1] - 1) // 2
        return _upsample(x, f, self.channels, pad) if self.up else _downsample(x, f, self.channels, pad)


def group_norm(channels: int, eps: float) -> nn.GroupNorm:
    """EDM's group norm: min(32, channels // 4) groups (at least 1)."""
    return nn.GroupNorm(num_groups=max(1, min(32, channels // 4)), num_channels=channels, eps=eps)


class UNetBlock(nn.Module):
    """Residual block with optional resampling and multi-head self-attention (SDPA)."""

    def __init__(
        self, in_channels, out_channels, emb_channels, *, up=False, down=False, attention=False, num_heads=1,
        dropout=0.0, skip_scale=1.0, eps=1e-5, resample_filter=(1, 1), resample_proj=False,
        adaptive_scale=True, init=None, init_zero=None, init_attn=None,
    ):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else {"weight_gain": 0.0, "bias_gain": 0.0}
        init_attn = init_attn if init_attn is not None else init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = num_heads if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"{out_channels} channels do not split into {self.num_heads} attention heads")
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            if resample_proj or out_channels != in_channels:
                self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter,
                                   **init)
            else:
                self.skip = Resample(in_channels, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale

        if self.num_heads:
            batch, channels, height, width = h.shape
            # qkv channels are ordered (head, channel-in-head, q/k/v), EDM's layout, so its weights load as is.
            qkv = self.qkv(self.norm2(h)).reshape(batch, self.num_heads, channels // self.num_heads, 3, height * width)
            # One contiguous copy: SDPA is several times faster on contiguous q, k, v (CPU and CUDA kernels).
            q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)  # each (B, heads, HW, channels per head)
            attn = F.scaled_dot_product_attention(q, k, v)
            attn = attn.transpose(-1, -2).reshape(batch, channels, height, width)
            h = (self.proj(attn) + h) * self.skip_scale
        return h


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of c_noise: [cos(t f_i), sin(t f_i)], f_i = (1/max_positions)^(i/n)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, t):
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / (half - (1 if self.endpoint else 0))
        freqs = (1.0 / self.max_positions) ** exponents
        angles = torch.outer(t.to(torch.float32), freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise: [cos(2 pi t f), sin(2 pi t f)], f ~ N(0, scale^2) (a saved buffer)."""

    def __init__(self, num_channels, scale=16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, t):
        angles = torch.outer(t.to(torch.float32), (2 * math.pi * self.freqs).to(torch.float32))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def prepare_timestep(timestep, sample: torch.Tensor) -> torch.Tensor:
    """c_noise as a float32 (B,) tensor: a scalar is broadcast over the batch."""
    batch = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep must be a scalar or have shape ({batch},), got shape {tuple(t.shape)}")
    return t


def prepare_labels(class_labels, label_dim: int, sample: torch.Tensor) -> torch.Tensor | None:
    """class_labels as float32 (B, label_dim); zeros ("no label", as with label dropout) when None."""
    if label_dim == 0:
        if class_labels is not None:
            raise ValueError("class_labels given but the model was built with label_dim=0 (unconditional)")
        return None
    batch = sample.shape[0]
    if class_labels is None:
        return torch.zeros(batch, label_dim, device=sample.device, dtype=torch.float32)
    labels = torch.as_tensor(class_labels, device=sample.device).to(torch.float32)
    if labels.ndim == 1 and label_dim == 1:
        labels = labels[:, None]
    if labels.shape != (batch, label_dim):
        raise ValueError(f"class_labels must have shape ({batch}, {label_dim}), got {tuple(labels.shape)}")
    return labels


def drop_labels(labels: torch.Tensor, probability: float, training: bool) -> torch.Tensor:
    """Label dropout: during training, each sample's label row is zeroed with ``probability``."""
    if not (training and probability):
        return labels
    keep = torch.rand(labels.shape[0], 1, device=labels.device) >= probability
    return labels * keep.to(labels.dtype)


class EDMUNetMixin:
    """What both EDM UNets do around their blocks: input checks, the compute dtype, the embedding, checkpointing.

    The model class provides ``config`` (in_channels, label_dim), ``dtype`` and ``_embedding(t, labels, dtype)``;
    ``dtype_probe`` names the layer whose weight (or layerwise-casting hook) gives the compute dtype.
    """

    dtype_probe = "map_layer0"

    def prepare_inputs(self, sample: torch.Tensor, timestep, class_labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample in the compute dtype, embedding of c_noise and the labels)."""
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must have shape (B, {self.config.in_channels}, H, W), got {tuple(sample.shape)}")
        dtype = self.compute_dtype
        if not torch.is_autocast_enabled(sample.device.type):
            sample = sample.to(dtype)
        t = prepare_timestep(timestep, sample)
        labels = prepare_labels(class_labels, self.config.label_dim, sample)
        return sample, self._embedding(t, labels, dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The weights' dtype, or the compute dtype of diffusers' layerwise casting (which ``ModelMixin.dtype``
        finds by visiting every module: 0.15 ms a call on a tiny UNet; this reads one layer's hook)."""
        probe = getattr(self, self.dtype_probe)
        registry = getattr(probe, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        return hook.compute_dtype if hook is not None else probe.weight.dtype

    def _block(self, block, x, emb):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, emb)
        return block(x, emb)

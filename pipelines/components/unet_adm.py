"""ADM (Dhariwal & Nichol 2021) as a diffusers model, laid out like NVlabs EDM's `DhariwalUNet`.

Module and parameter names mirror EDM's re-implementation (``enc``/``dec`` ModuleDicts keyed
``"64x64_block0"``, ``map_noise``/``map_layer0``/``map_layer1``/``map_label``, ``out_norm``/``out_conv``),
so an EDM checkpoint converts by an identity name table (see ``docs/edm_checkpoint_mapping.md``).
"""

# Layer code is repeated in unet_song.py on purpose: each file must load standalone (trust_remote_code).

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


def _init_uniform_(tensor: torch.Tensor | None, scheme: str, fan_in: int, fan_out: int, gain: float) -> None:
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


class Linear(nn.Module):
    """Fully connected layer with an explicit init scheme (weights (out, in), like torch.nn.Linear)."""

    def __init__(self, in_features, out_features, bias=True, scheme="xavier", weight_gain=1.0, bias_gain=0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_uniform_(self.weight, scheme, in_features, out_features, weight_gain)
        _init_uniform_(self.bias, scheme, in_features, out_features, bias_gain)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """Convolution with optional 2x FIR up/down-sampling; ``kernel=0`` means resampling only (no weights).

    ``fused_resample`` convolves first and then filters with stride 2 (down), as the NCSN++ residual
    encoder does; otherwise the resampling filter is applied before the convolution.
    """

    def __init__(
        self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
        fused_resample=False, scheme="xavier", weight_gain=1.0, bias_gain=0.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if kernel and bias else None
        _init_uniform_(self.weight, scheme, fan_in, fan_out, weight_gain)
        _init_uniform_(self.bias, scheme, fan_in, fan_out, bias_gain)
        # The 2-D filter is derived from the config, so it is not saved with the weights.
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        kernel_2d = torch.outer(taps, taps) / taps.sum().square()
        self.register_buffer("resample_filter", kernel_2d[None, None] if (up or down) else None, persistent=False)

    def forward(self, x):
        w, b, f = self.weight, self.bias, self.resample_filter
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if f is not None:
            f = f.to(x.dtype)
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                   stride=2, padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.to(x.dtype).reshape(1, -1, 1, 1)
        return x


def _group_norm(channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=eps)


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

        self.norm0 = _group_norm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = _group_norm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = _group_norm(out_channels, eps)
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


def _prepare_timestep(timestep, sample: torch.Tensor) -> torch.Tensor:
    batch = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep must be a scalar or have shape ({batch},), got shape {tuple(t.shape)}")
    return t


def _prepare_labels(class_labels, label_dim: int, sample: torch.Tensor) -> torch.Tensor | None:
    if label_dim == 0:
        if class_labels is not None:
            raise ValueError("class_labels given but the model was built with label_dim=0 (unconditional)")
        return None
    batch = sample.shape[0]
    if class_labels is None:  # the "no label" input, as with label dropout
        return torch.zeros(batch, label_dim, device=sample.device, dtype=torch.float32)
    labels = torch.as_tensor(class_labels, device=sample.device).to(torch.float32)
    if labels.ndim == 1 and label_dim == 1:
        labels = labels[:, None]
    if labels.shape != (batch, label_dim):
        raise ValueError(f"class_labels must have shape ({batch}, {label_dim}), got {tuple(labels.shape)}")
    return labels



class ADMUNet2DModel(ModelMixin, ConfigMixin):
    """ADM UNet F(x, c_noise) of Dhariwal & Nichol (2021), as re-implemented in NVlabs EDM.

    Scale-shift (adaptive) group norm, attention with ``channels_per_head`` channels per head at
    ``attn_resolutions``, an extra attention block at the start of the decoder's lowest resolution.
    Init: Kaiming-uniform weights and biases scaled by sqrt(1/3); zero-initialised residual-branch/output convolutions.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 1,
        out_channels: int = 1,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        channels_per_head: int = 64,
        dropout: float = 0.05,
        label_dropout: float = 0.0,
        resample_filter: Sequence[int] = (1, 1),
    ):
        super().__init__()
        if sample_size % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"sample_size {sample_size} must be divisible by 2**(len(channel_mult)-1)")
        if min(in_channels, out_channels, model_channels, num_blocks, channels_per_head, len(channel_mult)) < 1:
            raise ValueError(
                "in_channels, out_channels, model_channels, num_blocks, channels_per_head and channel_mult must be >= 1"
            )
        self.gradient_checkpointing = False

        emb_channels = model_channels * channel_mult_emb
        init = {"scheme": "kaiming", "weight_gain": math.sqrt(1 / 3), "bias_gain": math.sqrt(1 / 3)}
        init_zero = {"scheme": "kaiming", "weight_gain": 0.0, "bias_gain": 0.0}

        def block(cin, cout, attention=False, **kwargs):
            if attention and cout % channels_per_head:
                raise ValueError(f"channels_per_head={channels_per_head} must divide {cout} channels of an attention block")
            return UNetBlock(
                cin, cout, emb_channels, attention=attention, num_heads=cout // channels_per_head, dropout=dropout,
                skip_scale=1.0, eps=1e-5, resample_filter=tuple(resample_filter), resample_proj=False,
                adaptive_scale=True, init=init, init_zero=init_zero, **kwargs,
            )

        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(label_dim, emb_channels, bias=False)
            with torch.no_grad():
                self.map_label.weight.normal_(0.0, 1.0)  # unit-variance class embedding per label

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = sample_size >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attn_resolutions)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = sample_size >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attn_resolutions)
        self.out_norm = _group_norm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def _block(self, block, x, emb):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, emb)
        return block(x, emb)

    def _embedding(self, timestep: torch.Tensor, labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        emb = self.map_noise(timestep).to(dtype)  # ADM order: [cos, sin]
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if self.training and self.config.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.config.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels.to(dtype))
        return F.silu(emb)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        """sample (B, C, H, W); timestep: c_noise, (B,) or scalar; class_labels (B, label_dim) if label_dim > 0."""
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must have shape (B, {self.config.in_channels}, H, W), got {tuple(sample.shape)}")
        dtype = self.map_layer0.weight.dtype
        if not torch.is_autocast_enabled(sample.device.type):
            sample = sample.to(dtype)
        t = _prepare_timestep(timestep, sample)
        labels = _prepare_labels(class_labels, self.config.label_dim, sample)
        emb = self._embedding(t, labels, dtype)

        x = sample
        skips = []
        for block in self.enc.values():
            x = self._block(block, x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._block(block, x, emb)
        x = self.out_conv(F.silu(self.out_norm(x)))

        if not return_dict:
            return (x,)
        return UNet2DOutput(sample=x)

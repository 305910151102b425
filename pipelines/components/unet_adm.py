"""ADM (Dhariwal & Nichol 2021) as a diffusers model, laid out like NVlabs EDM's `DhariwalUNet`.

Module and parameter names mirror EDM's re-implementation (``enc``/``dec`` ModuleDicts keyed
``"64x64_block0"``, ``map_noise``/``map_layer0``/``map_layer1``/``map_label``, ``out_norm``/``out_conv``),
so an EDM checkpoint converts by an identity name table (see ``docs/edm_checkpoint_mapping.md``).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .layers import (
    Conv2d,
    EDMUNetMixin,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    drop_labels,
    group_norm,
)


class ADMUNet2DModel(EDMUNetMixin, ModelMixin, ConfigMixin):
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
        self.out_norm = group_norm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def _embedding(self, timestep: torch.Tensor, labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        emb = self.map_noise(timestep).to(dtype)  # ADM order: [cos, sin]
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = drop_labels(labels, self.config.label_dropout, self.training)
            emb = emb + self.map_label(labels.to(dtype))
        return F.silu(emb)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        """sample (B, C, H, W); timestep: c_noise, (B,) or scalar; class_labels (B, label_dim) if label_dim > 0."""
        sample, emb = self.prepare_inputs(sample, timestep, class_labels)

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

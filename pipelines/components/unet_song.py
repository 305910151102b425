"""DDPM++ and NCSN++ (Song et al. 2021) as one diffusers model, laid out like NVlabs EDM's `SongUNet`.

Module and parameter names mirror EDM's re-implementation (``enc``/``dec`` ModuleDicts keyed
``"64x64_block0"``, ``map_noise``/``map_label``/``map_layer0``/``map_layer1``, ...), so an EDM
checkpoint converts by an identity name table (see ``docs/edm_checkpoint_mapping.md``).
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
    SQRT_HALF,
    Conv2d,
    EDMUNetMixin,
    FourierEmbedding,
    Linear,
    PositionalEmbedding,
    Resample,
    UNetBlock,
    drop_labels,
    group_norm,
)


class SongUNet2DModel(EDMUNetMixin, ModelMixin, ConfigMixin):
    """DDPM++ / NCSN++ UNet F(x, c_noise) of Song et al. (2021), as re-implemented in NVlabs EDM.

    DDPM++: ``embedding_type="positional", channel_mult_noise=1, encoder_type="standard", resample_filter=(1, 1)``;
    NCSN++: ``embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1)``.
    Init: Xavier-uniform weights and zero biases; output/residual-branch convolutions scaled by 1e-5, attention qkv by sqrt(0.2).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 1,
        out_channels: int = 1,
        label_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.05,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        fourier_scale: float = 16.0,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[int] = (1, 1),
    ):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        if sample_size % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"sample_size {sample_size} must be divisible by 2**(len(channel_mult)-1)")
        if min(in_channels, out_channels, model_channels, num_blocks, len(channel_mult)) < 1:
            raise ValueError("in_channels, out_channels, model_channels, num_blocks and channel_mult must be >= 1")
        self.gradient_checkpointing = False

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = {"scheme": "xavier"}
        init_zero = {"scheme": "xavier", "weight_gain": 1e-5}
        init_attn = {"scheme": "xavier", "weight_gain": math.sqrt(0.2)}
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=SQRT_HALF, eps=1e-6,
            resample_filter=tuple(resample_filter), resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels, scale=fourier_scale)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Built in EDM's order (encoder, then decoder), so a seed gives EDM's initial weights.
        self.enc = self._encoder(block_kwargs, init)
        self.dec = self._decoder(block_kwargs, init_zero)

    def _encoder(self, block_kwargs: dict, init: dict) -> nn.ModuleDict:
        c = self.config
        enc, cout, caux, resample_filter = nn.ModuleDict(), c.in_channels, c.in_channels, tuple(c.resample_filter)
        for level, mult in enumerate(c.channel_mult):
            res = c.sample_size >> level
            if level == 0:
                cin, cout = cout, c.model_channels
                enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if c.encoder_type == "skip":
                    enc[f"{res}x{res}_aux_down"] = Resample(caux, down=True, resample_filter=resample_filter)
                    enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if c.encoder_type == "residual":
                    enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                                              fused_resample=True, **init)
                    caux = cout
            for idx in range(c.num_blocks):
                cin, cout = cout, c.model_channels * mult
                enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in c.attn_resolutions,
                                                           **block_kwargs)
        return enc

    def _decoder(self, block_kwargs: dict, init_zero: dict) -> nn.ModuleDict:
        c = self.config
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]
        dec, cout, top = nn.ModuleDict(), skips[-1], len(c.channel_mult) - 1
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            res = c.sample_size >> level
            if level == top:
                dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(c.num_blocks + 1):
                cin, cout = cout + skips.pop(), c.model_channels * mult
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(idx == c.num_blocks and res in c.attn_resolutions), **block_kwargs)
            if c.decoder_type == "skip" or level == 0:
                if c.decoder_type == "skip" and level < top:
                    dec[f"{res}x{res}_aux_up"] = Resample(c.out_channels, up=True,
                                                          resample_filter=tuple(c.resample_filter))
                dec[f"{res}x{res}_aux_norm"] = group_norm(cout, eps=1e-6)
                dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, c.out_channels, 3, **init_zero)
        return dec

    def _embedding(self, timestep: torch.Tensor, labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        emb = self.map_noise(timestep)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # DDPM++/NCSN++ order: [sin, cos]
        emb = emb.to(dtype)
        if self.map_label is not None:
            labels = drop_labels(labels, self.config.label_dropout, self.training)
            emb = emb + self.map_label((labels * math.sqrt(self.map_label.in_features)).to(dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        """sample (B, C, H, W); timestep: c_noise, (B,) or scalar; class_labels (B, label_dim) if label_dim > 0."""
        sample, emb = self.prepare_inputs(sample, timestep, class_labels)

        x = aux = sample
        skips = []
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) * SQRT_HALF
            elif isinstance(block, UNetBlock):
                x = self._block(block, x, emb)
                skips.append(x)
            else:
                x = block(x)
                skips.append(x)

        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = self._block(block, x, emb)

        if not return_dict:
            return (aux,)
        return UNet2DOutput(sample=aux)

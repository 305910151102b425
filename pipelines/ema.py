"""EDM-style exponential moving averages of network weights (Karras et al. 2022, training loop).

The EMA half-life is given in images, not steps, so it means the same thing at any batch size:
after each optimiser step that consumed ``batch_size`` images,

    half_life = min(half_life_kimg * 1000, rampup_ratio * images_seen_before_this_step)
    beta      = 0.5 ** (batch_size / half_life)
    ema       = beta * ema + (1 - beta) * weights

so early in training (few images seen) the average follows the weights closely. Several half-lives
can be tracked at once; each is a set of float32 shadow tensors (not a model copy), and
``copy_to(model, i)`` writes one of them into a network for sampling or export.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

# Not diffusers' EMAModel: its decay schedule is per step ((1+t)/(10+t) or inv_gamma/power), not
# EDM's half-life in images with a ramp-up, which the paper's runs used.


def ema_beta(batch_size: int, images_seen: int, half_life_kimg: float, rampup_ratio: float | None) -> float:
    """EDM's per-step EMA decay for a step of ``batch_size`` images after ``images_seen`` images."""
    half_life_nimg = half_life_kimg * 1000.0
    if rampup_ratio is not None:
        half_life_nimg = min(half_life_nimg, images_seen * rampup_ratio)
    if half_life_nimg <= 0:
        return 0.0  # nothing seen yet: the average starts as a copy of the weights
    return 0.5 ** (batch_size / half_life_nimg)


class EDMEma:
    """EMA shadows of ``model``'s parameters and floating-point buffers for one or more half-lives."""

    def __init__(
        self,
        model: torch.nn.Module,
        half_life_kimg: float | Sequence[float] = 500.0,
        rampup_ratio: float | None = 0.05,
    ):
        half_lives = [half_life_kimg] if isinstance(half_life_kimg, int | float) else list(half_life_kimg)
        if not half_lives:
            raise ValueError("half_life_kimg: expected at least one EMA half-life (kimg), got none")
        for h in half_lives:
            if not h > 0:
                raise ValueError(f"half_life_kimg: expected positive half-lives in kimg, got {h}")
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise ValueError(f"rampup_ratio: expected a positive ratio or None, got {rampup_ratio}")
        self.half_lives_kimg = [float(h) for h in half_lives]
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)
        self._init_shadows(model, len(half_lives))

    def _init_shadows(self, model: torch.nn.Module, count: int) -> None:
        self.names = [name for name, _ in self._tracked(model)]
        self.shadows: list[list[torch.Tensor]] = [
            [t.detach().to(torch.float32, copy=True) for _, t in self._tracked(model)] for _ in range(count)
        ]

    @staticmethod
    def _tracked(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        yield from model.named_parameters()
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                yield name, buf

    def _current(self, model: torch.nn.Module) -> list[torch.Tensor]:
        tensors = dict(self._tracked(model))
        missing = [n for n in self.names if n not in tensors]
        if missing or len(tensors) != len(self.names):
            raise ValueError(
                f"model: its tensors do not match the EMA's ({len(tensors)} vs {len(self.names)}; "
                f"missing {missing[:3]})"
            )
        return [tensors[n] for n in self.names]

    def betas(self, batch_size: int, images_seen: int) -> list[float]:
        return [ema_beta(batch_size, images_seen, h, self.rampup_ratio) for h in self.half_lives_kimg]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, batch_size: int, images_seen: int) -> list[float]:
        """One EMA step after an optimiser step of ``batch_size`` images; ``images_seen`` counts the
        images consumed before that step (EDM's convention). Returns the betas used."""
        current = [t.detach().to(torch.float32) for t in self._current(model)]
        betas = self.betas(batch_size, images_seen)
        for shadow, beta in zip(self.shadows, betas):
            # lerp(end=shadow, weight=beta) = (1-beta)*current + beta*shadow, in place on the shadow
            torch._foreach_lerp_(shadow, current, 1.0 - beta)
        return betas

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module, index: int = 0) -> torch.nn.Module:
        """Write EMA ``index`` into ``model`` (cast to each tensor's dtype); returns the model."""
        for target, shadow in zip(self._current(model), self.shadows[index]):
            target.copy_(shadow.to(device=target.device, dtype=target.dtype))
        return model

    def to(self, device: torch.device | str) -> EDMEma:
        self.shadows = [[t.to(device) for t in shadow] for shadow in self.shadows]
        return self

    # ---- persistence (safetensors, never pickle) ----
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema{i}/{name}": t for i, shadow in enumerate(self.shadows) for name, t in zip(self.names, shadow)}

    def settings(self) -> dict[str, object]:
        """What defines the averages besides the tensors (saved as metadata)."""
        return {"half_lives_kimg": self.half_lives_kimg, "rampup_ratio": self.rampup_ratio}

    def check_saved_settings(self, saved: dict[str, str], path: str) -> None:
        half_lives = json.loads(saved.get("half_lives_kimg", "null"))
        if half_lives != self.half_lives_kimg:
            raise ValueError(
                f"{path}: EMA half-lives {half_lives} kimg in the checkpoint, but this run asks for "
                f"{self.half_lives_kimg}; pass the same --ema_halflife_kimg to resume"
            )

    def save(self, path: str) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, path, metadata={k: json.dumps(v) for k, v in self.settings().items()})

    def load(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            self.check_saved_settings(f.metadata() or {}, path)
        tensors = load_file(path)
        expected = set(self.state_dict())
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)[:3]
            raise ValueError(f"{path}: EMA tensors do not match the model (e.g. {odd})")
        for i, shadow in enumerate(self.shadows):
            for j, name in enumerate(self.names):
                value = tensors[f"ema{i}/{name}"]
                if value.shape != shadow[j].shape:
                    raise ValueError(f"{path}: EMA tensor {name} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(shadow[j].shape)}")
                shadow[j].copy_(value.to(shadow[j].device))

"""Small helpers shared across EchoDiff."""

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8, exactly as EDM writes samples (scale, clip, truncate)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1], the training-time convention."""
    return images_uint8.to(torch.float32) / 127.5 - 1

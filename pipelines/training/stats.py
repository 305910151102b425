"""Training statistics between two log points: loss, loss per sigma decade, gradient norm."""

from __future__ import annotations

import torch

# Decades of sigma for the loss-per-noise-level curves.
SIGMA_BUCKET_EDGES = (0.01, 0.1, 1.0, 10.0)


class TrainStats:
    """Loss, per-sigma-bucket loss and grad norm accumulated on the device (no sync until ``summary``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        device, buckets = self.device, len(SIGMA_BUCKET_EDGES) + 1
        self.edges = torch.tensor(SIGMA_BUCKET_EDGES, dtype=torch.float32, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.bucket_sum = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.bucket_count = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def add_images(self, per_image_loss: torch.Tensor, sigma: torch.Tensor) -> None:
        per_image_loss = per_image_loss.detach().to(torch.float64)
        self.loss_sum += per_image_loss.sum()
        self.count += per_image_loss.numel()
        bucket = torch.bucketize(sigma.detach().float().reshape(-1), self.edges)
        self.bucket_sum.index_add_(0, bucket, per_image_loss)
        self.bucket_count.index_add_(0, bucket, torch.ones_like(per_image_loss))

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.grad_norm_sum += torch.nan_to_num(grad_norm.detach().to(torch.float64), nan=0.0, posinf=0.0)
        self.steps += 1

    @staticmethod
    def bucket_names() -> list[str]:
        e = SIGMA_BUCKET_EDGES
        return [f"sigma<{e[0]:g}"] + [f"sigma{lo:g}-{hi:g}" for lo, hi in zip(e[:-1], e[1:])] + [f"sigma>{e[-1]:g}"]

    def summary(self, accelerator) -> dict[str, float]:
        """Sums over all processes (every process must call it at the same step), then starts afresh."""
        packed = torch.cat([self.loss_sum[None], self.count[None], self.bucket_sum, self.bucket_count])
        packed = accelerator.reduce(packed, reduction="sum")
        buckets = len(SIGMA_BUCKET_EDGES) + 1
        loss_sum, count = packed[0].item(), packed[1].item()
        out = {"train/loss": loss_sum / max(count, 1)}
        sums, counts = packed[2:2 + buckets].tolist(), packed[2 + buckets:].tolist()
        for name, s, c in zip(self.bucket_names(), sums, counts):
            if c > 0:
                out[f"loss_per_sigma/{name}"] = s / c
        out["train/grad_norm"] = self.grad_norm_sum.item() / max(self.steps, 1)
        self.reset()
        return out

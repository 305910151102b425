"""Which images each process trains on, and the noise each image gets: independent of the device count.

The data order is one seeded, epoch-shuffled stream of dataset indices. Global step ``s`` consumes
stream positions ``[s * batch_size, (s + 1) * batch_size)``; that global batch is cut into chunks of
``batch_per_round``, chunk ``k = round * world_size + rank`` going to ``rank`` in accumulation round
``round``. Resuming only needs the step number (no batches are replayed). Each image's noise level and
noise come from a generator seeded by (seed, stream position), so a global batch gets the same noise
whatever the split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.training.config import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """How one global batch is split: ``world_size`` processes x ``rounds`` x ``batch_per_round``."""

    batch_size: int
    world_size: int
    batch_per_round: int
    rounds: int

    @property
    def batch_per_process(self) -> int:
        return self.batch_per_round * self.rounds


def batch_layout(batch_size: int, world_size: int, batch_per_gpu: int | None) -> BatchLayout:
    if batch_size <= 0:
        raise ConfigError(f"--batch_size: expected a positive global batch size, got {batch_size}")
    if batch_size % world_size:
        raise ConfigError(
            f"--batch_size {batch_size} is not divisible by the {world_size} processes; choose a multiple of "
            f"{world_size}"
        )
    per_process = batch_size // world_size
    per_round = per_process if batch_per_gpu is None else batch_per_gpu
    if per_round <= 0 or per_process % per_round:
        raise ConfigError(
            f"--batch_per_gpu {batch_per_gpu} must divide the per-process batch {per_process} "
            f"(--batch_size {batch_size} / {world_size} processes)"
        )
    return BatchLayout(batch_size, world_size, per_round, per_process // per_round)


def _seeded_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_items, generator=_seeded_generator(seed, epoch, 0x0D474))


class StreamPositions:
    """Stream position -> dataset index for a seeded, epoch-by-epoch shuffled infinite stream."""

    def __init__(self, num_items: int, seed: int):
        self.num_items = num_items
        self.seed = seed
        self._epoch = -1
        self._perm = None

    def __call__(self, positions: Sequence[int]) -> list[int]:
        out = []
        for position in positions:
            epoch, offset = divmod(int(position), self.num_items)
            if epoch != self._epoch:
                self._perm, self._epoch = epoch_permutation(self.num_items, self.seed, epoch), epoch
            out.append(int(self._perm[offset]))
        return out


def chunk_positions(step: int, round_index: int, rank: int, layout: BatchLayout) -> range:
    """Stream positions of the chunk a rank trains on in one accumulation round of a global step."""
    chunk = round_index * layout.world_size + rank
    start = step * layout.batch_size + chunk * layout.batch_per_round
    return range(start, start + layout.batch_per_round)


class RankBatchSampler(torch.utils.data.Sampler):
    """Infinite batch sampler: this rank's chunks from ``start_step`` on (see ``chunk_positions``)."""

    def __init__(self, num_items: int, layout: BatchLayout, rank: int, seed: int, start_step: int = 0):
        self.stream = StreamPositions(num_items, seed)
        self.layout, self.rank, self.start_step = layout, rank, start_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for round_index in range(self.layout.rounds):
                yield self.stream(chunk_positions(step, round_index, self.rank, self.layout))
            step += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs a number
        return 2**62


def collate_images(items: list[dict]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(np.asarray(item["image"])) for item in items])


def label_keep_mask(positions: Sequence[int], seed: int, probability: float) -> torch.Tensor:
    """(B, 1) float: 0 where the image trains the null label (label dropout), drawn per stream position so that
    the same image drops its label in any batch split and on resume."""
    draws = [torch.rand((), generator=_seeded_generator(seed, int(p), 0x1ABE1)) for p in positions]
    return (torch.stack(draws) >= probability).to(torch.float32)[:, None] if draws else torch.zeros(0, 1)


def image_generators(positions: Sequence[int], seed: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, stream position): the image's noise is the same in
    any batch split."""
    return [_seeded_generator(seed, int(p), 0x5EED) for p in positions]

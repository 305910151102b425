"""Training loop pieces for ``train_unconditional.py`` (EDM's training loop on accelerate).

What makes a run reproducible and independent of the device count:
- The data order is one seeded, epoch-shuffled stream of dataset indices. Global step ``s`` consumes
  stream positions ``[s * batch_size, (s + 1) * batch_size)``; that global batch is cut into chunks
  of ``batch_per_gpu``, chunk ``k = round * world_size + rank`` going to ``rank`` in accumulation
  round ``round``. Resuming only needs the step number (no batches are replayed).
- Each image's noise level and noise come from a generator seeded by (seed, stream position), so a
  global batch gets the same noise whatever the split; the summed per-image loss is divided by the
  global batch size, so the gradient is the same (to float rounding) on 1 or N processes, with or
  without gradient accumulation. Dropout masks are the only split-dependent randomness.
- Checkpoints are accelerate ``save_state`` folders plus ``ema.safetensors`` and
  ``training_state.json``, written into a hidden temporary folder and renamed into place, so a
  killed save never leaves a folder that resume would pick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.ema import EDMEma
from pipelines.utils import to_float, to_uint8

logger = logging.getLogger(__name__)

ARCH_NAMES = ("adm", "ddpmpp", "ncsnpp")
PRECOND_NAMES = ("edm", "vp", "ve")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
# Table 1 of the paper: images seen per architecture, in thousands.
PAPER_DURATION_KIMG = {"adm": 30106.0, "ddpmpp": 60211.0, "ncsnpp": 60211.0}
# Decades of sigma for the loss-per-noise-level curves.
SIGMA_BUCKET_EDGES = (0.01, 0.1, 1.0, 10.0)

CHECKPOINT_DIRNAME = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"
# Test hook: SIGKILL this process during the N-th checkpoint save (after the state files are written,
# before the folder is renamed into place), to prove that a killed save is never resumed from.
KILL_DURING_SAVE_ENV = "ECHODIFF_TEST_KILL_DURING_CHECKPOINT"


# --------------------------------------------------------------------------------------------------
# configuration


class ConfigError(ValueError):
    """A bad argument or input, found before training starts; the message names the flag or file."""


@dataclass
class TrainConfig:
    """Everything a run depends on; the CLI flags of ``train_unconditional.py`` map one to one."""

    dataset: str
    output_dir: str
    arch: str = "adm"
    precond: str = "edm"
    split: str = "train"
    resolution: int | None = None  # None: the dataset's
    channels: int | None = None  # None: 1 (gray); 3 repeats the gray channel
    dropout: float = 0.05
    network_overrides: dict[str, Any] = field(default_factory=dict)
    duration_kimg: float | None = None  # None: the paper's Table 1 value for the arch
    batch_size: int = 512
    batch_per_gpu: int | None = None  # None: batch_size / processes (no accumulation)
    lr: float = 1e-3
    lr_rampup_kimg: float = 10000.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    ema_halflife_kimg: Sequence[float] = (500.0,)
    ema_rampup_ratio: float | None = 0.05
    seed: int = 0
    mixed_precision: str = "auto"  # see resolve_mixed_precision
    compile: bool = False
    channels_last: bool = True  # faster for every paper-size network on CPU (issue 10); tensor cores' layout
    allow_tf32: bool = False
    gradient_checkpointing: bool = False
    cpu: bool = False
    dataloader_num_workers: int = 2
    checkpointing_kimg: float = 1000.0
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    snapshot_kimg: float = 2500.0
    save_pipeline_at_snapshot: bool = False
    num_sample_images: int = 16
    sample_steps: int = 18
    logging_steps: int = 10
    report_to: str = "tensorboard"
    tracker_project_name: str = "echodiff"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True
    progress_bar: bool = True

    @property
    def duration_nimg(self) -> int:
        kimg = self.duration_kimg if self.duration_kimg is not None else PAPER_DURATION_KIMG[self.arch]
        return int(round(kimg * 1000))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ema_halflife_kimg"] = [float(h) for h in self.ema_halflife_kimg]
        out["duration_kimg"] = self.duration_nimg / 1000
        return out


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


def validate_config(cfg: TrainConfig) -> None:
    """Checks that need neither the dataset nor the devices; raises ConfigError naming the argument."""
    if cfg.arch not in ARCH_NAMES:
        raise ConfigError(f"--arch: expected one of {list(ARCH_NAMES)}, got {cfg.arch!r}")
    if cfg.precond not in PRECOND_NAMES:
        raise ConfigError(f"--precond: expected one of {list(PRECOND_NAMES)}, got {cfg.precond!r}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"--mixed_precision: expected one of {list(MIXED_PRECISION)}, got {cfg.mixed_precision!r}")
    if cfg.report_to not in REPORT_TO:
        raise ConfigError(f"--report_to: expected one of {list(REPORT_TO)}, got {cfg.report_to!r}")
    positive = {
        "--batch_size": cfg.batch_size, "--lr": cfg.lr, "--checkpointing_kimg": cfg.checkpointing_kimg,
        "--snapshot_kimg": cfg.snapshot_kimg, "--logging_steps": cfg.logging_steps,
        "--sample_steps": cfg.sample_steps, "--duration_kimg": cfg.duration_nimg / 1000,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name}: expected a positive value, got {value}")
    if cfg.batch_per_gpu is not None and cfg.batch_per_gpu <= 0:
        raise ConfigError(f"--batch_per_gpu: expected a positive value, got {cfg.batch_per_gpu}")
    if cfg.lr_rampup_kimg < 0:
        raise ConfigError(f"--lr_rampup_kimg: expected >= 0, got {cfg.lr_rampup_kimg}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"--dropout: expected a probability in [0, 1), got {cfg.dropout}")
    if not cfg.ema_halflife_kimg or any(not h > 0 for h in cfg.ema_halflife_kimg):
        raise ConfigError(f"--ema_halflife_kimg: expected one or more positive values, got {cfg.ema_halflife_kimg}")
    if cfg.ema_rampup_ratio is not None and not cfg.ema_rampup_ratio > 0:
        raise ConfigError(f"--ema_rampup_ratio: expected a positive ratio (or none), got {cfg.ema_rampup_ratio}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError(f"--checkpoints_total_limit: expected >= 1, got {cfg.checkpoints_total_limit}")
    if cfg.num_sample_images < 0:
        raise ConfigError(f"--num_sample_images: expected >= 0, got {cfg.num_sample_images}")
    if cfg.dataloader_num_workers < 0:
        raise ConfigError(f"--dataloader_num_workers: expected >= 0, got {cfg.dataloader_num_workers}")
    if cfg.report_to in ("wandb", "all"):
        from accelerate.utils import is_wandb_available

        if not is_wandb_available():
            raise ConfigError(f"--report_to {cfg.report_to}: wandb is not installed (pip install wandb)")
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise ConfigError("--push_to_hub needs --hub_model_id (e.g. your-name/echodiff-adm-edm)")
    for key in ("sample_size", "in_channels", "out_channels", "dropout", "resolution", "channels"):
        if key in cfg.network_overrides:
            raise ConfigError(
                f"--network_overrides: {key!r} is set by --resolution/--channels/--dropout, not by overrides"
            )
    # Cheap structural check of the overrides now, so a typo fails before the dataset is read.
    from pipelines.networks import network_config

    try:
        network_config(cfg.arch, **cfg.network_overrides)
    except ValueError as err:
        raise ConfigError(f"--network_overrides: {err}") from err
    if cfg.resume_from_checkpoint not in (None, "latest") and not is_complete_checkpoint(
        Path(cfg.resume_from_checkpoint)
    ):
        raise ConfigError(
            f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: not a complete checkpoint folder "
            f"(expected a folder with {STATE_FILE}, written by this script)"
        )


def cpu_has_native_bf16() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_mixed_precision(requested: str, cpu: bool = False) -> str:
    """The concrete precision for ``--mixed_precision auto``: the accelerate config's choice when the run
    was started by ``accelerate launch`` (it sets ACCELERATE_MIXED_PRECISION); otherwise bf16 on a CPU
    run where the CPU has native bf16 (1.9-2.4x fp32 there, issue 10), else fp32 ("no")."""
    if requested != "auto":
        return requested
    from_config = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if from_config:
        return from_config.lower()
    on_cpu = cpu or not torch.cuda.is_available()
    return "bf16" if on_cpu and cpu_has_native_bf16() else "no"


def check_device_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Refuses mixed-precision settings that would silently not do what was asked on ``device``."""
    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        raise ConfigError(
            "--mixed_precision fp16: accelerate's fp16 autocast does nothing on the CPU (the run would be "
            "fp32); use --mixed_precision bf16 (fast on CPUs with bf16 support) or no"
        )
    if device.type == "cpu" and cfg.mixed_precision == "bf16":
        if not cpu_has_native_bf16():
            logger.warning("--mixed_precision bf16: this CPU has no native bf16; it runs, but slower than fp32")


def open_dataset(cfg: TrainConfig):
    """The training split as a ``FrameDataset``, with --resolution checked against it."""
    from pipelines.data.echonet_frames import FrameDataset

    try:
        dataset = FrameDataset(cfg.dataset, split=cfg.split, channels=cfg.channels)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise ConfigError(f"--dataset {cfg.dataset} (--split {cfg.split}): {err}") from err
    if cfg.resolution is not None and cfg.resolution != dataset.resolution:
        raise ConfigError(
            f"--resolution {cfg.resolution} does not match the dataset's {dataset.resolution}x{dataset.resolution} "
            f"images ({cfg.dataset}); rebuild the dataset at {cfg.resolution} or drop --resolution"
        )
    return dataset


# --------------------------------------------------------------------------------------------------
# data order and noise


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 0x0D474]).generate_state(1)[0]))
    return torch.randperm(num_items, generator=generator)


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


def image_generators(positions: Sequence[int], seed: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, stream position): the image's noise is the same in
    any batch split."""
    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(p), 0x5EED]).generate_state(1)[0]))
        for p in positions
    ]


def learning_rate(cfg: TrainConfig, images_seen: int) -> float:
    """EDM's linear warm-up: lr * min(images seen / ramp-up images, 1)."""
    # A function of images seen rather than a prepared scheduler: accelerate's scheduler wrapper steps
    # once per process, and a closed form needs no state of its own to resume.
    if cfg.lr_rampup_kimg <= 0:
        return cfg.lr
    return cfg.lr * min(images_seen / (cfg.lr_rampup_kimg * 1000), 1.0)


def crossed_interval(before_nimg: int, after_nimg: int, every_kimg: float) -> bool:
    """Whether a step from ``before_nimg`` to ``after_nimg`` images passed a multiple of ``every_kimg``."""
    every = max(int(round(every_kimg * 1000)), 1)
    return before_nimg // every != after_nimg // every


# --------------------------------------------------------------------------------------------------
# statistics


class TrainStats:
    """Loss, per-sigma-bucket loss, grad norm and non-finite counts accumulated between log points."""

    def __init__(self, device: torch.device):
        self.edges = torch.tensor(SIGMA_BUCKET_EDGES, dtype=torch.float32, device=device)
        nb = len(SIGMA_BUCKET_EDGES) + 1
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.bucket_sum = torch.zeros(nb, dtype=torch.float64, device=device)
        self.bucket_count = torch.zeros(nb, dtype=torch.float64, device=device)
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

    def bucket_names(self) -> list[str]:
        e = SIGMA_BUCKET_EDGES
        return [f"sigma<{e[0]:g}"] + [f"sigma{lo:g}-{hi:g}" for lo, hi in zip(e[:-1], e[1:])] + [f"sigma>{e[-1]:g}"]

    def summary(self, accelerator) -> dict[str, float]:
        """Sums over all processes (every process must call it at the same step)."""
        packed = torch.cat([self.loss_sum[None], self.count[None], self.bucket_sum, self.bucket_count])
        packed = accelerator.reduce(packed, reduction="sum")
        nb = len(SIGMA_BUCKET_EDGES) + 1
        loss_sum, count = packed[0].item(), packed[1].item()
        out = {"train/loss": loss_sum / max(count, 1)}
        sums, counts = packed[2:2 + nb].tolist(), packed[2 + nb:].tolist()
        for name, s, c in zip(self.bucket_names(), sums, counts):
            if c > 0:
                out[f"loss_per_sigma/{name}"] = s / c
        out["train/grad_norm"] = self.grad_norm_sum.item() / max(self.steps, 1)
        self.__init__(self.device)
        return out


# --------------------------------------------------------------------------------------------------
# checkpoints


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file() and not path.name.startswith(TMP_PREFIX)


def list_checkpoints(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (images seen, folder), oldest first; temporary folders are ignored."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for child in checkpoint_root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and is_complete_checkpoint(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(checkpoint_root: Path) -> Path | None:
    found = list_checkpoints(checkpoint_root)
    return found[-1][1] if found else None


def remove_partial_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Deletes leftovers of killed saves (main process only)."""
    removed = []
    if checkpoint_root.is_dir():
        for child in checkpoint_root.iterdir():
            if child.name.startswith(TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_save_counter = 0


def save_checkpoint(accelerator, checkpoint_root: Path, ema: EDMEma, state: dict[str, Any],
                    total_limit: int | None) -> Path:
    """Atomic ``save_state``: write into ``.tmp-<name>``, then rename to ``checkpoint-<images seen>``.

    Must be called on every process (each writes its RNG state). Returns the final folder.
    """
    global _save_counter
    _save_counter += 1
    name = f"checkpoint-{state['images_seen']:012d}"
    final, tmp = checkpoint_root / name, checkpoint_root / f"{TMP_PREFIX}{name}"
    if accelerator.is_main_process:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        ema.save(str(tmp / EMA_FILE))
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(_save_counter):
            os.kill(os.getpid(), signal.SIGKILL)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The state file is written last: a folder without it is never a checkpoint.
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        trash = checkpoint_root / f"{TMP_PREFIX}replaced-{name}"
        if final.exists():  # re-saving a point reached again after resuming from an older checkpoint
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(checkpoint_root)
        shutil.rmtree(trash, ignore_errors=True)
        if total_limit is not None:
            for _, old in list_checkpoints(checkpoint_root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema: EDMEma) -> dict[str, Any]:
    """Restores model, optimizer, grad scaler and RNG states (accelerate), EMA, and the progress."""
    if not is_complete_checkpoint(path):
        raise ConfigError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text())
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        logger.warning("%s: no RNG state for process %d (different process count); dropout streams restart",
                       path, accelerator.process_index)
    accelerator.load_state(str(path))
    ema.load(str(path / EMA_FILE))
    return state


MODEL_DEFINING = ("arch", "precond", "resolution", "channels", "network_overrides", "ema_halflife_kimg")


def check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as saved
    for key in MODEL_DEFINING:
        if saved.get(key) != current.get(key) and not (key in ("resolution", "channels") and current.get(key) is None):
            raise ConfigError(
                f"--resume_from_checkpoint {path}: it was trained with {key}={saved.get(key)!r}, "
                f"this run asks for {current.get(key)!r}"
            )
    changed = [k for k in ("batch_size", "lr", "lr_rampup_kimg", "seed", "dropout", "mixed_precision")
               if saved.get(k) != current.get(k)]
    if changed:
        logger.warning("resuming %s with changed settings %s: the run is no longer the uninterrupted one",
                       path, {k: (saved.get(k), current.get(k)) for k in changed})


# --------------------------------------------------------------------------------------------------
# samples and export


def image_grid(images_uint8: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) uint8 -> one (rows*H, cols*W, C) uint8 array, as square as possible."""
    n, c, h, w = images_uint8.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(rows * h, cols * w, c, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images_uint8[i].permute(1, 2, 0).cpu()
    return grid.numpy()


def save_png(grid: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def log_grid(accelerator, grid: np.ndarray, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": grid[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [grid]}, step=step)


# --------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    output_dir: Path
    pipeline_dirs: list[Path]
    images_seen: int
    steps: int
    nonfinite_steps: int
    last_checkpoint: Path | None
    world_size: int
    history: list[dict[str, float]] = field(default_factory=list)


def _compute_loss(loss_fn, model, images: torch.Tensor, positions: Sequence[int], seed: int):
    """Per-pixel weighted loss (B, C, H, W) and sigma (B,) for a chunk, with per-image noise draws."""
    # DenoisingLoss.__call__ draws the batch from one generator (its VP/VE draw takes no list of
    # generators), so the per-image draw is made here from its public pieces: sample_sigma, weight,
    # and the preconditioning's denoiser.
    generators = image_generators(positions, seed)
    sigma = torch.cat([loss_fn.sample_sigma(1, generator=g) for g in generators]).to(images.device)
    noise = torch.stack([torch.randn(images.shape[1:], generator=g) for g in generators]).to(images.device)
    view = (-1,) + (1,) * (images.ndim - 1)
    denoised = loss_fn.preconditioning.denoise(model, images + noise * sigma.reshape(view), sigma)
    return loss_fn.weight(sigma).reshape(view) * (denoised - images) ** 2, sigma


def train_step(accelerator, model, optimizer, loss_fn, chunks, cfg: TrainConfig, layout: BatchLayout,
               stats: TrainStats, images_seen: int) -> torch.Tensor:
    """One optimiser step over this process's chunks [(uint8 images, stream positions)], with gradient
    accumulation; returns whether the gradient was non-finite (0-d bool tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for round_index, (images_u8, positions) in enumerate(chunks):
        images = to_float(images_u8.to(accelerator.device, non_blocking=True))
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last = round_index == len(chunks) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            per_pixel, sigma = _compute_loss(loss_fn, model, images, positions, cfg.seed)
            # EDM's normalisation: sum over pixels, divided by this process's share of the global batch;
            # DDP's average over processes then gives (sum over the global batch) / batch_size.
            accelerator.backward(per_pixel.sum() / layout.batch_per_process)
        stats.add_images(per_pixel.detach().float().mean(dim=tuple(range(1, per_pixel.ndim))), sigma)
    if accelerator.scaler is not None:
        accelerator.unscale_gradients()  # the grad norm and the zeroing act on true gradients
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=accelerator.device)
    nonfinite = ~torch.isfinite(grad_norm)
    for g in grads:  # EDM: non-finite gradient entries become zeros (the fp16 scaler still skips the step)
        torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0, out=g)
    lr = learning_rate(cfg, images_seen)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats.add_step(grad_norm)
    return nonfinite


def build_adam(params, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with EDM's settings, on torch's fused kernel where the device has one (the same update
    rule; ADM's 295M-parameter step: 0.10 s fused vs 0.83 s foreach on the CPU, issue 10)."""
    params = list(params)
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=0.0)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError) as err:  # older torch or a device without the fused kernel
        logger.info("fused Adam unavailable (%s); using the default implementation", err)
        return torch.optim.Adam(params, **kwargs)


def _build_components(cfg: TrainConfig, resolution: int, channels: int):
    from pipelines.components.preconditioning import EDMPreconditioning
    from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
    from pipelines.losses import DenoisingLoss
    from pipelines.networks import build_network

    net = build_network(cfg.arch, resolution=resolution, channels=channels, dropout=cfg.dropout,
                        **cfg.network_overrides)
    preconditioning = EDMPreconditioning(kind=cfg.precond)
    loss_fn = DenoisingLoss(preconditioning=preconditioning)
    scheduler = EDMHeunScheduler(preconditioning=cfg.precond)
    return net, loss_fn, scheduler


def _new_sampling_net(net, device):
    """A fresh network for EMA sampling and export (the trained one stays untouched), built only when
    needed: a resident copy would hold one more model's memory all run (1.2 GB for ADM)."""
    with torch.random.fork_rng(devices=[]):  # its random init must not shift the training RNG stream
        copy = type(net).from_config(net.config)
    return copy.to(device).eval().requires_grad_(False)


def _sampling_pipeline(net_for_sampling, scheduler):
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline

    pipe = EchoDiffPipeline(unet=net_for_sampling, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_grid(pipe, num_images: int, steps: int, device: torch.device) -> np.ndarray:
    """Images for seeds 0..num_images-1 (the same seeds at every snapshot) as one uint8 grid."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        latents = pipe(seeds=list(range(num_images)), num_inference_steps=steps, output_type="latent").images
    return image_grid(to_uint8(torch.as_tensor(latents)))


CARD_FIELDS = ("arch", "precond", "resolution", "channels", "num_parameters", "dropout", "dataset", "split",
               "dataset_size", "batch_size", "world_size", "batch_per_round", "accumulation_rounds", "duration_kimg",
               "images_seen", "steps", "lr", "lr_rampup_kimg", "adam_beta1", "adam_beta2", "adam_epsilon",
               "ema_halflife_kimg", "ema_rampup_ratio", "mixed_precision", "seed", "nonfinite_grad_steps")


def training_card_section(run_info: dict[str, Any]) -> str:
    """Markdown for the model card: the run's configuration (table of the main settings + full JSON)."""
    rows = "\n".join(f"| {key} | {run_info[key]} |" for key in CARD_FIELDS if key in run_info)
    return (
        "\n## Training configuration\n\n"
        f"Trained with EchoDiff's `train_unconditional.py`; the weights are the EMA with half-life "
        f"{run_info.get('ema_halflife_kimg')} kimg (the raw weights stay in the training checkpoints).\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n\n"
        "<details><summary>full run configuration</summary>\n\n```json\n"
        f"{json.dumps(run_info, indent=2, sort_keys=True, default=str)}\n```\n\n</details>\n"
    )


def write_model_card(folder: Path, repo_id: str, run_info: dict[str, Any]) -> Path:
    """README.md of a saved pipeline: the model_cards/ template (pipelines.hub) + the training section."""
    from pipelines import hub

    card = hub.render_model_card(folder, repo_id)
    path = Path(folder) / "README.md"
    path.write_text(str(card).rstrip("\n") + "\n" + training_card_section(run_info), encoding="utf-8")
    return path


def push_folder(folder: Path, repo_id: str, private: bool = True, api=None):
    """Upload a saved pipeline folder as it is (README.md included) to a Hub model repo."""
    # Not hub.push_pipeline: it re-renders README.md from the template alone, dropping the training section.
    from huggingface_hub import HfApi

    api = api if api is not None else HfApi()
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), repo_type="model",
                             commit_message="Upload EchoDiff pipeline (train_unconditional.py)")


def export_pipelines(cfg: TrainConfig, ema: EDMEma, sampling_net, scheduler, output_dir: Path,
                     run_info: dict[str, Any]) -> list[Path]:
    """save_pretrained of one pipeline per EMA half-life (EMA weights), each with a filled model card."""
    dirs = []
    for index, half_life in enumerate(cfg.ema_halflife_kimg):
        target = output_dir / ("pipeline" if index == 0 else f"pipeline_ema{half_life:g}kimg")
        ema.copy_to(sampling_net, index)
        _sampling_pipeline(sampling_net, scheduler).save_pretrained(str(target))
        repo_id = cfg.hub_model_id or f"echodiff-{cfg.arch}-{cfg.precond}"
        write_model_card(target, repo_id, dict(run_info, ema_halflife_kimg=half_life))
        dirs.append(target)
    return dirs


def train(cfg: TrainConfig, hub_api=None) -> TrainResult:
    """Runs (or resumes) a training run; every process of an accelerate launch calls it.

    ``hub_api``: an ``huggingface_hub.HfApi`` for ``--push_to_hub`` (default: a new one).
    """
    validate_config(cfg)
    cfg = dataclasses.replace(cfg, mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cfg.cpu))
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    output_dir = Path(cfg.output_dir)
    checkpoint_root = output_dir / CHECKPOINT_DIRNAME
    log_with = {"none": None, "all": ["tensorboard", "wandb"]}.get(cfg.report_to, cfg.report_to)
    accelerator = Accelerator(
        cpu=cfg.cpu,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dynamo_backend="inductor" if cfg.compile else None,
    )
    check_device_precision(cfg, accelerator.device)
    layout = batch_layout(cfg.batch_size, accelerator.num_processes, cfg.batch_per_gpu)
    dataset = open_dataset(cfg)
    resolution, channels = dataset.resolution, dataset.channels

    resume_path = None
    if cfg.resume_from_checkpoint == "latest":
        resume_path = find_latest_checkpoint(checkpoint_root)
        if resume_path is None:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run", checkpoint_root)
    elif cfg.resume_from_checkpoint is not None:
        resume_path = Path(cfg.resume_from_checkpoint)
    if resume_path is not None:
        check_resume_compatible(json.loads((resume_path / STATE_FILE).read_text())["config"], cfg, resume_path)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for leftover in remove_partial_checkpoints(checkpoint_root):
            logger.warning("removed %s, left by a save that did not finish", leftover)
    accelerator.wait_for_everyone()

    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)  # the same initial weights on every process
    net, loss_fn, scheduler = _build_components(cfg, resolution, channels)
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train().requires_grad_(True)
    ema = EDMEma(net, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
    # Dropout streams differ per process; resumed runs restore them from the checkpoint.
    torch.manual_seed(cfg.seed * accelerator.num_processes + accelerator.process_index)

    optimizer = build_adam(net.parameters(), cfg)
    # ``model`` is what trains (DDP / compiled wrapper); ``net`` stays the plain module sharing its
    # parameters, for the EMA and the sampling copy.
    model, optimizer = accelerator.prepare(net, optimizer)
    ema.to(accelerator.device)

    images_seen, step, nonfinite_steps = 0, 0, 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, ema)
        images_seen, step, nonfinite_steps = state["images_seen"], state["step"], state["nonfinite_steps"]
        logger.info("resumed from %s at %.3f kimg (step %d)", resume_path, images_seen / 1000, step)
    total_nimg = cfg.duration_nimg

    sampler = RankBatchSampler(len(dataset), layout, accelerator.process_index, cfg.seed, start_step=step)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_images, num_workers=cfg.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda", persistent_workers=cfg.dataloader_num_workers > 0,
        # Its own generator: creating the iterator must not draw from the (restored) global RNG.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    batches = iter(loader)

    run_info = dict(cfg.to_dict(), world_size=accelerator.num_processes, batch_per_round=layout.batch_per_round,
                    accumulation_rounds=layout.rounds, resolution=resolution, channels=channels,
                    num_parameters=sum(p.numel() for p in net.parameters()),
                    dataset_size=len(dataset))
    hparams = {k: v for k, v in run_info.items() if isinstance(v, int | float | str | bool)}
    accelerator.init_trackers(cfg.tracker_project_name, config=hparams)
    _record_data_order(output_dir, accelerator, sampler, layout, step)

    stats = TrainStats(accelerator.device)
    history: list[dict[str, float]] = []
    nonfinite_total = torch.zeros((), dtype=torch.long, device=accelerator.device)
    from tqdm.auto import tqdm

    progress = tqdm(total=total_nimg / 1000, initial=images_seen / 1000, unit="kimg",
                    bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} kimg [{elapsed}<{remaining}]{postfix}",
                    disable=not (cfg.progress_bar and accelerator.is_local_main_process))
    last_checkpoint = resume_path
    tick_time, tick_images, pause = time.perf_counter(), 0, 0.0

    def checkpoint_state() -> dict[str, Any]:
        return {"images_seen": images_seen, "step": step,
                "nonfinite_steps": nonfinite_steps + int(nonfinite_total.item()),
                "world_size": accelerator.num_processes, "config": cfg.to_dict()}

    while images_seen < total_nimg:
        chunks = []
        for round_index in range(layout.rounds):
            positions = chunk_positions(step, round_index, accelerator.process_index, layout)
            chunks.append((next(batches), positions))
        nonfinite_total += train_step(accelerator, model, optimizer, loss_fn, chunks, cfg, layout, stats,
                                      images_seen)
        ema.update(net, cfg.batch_size, images_seen)
        before, images_seen, step = images_seen, images_seen + cfg.batch_size, step + 1
        tick_images += cfg.batch_size
        progress.update(cfg.batch_size / 1000)
        done = images_seen >= total_nimg

        if step % cfg.logging_steps == 0 or done:
            elapsed = time.perf_counter() - tick_time - pause
            logs = stats.summary(accelerator)
            logs.update({"train/lr": learning_rate(cfg, before), "progress/kimg": images_seen / 1000,
                         "train/images_per_second": tick_images / max(elapsed, 1e-9),
                         "train/nonfinite_grad_steps": nonfinite_steps + int(nonfinite_total.item())})
            accelerator.log(logs, step=step)
            history.append(dict(logs, step=step))
            if accelerator.is_main_process:  # a plain-text copy of the scalars, appended across resumes
                with open(output_dir / "logs" / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(dict(logs, step=step)) + "\n")
            progress.set_postfix(loss=f"{logs['train/loss']:.4f}", refresh=False)
            tick_time, tick_images, pause = time.perf_counter(), 0, 0.0

        if crossed_interval(before, images_seen, cfg.checkpointing_kimg) or done:
            t0 = time.perf_counter()
            last_checkpoint = save_checkpoint(accelerator, checkpoint_root, ema, checkpoint_state(),
                                              cfg.checkpoints_total_limit)
            pause += time.perf_counter() - t0
        if (crossed_interval(before, images_seen, cfg.snapshot_kimg) or done) and cfg.num_sample_images > 0:
            t0 = time.perf_counter()
            if accelerator.is_main_process:
                sampling_net = _new_sampling_net(net, accelerator.device)
                ema.copy_to(sampling_net, 0)
                pipe = _sampling_pipeline(sampling_net, scheduler)
                grid = sample_grid(pipe, cfg.num_sample_images, cfg.sample_steps, accelerator.device)
                save_png(grid, output_dir / "samples" / f"samples-{images_seen / 1000:010.3f}kimg.png")
                log_grid(accelerator, grid, step)
                if cfg.save_pipeline_at_snapshot and not done:
                    pipe.save_pretrained(str(output_dir / "snapshots" / f"pipeline-{images_seen / 1000:010.3f}kimg"))
                del sampling_net, pipe
            accelerator.wait_for_everyone()
            pause += time.perf_counter() - t0
    progress.close()

    nonfinite_steps += int(nonfinite_total.item())
    pipeline_dirs: list[Path] = []
    if accelerator.is_main_process:
        run_info.update(images_seen=images_seen, steps=step, nonfinite_grad_steps=nonfinite_steps)
        pipeline_dirs = export_pipelines(cfg, ema, _new_sampling_net(net, accelerator.device), scheduler, output_dir,
                                         run_info)
        if cfg.push_to_hub:
            push_folder(pipeline_dirs[0], cfg.hub_model_id, private=cfg.hub_private, api=hub_api)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir, pipeline_dirs, images_seen, step, nonfinite_steps, last_checkpoint,
                       accelerator.num_processes, history)


def _record_data_order(output_dir: Path, accelerator, sampler: RankBatchSampler, layout: BatchLayout,
                       step: int) -> None:
    """Writes the dataset indices this process gets in its next step (checks that ranks differ)."""
    indices = [sampler.stream(chunk_positions(step, r, accelerator.process_index, layout))
               for r in range(layout.rounds)]
    path = output_dir / "logs" / f"data_order_rank{accelerator.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": accelerator.process_index, "world_size": accelerator.num_processes,
                                "step": step, "indices": indices}))

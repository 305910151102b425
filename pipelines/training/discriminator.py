"""Training and epoch selection for the Discriminator Guidance discriminator (paper section 4).

The discriminator learns to tell real frames from the diffusion model's unguided samples after both
are noised by the forward process at the same sigma (``x = y + sigma * n``); BCE on one "real" logit.
Every epoch is checkpointed (safetensors); a rerun of the same command resumes after the last
finished epoch. Epoch selection scores each saved epoch by the FID of DG samples, as the paper does,
and records the epoch -> FID table.

Output layout of ``train_discriminator``::

    out_dir/checkpoints/epoch-001/discriminator/   config.json + diffusion_pytorch_model.safetensors
    out_dir/checkpoints/epoch-001/state.json       epoch, steps, validation metrics (written last)
    out_dir/checkpoints/epoch-NNN/optimizer.safetensors   (latest epoch only, for resuming)
    out_dir/history.json                           per-epoch metrics
    out_dir/logs/                                  tensorboard (loss, accuracy per sigma bucket)

Epoch checkpoints follow the atomic scheme of ``pipelines.training.checkpoints``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.components.discriminator import EchoDiffDiscriminator
from pipelines.training.checkpoints import (
    CheckpointStore,
    epoch_checkpoints,
    load_optimizer_state,
    save_optimizer_state,
)
from pipelines.utils import atomic_write_json, atomic_write_text, check_uint8_images, seeded_subset, to_float

SIGMA_DISTRIBUTIONS = ("log-uniform", "log-normal")
DISCRIMINATOR_VARIANTS = ("adm", "unet-encoder")
OPTIMIZER_FILE = "optimizer.safetensors"


# --------------------------------------------------------------------------------------------------
# Noise levels
# --------------------------------------------------------------------------------------------------
@dataclass
class SigmaDistribution:
    """Training noise levels: ``log-uniform`` over [sigma_min, sigma_max] (default: the sampler's range
    0.002..80) or ``log-normal`` ln(sigma) ~ N(p_mean, p_std) (EDM's training distribution)."""

    kind: str = "log-uniform"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self):
        if self.kind not in SIGMA_DISTRIBUTIONS:
            raise ValueError(f"sigma distribution must be one of {SIGMA_DISTRIBUTIONS}, got {self.kind!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma range must satisfy 0 < sigma_min < sigma_max, got "
                             f"[{self.sigma_min}, {self.sigma_max}]")
        if not self.p_std > 0:
            raise ValueError(f"p_std must be positive, got {self.p_std}")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) float32 noise levels on the CPU."""
        if self.kind == "log-uniform":
            lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
            log_sigma = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        else:
            log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=torch.float64)
        return log_sigma.exp().float()


def sigma_buckets(sigma_min: float, sigma_max: float, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-spaced bucket edges (num_buckets + 1) and each bucket's geometric centre."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    edges = np.geomspace(sigma_min, sigma_max, num_buckets + 1)
    return edges, np.sqrt(edges[:-1] * edges[1:])


# --------------------------------------------------------------------------------------------------
# Discriminator construction
# --------------------------------------------------------------------------------------------------
def discriminator_config(variant: str = "adm", tiny: bool = False) -> dict[str, Any]:
    """Architecture presets. ``adm``: from-scratch encoder shaped like ADM's noisy classifier (width
    128, [1,2,3,4], 2 blocks, attention at 16 and 8, attention pooling; ~29M parameters at 64x64).
    ``unet-encoder``: a small head (2.27M at the ADM's 768x8x8 features) like the DG reference's."""
    if variant not in DISCRIMINATOR_VARIANTS:
        raise ValueError(f"variant must be one of {DISCRIMINATOR_VARIANTS}, got {variant!r}")
    if tiny:
        return dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8, 4),
                    head_channels=8)
    if variant == "adm":
        return dict(model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                    attention_resolutions=(16, 8), head_channels=64)
    return dict(model_channels=128, channel_mult=(1,), num_res_blocks=2, attention_resolutions=(8, 4, 2),
                head_channels=64)


def build_discriminator(variant: str = "adm", resolution: int = 64, channels: int = 1, unet=None,
                        preconditioning: str = "edm", sigma_data: float = 0.5, tiny: bool = False,
                        **overrides) -> EchoDiffDiscriminator:
    """A fresh discriminator. ``unet-encoder`` needs the trained ``unet`` (its frozen encoder is shared)."""
    config = discriminator_config(variant, tiny)
    config.update(preconditioning=preconditioning, sigma_data=sigma_data)
    config.update(overrides)
    if variant == "unet-encoder":
        if unet is None:
            raise ValueError("variant 'unet-encoder' needs the trained diffusion UNet (unet=...)")
        unet.requires_grad_(False)
        return EchoDiffDiscriminator.for_unet(unet, sample_size=resolution, in_channels=channels, **config)
    return EchoDiffDiscriminator(sample_size=resolution, in_channels=channels, **config)


def preconditioning_of(pipeline) -> dict[str, Any]:
    """The discriminator config fields that give it the pipeline's preconditioning (its input scaling); pipelines
    without their own (saved before it moved to the pipeline config) carry it in their EDM scheduler."""
    pre = getattr(pipeline, "preconditioning", None) or pipeline.scheduler.preconditioning
    accepted = inspect.signature(EchoDiffDiscriminator.__init__).parameters
    return {field: getattr(pre, arg) for arg, field in type(pre).CONFIG_FIELDS.items() if field in accepted}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@dataclass
class RealFakeSplit:
    """Real (label 1) and generated (label 0) uint8 images, split into train and validation indices."""

    images: np.ndarray  # (N, C, H, W) uint8, real first
    labels: np.ndarray  # (N,) float32
    train_indices: np.ndarray
    val_indices: np.ndarray


def make_real_fake_split(real: np.ndarray, fake: np.ndarray, val_fraction: float = 0.1, balance: bool = True,
                         seed: int = 0) -> RealFakeSplit:
    """Seeded train/validation split (stratified by label); ``balance`` subsamples the larger side."""
    real = np.asarray(check_uint8_images(real, "real images", channels=None))
    fake = np.asarray(check_uint8_images(fake, "generated images", channels=None))
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real images {real.shape[1:]} and generated images {fake.shape[1:]} differ in shape")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    if balance:
        n = min(len(real), len(fake))
        real = real[np.sort(rng.permutation(len(real))[:n])]
        fake = fake[np.sort(rng.permutation(len(fake))[:n])]
    images = np.concatenate([real, fake])
    labels = np.concatenate([np.ones(len(real), np.float32), np.zeros(len(fake), np.float32)])
    train, val = [], []
    for start, count in ((0, len(real)), (len(real), len(fake))):
        order = start + rng.permutation(count)
        n_val = int(round(val_fraction * count))
        val.append(order[:n_val])
        train.append(order[n_val:])
    return RealFakeSplit(images, labels, np.sort(np.concatenate(train)), np.sort(np.concatenate(val)))


# --------------------------------------------------------------------------------------------------
# Checkpoints: one folder per finished epoch
# --------------------------------------------------------------------------------------------------
def saved_epochs(out_dir: str | os.PathLike) -> list[int]:
    """Epochs whose checkpoint finished writing."""
    return [epoch for epoch, _ in epoch_checkpoints(out_dir).checkpoints()]


def load_epoch_discriminator(out_dir: str | os.PathLike, epoch: int, unet=None) -> EchoDiffDiscriminator:
    path = epoch_checkpoints(out_dir).path(epoch) / "discriminator"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no discriminator checkpoint for epoch {epoch} at {path}")
    model = EchoDiffDiscriminator.from_pretrained(str(path))
    if model.config.feature_source == "unet":
        if unet is None:
            raise ValueError(f"{path}: a 'unet-encoder' discriminator needs the diffusion UNet (unet=...)")
        model.bind_unet(unet)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclass
class DiscriminatorTrainingConfig:
    """Defaults follow the DG reference: Adam lr 3e-4, weight decay 1e-7, batch 128, 50 epochs."""

    num_epochs: int = 50
    batch_size: int = 128
    learning_rate: float = 3e-4
    weight_decay: float = 1e-7
    val_fraction: float = 0.1
    balance: bool = True
    sigma: SigmaDistribution = field(default_factory=SigmaDistribution)
    num_val_buckets: int = 8
    val_batch_size: int = 256
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        for name in ("num_epochs", "batch_size", "val_batch_size", "num_val_buckets", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise ValueError(f"learning_rate must be > 0 and weight_decay >= 0, got {self.learning_rate}, "
                             f"{self.weight_decay}")
        if isinstance(self.sigma, dict):
            self.sigma = SigmaDistribution(**self.sigma)


def _noised(images_u8: np.ndarray, sigma: torch.Tensor, generator: torch.Generator, device) -> torch.Tensor:
    clean = to_float(torch.from_numpy(images_u8))
    noise = torch.randn(clean.shape, generator=generator)
    return (clean + sigma[:, None, None, None] * noise).to(device)


@torch.no_grad()
def evaluate_discriminator(model, data: RealFakeSplit, config: DiscriminatorTrainingConfig, device,
                           indices: np.ndarray | None = None) -> dict[str, float]:
    """Validation loss/accuracy at fixed noise per sigma bucket (same noise every epoch)."""
    indices = data.val_indices if indices is None else indices
    _, centres = sigma_buckets(config.sigma.sigma_min, config.sigma.sigma_max, config.num_val_buckets)
    metrics: dict[str, float] = {}
    if len(indices) == 0:
        return metrics
    total_correct, total_loss, total = 0.0, 0.0, 0
    for bucket, centre in enumerate(centres):
        generator = torch.Generator().manual_seed(config.seed * 1000 + 7919 + bucket)
        correct, loss_sum = 0.0, 0.0
        for start in range(0, len(indices), config.val_batch_size):
            idx = indices[start:start + config.val_batch_size]
            sigma = torch.full((len(idx),), float(centre))
            x = _noised(data.images[idx], sigma, generator, device)
            labels = torch.from_numpy(data.labels[idx]).to(device)
            logits = model(x, sigma.to(device)).logits
            loss_sum += F.binary_cross_entropy_with_logits(logits, labels, reduction="sum").item()
            correct += ((logits > 0).float() == labels).sum().item()
        metrics[f"val/accuracy_sigma_{centre:.3g}"] = correct / len(indices)
        metrics[f"val/loss_sigma_{centre:.3g}"] = loss_sum / len(indices)
        total_correct += correct
        total_loss += loss_sum
        total += len(indices)
    metrics["val/accuracy"] = total_correct / total
    metrics["val/loss"] = total_loss / total
    return metrics


def train_discriminator(model: EchoDiffDiscriminator, data: RealFakeSplit, out_dir: str | os.PathLike,
                        config: DiscriminatorTrainingConfig | None = None, accelerator=None,
                        progress: bool = True) -> list[dict[str, Any]]:
    """Train ``model`` for ``config.num_epochs`` epochs, checkpointing every epoch; resumes after the
    last finished epoch found in ``out_dir``. Returns the per-epoch history (also in history.json)."""
    from accelerate import Accelerator

    config = config or DiscriminatorTrainingConfig()
    out_dir = Path(out_dir)
    own_accelerator = accelerator is None
    if own_accelerator:
        accelerator = Accelerator(log_with="tensorboard", project_dir=str(out_dir / "logs"))
    world = accelerator.num_processes
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of processes {world}")
    if len(data.train_indices) < config.batch_size:
        raise ValueError(f"only {len(data.train_indices)} training images for a batch size of {config.batch_size}")

    store = epoch_checkpoints(out_dir)
    if accelerator.is_main_process:
        store.remove_partial()
    accelerator.wait_for_everyone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                 weight_decay=config.weight_decay)
    history = _resume(model, optimizer, store, out_dir, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.init_trackers("discriminator", config=_flat_config(config))
    steps_per_epoch = len(data.train_indices) // config.batch_size  # drop the last partial batch

    for epoch in range(len(history) + 1, config.num_epochs + 1):
        train_loss = _train_epoch(model, optimizer, data, config, accelerator, epoch, steps_per_epoch, progress)
        model.eval()
        metrics = evaluate_discriminator(accelerator.unwrap_model(model), data, config, accelerator.device)
        record = {"epoch": epoch, "step": epoch * steps_per_epoch, "train/loss": train_loss, **metrics}
        accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=epoch * steps_per_epoch)
        history.append(record)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_epoch(store, out_dir, accelerator.unwrap_model(model), optimizer, record, history)
        accelerator.wait_for_everyone()
        accelerator.print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                                         if k in ("train/loss", "val/loss", "val/accuracy")))
    if own_accelerator:
        accelerator.end_training()
    return history


def _resume(model, optimizer, store: CheckpointStore, out_dir: Path, accelerator) -> list[dict[str, Any]]:
    """Loads the last finished epoch into ``model`` and ``optimizer``; returns the history up to it (each
    epoch's record is its checkpoint's state file)."""
    found = store.checkpoints()
    if not found:
        return []
    last, folder = found[-1]
    if not (folder / OPTIMIZER_FILE).is_file():
        raise FileNotFoundError(f"{folder / OPTIMIZER_FILE} missing: cannot resume exactly")
    model.load_state_dict(EchoDiffDiscriminator.from_pretrained(str(folder / "discriminator")).state_dict())
    load_optimizer_state(optimizer, folder / OPTIMIZER_FILE)
    history = [store.read_state(path) for _, path in found]
    if [record["epoch"] for record in history] != list(range(1, last + 1)):
        raise ValueError(f"{store.root}: epochs {[epoch for epoch, _ in found]} are not 1..{last}; "
                         "cannot resume (use a fresh output folder)")
    accelerator.print(f"resuming discriminator training after epoch {last} ({out_dir})")
    return history


def _train_epoch(model, optimizer, data: RealFakeSplit, config: DiscriminatorTrainingConfig, accelerator, epoch: int,
                 steps_per_epoch: int, progress: bool) -> float:
    """One epoch of BCE steps (each process takes its share of every global batch); the mean loss."""
    from tqdm.auto import tqdm

    world, rank = accelerator.num_processes, accelerator.process_index
    model.train()
    order = torch.randperm(len(data.train_indices),
                           generator=torch.Generator().manual_seed(config.seed * 100003 + epoch)).numpy()
    noise_gen = torch.Generator().manual_seed((config.seed * 100003 + epoch) * 64 + rank + 1)
    running, count = 0.0, 0
    bar = tqdm(range(steps_per_epoch), desc=f"discriminator epoch {epoch}/{config.num_epochs}",
               disable=not (progress and accelerator.is_main_process))
    for step in bar:
        batch = order[step * config.batch_size:(step + 1) * config.batch_size][rank::world]
        idx = data.train_indices[np.sort(batch)]
        sigma = config.sigma.sample(len(idx), noise_gen)
        x = _noised(data.images[idx], sigma, noise_gen, accelerator.device)
        labels = torch.from_numpy(data.labels[idx]).to(accelerator.device)
        loss = F.binary_cross_entropy_with_logits(model(x, sigma.to(accelerator.device)).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        running, count = running + loss.item(), count + 1
        global_step = (epoch - 1) * steps_per_epoch + step + 1
        if global_step % config.log_every == 0:
            accelerator.log({"train/loss": running / count}, step=global_step)
            bar.set_postfix(loss=f"{running / count:.4f}")
    return running / max(count, 1)


def _flat_config(config: DiscriminatorTrainingConfig) -> dict[str, Any]:
    flat = {}
    for key, value in asdict(config).items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _save_epoch(store: CheckpointStore, out_dir: Path, model, optimizer, record: dict, history: list) -> None:
    """The epoch's checkpoint (weights, optimizer, state); optimizer state is kept for the newest epoch only."""
    def write(folder: Path) -> None:
        model.save_pretrained(str(folder / "discriminator"))
        save_optimizer_state(optimizer, folder / OPTIMIZER_FILE)

    epoch = record["epoch"]
    store.save(epoch, write, record)
    for older, folder in store.checkpoints():
        if older != epoch:
            (folder / OPTIMIZER_FILE).unlink(missing_ok=True)
    atomic_write_json(out_dir / "history.json", history)


# --------------------------------------------------------------------------------------------------
# Epoch selection
# --------------------------------------------------------------------------------------------------
def select_best_epoch(out_dir: str | os.PathLike, score_epoch: Callable[[int], float],
                      epochs: Sequence[int] | None = None, table_name: str = "epoch_selection",
                      metric_name: str = "FID", settings: dict | None = None) -> tuple[int, list[dict]]:
    """Score each saved epoch (lower is better) and return (best epoch, table).

    ``score_epoch(epoch)`` returns e.g. the FID of DG samples with that epoch's discriminator. The
    table is rewritten after every epoch to ``<table_name>.json`` and ``.md``, so an interrupted
    selection resumes with the epochs already scored.
    """
    out_dir = Path(out_dir)
    available = saved_epochs(out_dir)
    root = epoch_checkpoints(out_dir).root
    if not available:
        raise FileNotFoundError(f"no finished discriminator epochs under {root}")
    wanted = available if epochs is None else list(epochs)
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise ValueError(f"epochs {missing} have no checkpoint under {root} (have {available})")
    json_path = out_dir / f"{table_name}.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if previous and previous.get("settings") != (settings or {}):
        raise ValueError(f"{json_path} was scored with other settings {previous.get('settings')}; "
                         f"delete it or use another table_name")
    scores = {int(row["epoch"]): float(row[metric_name]) for row in previous.get("table", [])}
    for epoch in wanted:
        if epoch not in scores:
            scores[epoch] = float(score_epoch(epoch))
            _write_selection(out_dir, table_name, scores, metric_name, settings)
    table = [{"epoch": e, metric_name: scores[e]} for e in sorted(scores) if e in wanted]
    best = min(table, key=lambda row: (row[metric_name], row["epoch"]))["epoch"]
    _write_selection(out_dir, table_name, scores, metric_name, settings)
    return best, table


def _write_selection(out_dir: Path, table_name: str, scores: dict[int, float], metric_name: str,
                     settings: dict | None) -> None:
    table = [{"epoch": e, metric_name: scores[e]} for e in sorted(scores)]
    finite = [row for row in table if math.isfinite(row[metric_name])]
    best = min(finite, key=lambda row: (row[metric_name], row["epoch"]))["epoch"] if finite else None
    atomic_write_json(out_dir / f"{table_name}.json",
                      {"metric": metric_name, "best_epoch": best, "settings": settings or {}, "table": table})
    lines = [f"| epoch | {metric_name} |", "|---:|---:|"]
    for row in table:
        mark = " (best)" if row["epoch"] == best else ""
        lines.append(f"| {row['epoch']}{mark} | {row[metric_name]:.4f} |")
    atomic_write_text(out_dir / f"{table_name}.md", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# Orchestration used by train_discriminator.py: real frames, the exported DG pipeline
# --------------------------------------------------------------------------------------------------
def real_images(dataset: str | os.PathLike, split: str = "train", num: int | None = 50_000, seed: int = 0,
                channels: int | None = None) -> np.ndarray:
    """A seeded subsample of ``num`` real frames (all when ``num`` is None or larger) as uint8 NCHW."""
    from pipelines.data.frame_reader import FrameDataset

    frames = FrameDataset(dataset, split=split, channels=channels)
    return frames.images_uint8(seeded_subset(len(frames), num, seed))


def attach_discriminator(pipeline, discriminator) -> None:
    """Make ``discriminator`` the pipeline's component (the pipeline binds a UNet-encoder one to its UNet on use)."""
    pipeline.register_modules(discriminator=discriminator)
    if discriminator is not None:
        discriminator.to(pipeline.device).eval()


def export_guided_pipeline(pipeline, discriminator, out_dir: str | os.PathLike, dg_settings: dict | None = None,
                           selection: dict | None = None, card: dict | None = None) -> Path:
    """Save the unguided pipeline plus the chosen discriminator as one pipeline folder, with its model card.

    ``dg_settings`` (the sampler arguments DG was scored with) and ``selection`` (the epoch -> FID
    table) go to ``dg_settings.json`` in the folder; sampling stays unguided unless the caller passes
    the DG arguments, e.g. ``pipe(seeds=..., **json.load(open(folder / "dg_settings.json"))["sampler"])``.
    ``card``: :func:`write_guided_pipeline_card`'s keyword arguments (its training data, repo id, ...).
    """
    out_dir = Path(out_dir)
    attach_discriminator(pipeline, discriminator)
    pipeline.save_pretrained(str(out_dir))
    atomic_write_json(out_dir / "dg_settings.json", {"sampler": dg_settings or {}, "selection": selection or {}})
    write_guided_pipeline_card(out_dir, pipeline, dg_settings or {}, selection or {}, **(card or {}))
    return out_dir


def guided_card_section(dg_settings: dict, selection: dict, model: str | None) -> str:
    """Model-card Markdown for a DG pipeline: the discriminator's epoch, how it was chosen, how to sample."""
    exported, metric = selection.get("exported_epoch"), selection.get("metric", "FID")
    rows = "\n".join(f"| {row['epoch']}{' (exported)' if row['epoch'] == exported else ''} | {row[metric]:.4f} |"
                      for row in selection.get("table", []))
    chosen = (f"The discriminator is epoch {exported}, the lowest {metric} of DG samples among the epochs "
              f"scored:\n\n| epoch | {metric} |\n|---:|---:|\n{rows}\n" if rows
              else f"The discriminator is epoch {exported} (no epoch selection was recorded).\n")
    settings = json.dumps(dg_settings, indent=2, sort_keys=True, default=str)
    return (
        "\n## Discriminator Guidance\n\n"
        f"The unguided diffusion model{f' `{model}`' if model else ''} plus a discriminator trained with "
        "EchoDiff's `train_discriminator.py` (Kim et al. 2023) to tell its samples from real frames. "
        f"{chosen}\nSampling is unguided unless the DG arguments are passed; those the selection used are in "
        "`dg_settings.json`:\n\n```python\nimport json\n\nsettings = json.load(open(\"dg_settings.json\"))[\"sampler\"]\n"
        "images = pipe(seeds=[0, 1, 2, 3], num_inference_steps=30, **settings).images\n```\n\n"
        f"```json\n{settings}\n```\n"
    )


def write_guided_pipeline_card(folder: Path, pipeline, dg_settings: dict, selection: dict,
                               training_dataset: str | None = None, repo_id: str | None = None,
                               model: str | None = None, reference: str | None = None,
                               num_grid_images: int = 16, grid_steps: int = 18) -> Path:
    """The DG pipeline's card: the exported epoch's FID (over the selection's seeds, against ``reference``),
    a grid of DG samples, the DG section; the training data's terms come from ``training_dataset``."""
    from pipelines import hub
    from pipelines.cli import parse_seeds
    from pipelines.utils import to_uint8

    exported, metric = selection.get("exported_epoch"), selection.get("metric", "FID")
    score = next((row[metric] for row in selection.get("table", []) if row["epoch"] == exported), None)
    metrics, evaluation = {}, {}
    if score is not None and math.isfinite(score):
        metrics[f"{metric} (DG, epoch {exported})"] = float(score)
        seeds = selection.get("settings", {}).get("seeds")
        evaluation = {"num_generated": len(parse_seeds(seeds)) if seeds else None, "reference": reference}
    grid = None
    if num_grid_images > 0:
        sampler = {k: v for k, v in dg_settings.items() if not (isinstance(v, str) and v.endswith("inf"))}
        with torch.no_grad():
            latents = pipeline(seeds=list(range(num_grid_images)), num_inference_steps=grid_steps,
                               output_type="latent", **sampler).images
        grid = to_uint8(torch.as_tensor(latents))
    return hub.write_model_card(folder, repo_id, metrics=metrics, training_dataset=training_dataset,
                                evaluation=evaluation, sample_grid=grid,
                                sections=[guided_card_section(dg_settings, selection, model)])

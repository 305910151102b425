"""Distribution-shift classifiers: the paper's Table 2 (real vs generated accuracy).

Three binary classifiers learn to tell real frames (label 1) from generated ones (label 0):

- ``linear``: one ``nn.Linear`` on the flattened pixels, no non-linearity (pixel-level shift);
- ``resnet18``: ``transformers`` ResNet-18 (basic blocks, depths 2-2-2-2, widths 64-512), randomly
  initialised, one output logit. Grayscale frames go in as they are: the stem convolution is built with
  ``num_channels`` equal to the image channels (1 for echo), so nothing is replicated to RGB;
- ``aug_resnet18``: the same network trained on randomly resized/cropped, flipped and rotated inputs.

Validation accuracy 50% means the classifier cannot tell the sets apart (indistinguishable); 100%
means it separates them perfectly. Paper defaults: 50 epochs, Adam lr 1e-4, binary cross-entropy,
50,000 real + 50,000 generated frames, a 90/10 train/validation split.

Every classifier run is seeded and resumable: after each epoch the weights, the Adam state (safetensors)
and the history (``state.json``) go to an epoch checkpoint (the atomic scheme of
``pipelines.training.checkpoints``); a rerun skips finished runs and continues an interrupted one from
its last finished epoch (each epoch's shuffling and augmentation are seeded by (seed, epoch), so a
resumed run reproduces an uninterrupted one).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save, save_file
from torch import nn

from pipelines.training.checkpoints import epoch_checkpoints, load_optimizer_state, save_optimizer_state
from pipelines.utils import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_uint8_images,
    seeded_subset,
    to_float,
)

CLASSIFIER_NAMES = ("linear", "resnet18", "aug_resnet18")
CLASSIFIER_WEIGHTS, OPTIMIZER_FILE = "model.safetensors", "optimizer.safetensors"  # in each epoch checkpoint
DISPLAY_NAMES = {"linear": "Linear", "resnet18": "ResNet-18", "aug_resnet18": "Aug. ResNet-18"}
REAL_LABEL, GENERATED_LABEL = 1.0, 0.0
INDISTINGUISHABLE_NOTE = (
    "Accuracy is on the held-out validation split (balanced real/generated). "
    "50% means the classifier cannot tell real from generated frames (indistinguishable); 100% means "
    "it separates them perfectly."
)

ImageSource = Union[np.ndarray, Callable[[], np.ndarray]]


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
class LinearClassifier(nn.Module):
    """A single linear layer on the flattened pixels: sees only pixel-level (first-order) shift."""

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.linear = nn.Linear(channels * resolution * resolution, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1)).squeeze(-1)


class ResNet18Classifier(nn.Module):
    """transformers' ResNet-18 with one logit; returns logits of shape (B,) (BCE is computed outside,
    because float labels would make ``ResNetForImageClassification`` pick an MSE loss)."""

    def __init__(self, channels: int):
        super().__init__()
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(
            layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
            num_labels=1, num_channels=channels,
        )
        self.resnet = ResNetForImageClassification(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.resnet(pixel_values=images).logits.squeeze(-1)


def build_classifier(name: str, channels: int, resolution: int) -> nn.Module:
    """Build one of ``CLASSIFIER_NAMES`` for (channels, resolution, resolution) inputs in [-1, 1]."""
    if name == "linear":
        return LinearClassifier(channels, resolution)
    if name in ("resnet18", "aug_resnet18"):
        return ResNet18Classifier(channels)
    raise ValueError(f"classifier must be one of {CLASSIFIER_NAMES}, got {name!r}")


# --------------------------------------------------------------------------------------------------
# Augmentation (no torchvision CPU wheel here, so one affine warp per image with grid_sample)
# --------------------------------------------------------------------------------------------------
@dataclass
class AugmentConfig:
    """Non-destructive augmentation: zoom in by a random factor in [1, max_zoom] and crop a random
    window of the original size (resize + crop), flip left-right with probability flip_p, rotate by
    a random angle in [-max_rotation_deg, max_rotation_deg]. Pixels warped in from outside the frame
    are black (-1), like the background of an echo sector. The paper names the operations only; these
    magnitudes are our choice."""

    max_zoom: float = 1.15
    flip_p: float = 0.5
    max_rotation_deg: float = 10.0


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly zoom+crop, flip and rotate float images (B, C, H, W) in [-1, 1]; same shape out."""
    batch = images.shape[0]
    uniform = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
    zoom = 1.0 + (config.max_zoom - 1.0) * uniform[:, 0]
    # The crop window may sit anywhere whose samples stay between the outermost pixel centres
    # (at +-(1 - 1/size) in align_corners=False units), so crops never blend in the black border.
    height, width = images.shape[-2:]
    shift_x = (2 * uniform[:, 1] - 1) * (1.0 - 1.0 / width) * (1.0 - 1.0 / zoom)
    shift_y = (2 * uniform[:, 2] - 1) * (1.0 - 1.0 / height) * (1.0 - 1.0 / zoom)
    flip = torch.where(uniform[:, 3] < config.flip_p, -1.0, 1.0).to(torch.float64)
    angle = (2 * uniform[:, 4] - 1) * math.radians(config.max_rotation_deg)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], dim=1), torch.stack([sin * flip, cos, shift_y], dim=1)],
        dim=1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Shift to [0, 2] so that zero padding lands on black (-1) after shifting back.
    warped = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped - 1


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _torch_generator(seed: int, *keys: int) -> torch.Generator:
    value = int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(value)


@dataclass
class SplitData:
    """A balanced real/generated set split into train and validation parts (uint8 + float labels)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


def split_real_generated(
    real: np.ndarray, generated: np.ndarray, val_fraction: float = 0.1, seed: int = 0
) -> SplitData:
    """Seeded, stratified train/validation split of real (label 1) and generated (label 0) frames.

    Each class is split on its own so the validation set keeps the real/generated ratio.
    """
    check_uint8_images(real, "real images", square=True)
    check_uint8_images(generated, "generated images", square=True)
    if real.shape[1:] != generated.shape[1:]:
        raise ValueError(
            f"real images {real.shape[1:]} and generated images {generated.shape[1:]} must have the same "
            "(C, H, W); generate at the dataset's resolution and channels"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    parts = {"train": ([], []), "val": ([], [])}
    for class_index, (images, label) in enumerate(((real, REAL_LABEL), (generated, GENERATED_LABEL))):
        order = _rng(seed, 1, class_index).permutation(len(images))
        n_val = max(1, int(round(val_fraction * len(images))))
        if n_val >= len(images):
            raise ValueError(f"need at least 2 images per class for a train/validation split, got {len(images)}")
        for split, idx in (("val", order[:n_val]), ("train", order[n_val:])):
            idx = np.sort(idx)
            parts[split][0].append(images[idx])
            parts[split][1].append(np.full(len(idx), label, dtype=np.float32))
    return SplitData(
        train_images=np.concatenate(parts["train"][0]), train_labels=np.concatenate(parts["train"][1]),
        val_images=np.concatenate(parts["val"][0]), val_labels=np.concatenate(parts["val"][1]),
    )


def select_subset(total: int, count: int, seed: int, key: int) -> np.ndarray:
    """Seeded choice of ``count`` sorted indices out of ``total`` (all of them if ``count >= total``); ``key``
    tells the real subset (0) from the generated one (1)."""
    return seeded_subset(total, count, [seed, 2, key])


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """Content hash of arrays (shape, dtype, bytes): a resumed run must see the same data."""
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclass
class ClassifierConfig:
    """Training settings; the defaults are the paper's (batch size is not given there: ours)."""

    epochs: int = 50
    learning_rate: float = 1e-4
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    bf16: bool = False
    device: str = "cpu"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def resume_key(self, classifier: str) -> dict:
        """The settings a resumed run must share with the original (epochs may grow)."""
        key = asdict(self)
        key.pop("epochs")
        key.pop("eval_batch_size")
        key.pop("device")  # a run may move between devices
        if classifier != "aug_resnet18":
            key.pop("augment")
        return {"classifier": classifier, **key}


def _autocast(bf16: bool, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 512,
             bf16: bool = False) -> dict:
    """Loss and accuracy (overall, on real, on generated) of ``model`` on uint8 images."""
    model.eval()
    device = next(model.parameters()).device
    logits = []
    for start in range(0, len(images), batch_size):
        batch = to_float(torch.from_numpy(images[start:start + batch_size]).to(device))
        with _autocast(bf16, device):
            logits.append(model(batch).float().cpu())
    logits = torch.cat(logits)
    targets = torch.from_numpy(labels)
    correct = ((logits > 0).float() == targets).float()
    real = targets == REAL_LABEL
    return {
        "loss": F.binary_cross_entropy_with_logits(logits, targets).item(),
        "accuracy": correct.mean().item(),
        "accuracy_real": correct[real].mean().item() if real.any() else float("nan"),
        "accuracy_generated": correct[~real].mean().item() if (~real).any() else float("nan"),
    }


def summarize_history(history: Sequence[dict]) -> dict:
    """Best-epoch and last-epoch validation accuracy (and last train accuracy) of one run."""
    if not history:
        raise ValueError("empty training history")
    best = max(history, key=lambda entry: (entry["val_accuracy"], -entry["epoch"]))
    last = history[-1]
    return {
        "best_val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "last_val_accuracy": last["val_accuracy"],
        "last_train_accuracy": last["train_accuracy"],
        "epochs": last["epoch"],
        "mean_epoch_seconds": float(np.mean([entry["epoch_seconds"] for entry in history])),
    }


def train_classifier(
    name: str,
    data: SplitData,
    out_dir: str | os.PathLike,
    config: ClassifierConfig | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or resume, or skip when finished) one classifier; return its summary and history.

    ``out_dir`` gets ``checkpoints/epoch-NNN/`` (the last finished epoch: ``model.safetensors``, the Adam
    state ``optimizer.safetensors`` and ``state.json`` with the settings key, the data fingerprint and the
    per-epoch history) and ``best.safetensors`` (weights of the best validation epoch).
    """
    config = config or ClassifierConfig()
    if name not in CLASSIFIER_NAMES:
        raise ValueError(f"classifier must be one of {CLASSIFIER_NAMES}, got {name!r}")
    if config.epochs < 1 or config.batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {config.epochs}, {config.batch_size}")
    out_dir = Path(out_dir)
    store = epoch_checkpoints(out_dir)
    store.remove_partial()
    identity = {"resume_key": config.resume_key(name),
                "data_fingerprint": fingerprint_arrays(data.train_images, data.train_labels, data.val_images,
                                                       data.val_labels)}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = build_classifier(name, data.train_images.shape[1], data.train_images.shape[2])
    device = torch.device(config.device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    history = _resume_classifier(store, identity, model, optimizer, config.epochs)
    if len(history) >= config.epochs:
        history = history[: config.epochs]
        log(f"[{name}] finished earlier ({len(history)} epochs): skipping")
        return {"classifier": name, **summarize_history(history), "history": history}
    if history:
        log(f"[{name}] resuming after epoch {len(history)}")

    writer = None
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tensorboard_dir))
    best_accuracy = max((entry["val_accuracy"] for entry in history), default=-1.0)
    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            entry = _train_classifier_epoch(name, model, optimizer, data, config, device, epoch)
            history.append(entry)
            if writer is not None:
                for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
                    writer.add_scalar(key.replace("_", "/", 1), entry[key], epoch)
                writer.flush()
            weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
            if entry["val_accuracy"] > best_accuracy:
                best_accuracy = entry["val_accuracy"]
                atomic_write(out_dir / "best.safetensors",
                             lambda handle, w=weights, e=epoch: handle.write(save(w, metadata={"epoch": str(e)})))
            store.save(epoch, lambda folder, w=weights: _write_classifier_state(folder, w, optimizer),
                       {**identity, "history": history}, total_limit=1)
            log(f"[{name}] epoch {epoch}/{config.epochs}: train acc {entry['train_accuracy']:.4f} "
                f"val acc {entry['val_accuracy']:.4f} ({entry['epoch_seconds']:.1f}s)")
    finally:
        if writer is not None:
            writer.close()
    return {"classifier": name, **summarize_history(history), "history": history}


def _resume_classifier(store, identity: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                       epochs: int) -> list[dict]:
    """The history of the run in ``store`` (empty for a new one); loads its last epoch unless it is finished."""
    latest = store.latest()
    if latest is None:
        return []
    state = store.read_state(latest)
    if any(state[key] != value for key, value in identity.items()):
        raise ValueError(
            f"{latest / store.state_file} belongs to a run with other settings or data "
            f"({state['resume_key']} vs {identity['resume_key']}); use a fresh output folder"
        )
    if len(state["history"]) < epochs:
        model.load_state_dict(load_file(latest / CLASSIFIER_WEIGHTS))
        load_optimizer_state(optimizer, latest / OPTIMIZER_FILE)  # moves Adam's state to each parameter's device
    return state["history"]


def _write_classifier_state(folder: Path, weights: dict, optimizer: torch.optim.Optimizer) -> None:
    save_file(weights, str(folder / CLASSIFIER_WEIGHTS))
    save_optimizer_state(optimizer, folder / OPTIMIZER_FILE)


def _train_classifier_epoch(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, data: SplitData,
                            config: ClassifierConfig, device: torch.device, epoch: int) -> dict:
    """One epoch of BCE steps, then validation; the epoch's history entry."""
    started = time.perf_counter()
    model.train()
    train_images, train_labels = torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels)
    order = torch.randperm(len(train_images), generator=_torch_generator(config.seed, 3, epoch))
    augment_generator = _torch_generator(config.seed, 4, epoch)
    loss_sum, correct, seen = 0.0, 0.0, 0
    for start in range(0, len(order), config.batch_size):
        index = order[start:start + config.batch_size]
        if len(index) < 2:  # BatchNorm cannot train on a single image
            continue
        images = to_float(train_images[index])
        if name == "aug_resnet18":  # augmentation on CPU keeps its random stream device-independent
            images = augment_batch(images, config.augment, augment_generator)
        images, targets = images.to(device), train_labels[index].to(device)
        with _autocast(config.bf16, device):
            logits = model(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(index)
        correct += ((logits.detach() > 0).float() == targets).sum().item()
        seen += len(index)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(model, data.val_images, data.val_labels, config.eval_batch_size, config.bf16)
    return {
        "epoch": epoch,
        "train_loss": loss_sum / seen,
        "train_accuracy": correct / seen,
        "val_loss": metrics["loss"],
        "val_accuracy": metrics["accuracy"],
        "val_accuracy_real": metrics["accuracy_real"],
        "val_accuracy_generated": metrics["accuracy_generated"],
        "train_seconds": train_seconds,
        "epoch_seconds": time.perf_counter() - started,
        "train_images_per_second": seen / train_seconds,
    }


# --------------------------------------------------------------------------------------------------
# Table 2: several generated sets x three classifiers
# --------------------------------------------------------------------------------------------------
def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_markdown_table(results: Sequence[dict], classifiers: Sequence[str]) -> str:
    """The paper's layout (rows: generated sets, columns: classifiers), best-epoch and last-epoch."""
    by_cell = {(r["generated_set"], r["classifier"]): r for r in results}
    sets = list(dict.fromkeys(r["generated_set"] for r in results))
    header = "| Classifier | " + " | ".join(DISPLAY_NAMES[c] for c in classifiers) + " |"
    rule = "|---|" + "---|" * len(classifiers)
    lines = ["## Real vs generated validation accuracy", "", INDISTINGUISHABLE_NOTE, ""]
    for title, key in (("Best epoch", "best_val_accuracy"), ("Last epoch", "last_val_accuracy")):
        lines += [f"### {title}", "", header, rule]
        for name in sets:
            cells = []
            for classifier in classifiers:
                cell = by_cell.get((name, classifier))
                if cell is None:
                    cells.append("-")
                elif key == "best_val_accuracy":
                    cells.append(f"{_percent(cell[key])} (epoch {cell['best_epoch']})")
                else:
                    cells.append(_percent(cell[key]))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "### Overfitting check (last epoch: train vs validation accuracy)",
        "",
        "| Generated set | Classifier | Train acc. | Val. acc. | Gap | Epochs | s/epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gap = r["last_train_accuracy"] - r["last_val_accuracy"]
        lines.append(
            f"| {r['generated_set']} | {DISPLAY_NAMES[r['classifier']]} | {_percent(r['last_train_accuracy'])} "
            f"| {_percent(r['last_val_accuracy'])} | {100 * gap:+.2f} pt | {r['epochs']} "
            f"| {r['mean_epoch_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "generated_set", "classifier", "best_val_accuracy", "best_epoch", "last_val_accuracy",
    "last_train_accuracy", "epochs", "n_train", "n_val", "mean_epoch_seconds",
)


def write_report(results: Sequence[dict], classifiers: Sequence[str], out_dir: str | os.PathLike) -> None:
    """Write ``table.md``, ``table.csv`` and ``results.json`` (with per-epoch histories)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "table.md", format_markdown_table(results, classifiers))

    def write_csv(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)

    atomic_write(out_dir / "table.csv", write_csv, mode="w")
    atomic_write_json(out_dir / "results.json", {"note": INDISTINGUISHABLE_NOTE, "results": list(results)})


def run_distribution_shift(
    real_images: np.ndarray,
    generated_sets: Mapping[str, ImageSource],
    out_dir: str | os.PathLike,
    classifiers: Sequence[str] = CLASSIFIER_NAMES,
    config: ClassifierConfig | None = None,
    num_per_class: int = 50_000,
    val_fraction: float = 0.1,
    tensorboard: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train every classifier on real vs each generated set; write the Table 2 report to ``out_dir``.

    ``generated_sets`` maps a row name (e.g. "Pre-DG") to a uint8 (N, C, H, W) array or a callable
    returning one (loaded when its row starts). Each row uses ``num_per_class`` frames per class (fewer,
    with a warning, if a set is smaller); the real subset and its split are the same for every row.
    Runs live in ``out_dir/<set>/<classifier>/``, curves in ``out_dir/tensorboard/<set>/<classifier>``.
    """
    config = config or ClassifierConfig()
    check_uint8_images(real_images, "real images", square=True)
    unknown = [c for c in classifiers if c not in CLASSIFIER_NAMES]
    if unknown or not classifiers:
        raise ValueError(f"classifiers must be a non-empty subset of {CLASSIFIER_NAMES}, got {list(classifiers)}")
    if not generated_sets:
        raise ValueError("generated_sets is empty: give at least one NAME -> images")
    for set_name in generated_sets:
        if not set_name or "/" in set_name or set_name.startswith("."):
            raise ValueError(f"generated set name {set_name!r} must be a non-empty folder-safe name")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for set_name, source in generated_sets.items():
        generated = check_uint8_images(source() if callable(source) else source, f"generated set {set_name!r}",
                                       square=True)
        count = min(num_per_class, len(real_images), len(generated))
        if count < num_per_class:
            log(f"warning: {set_name}: using {count} frames per class (asked for {num_per_class}; "
                f"real {len(real_images)}, generated {len(generated)})")
        real = real_images[select_subset(len(real_images), count, config.seed, 0)]
        fake = generated[select_subset(len(generated), count, config.seed, 1)]
        data = split_real_generated(real, fake, val_fraction=val_fraction, seed=config.seed)
        del generated, real, fake
        for classifier in classifiers:
            log(f"== {set_name} / {DISPLAY_NAMES[classifier]} ({len(data.train_images)} train, "
                f"{len(data.val_images)} val)")
            result = train_classifier(
                classifier, data, out_dir / set_name / classifier, config,
                tensorboard_dir=(out_dir / "tensorboard" / set_name / classifier) if tensorboard else None,
                log=log,
            )
            results.append({"generated_set": set_name, "n_train": len(data.train_images),
                            "n_val": len(data.val_images), **result})
            write_report(results, classifiers, out_dir)
    return results

"""Conditioning accuracy (``evaluate.py conditioning``) and conditions drawn from the real frames (FID).

A predictor trained on REAL frames (the training split) reads each condition back from an image: a scalar
(EF) by regression, a categorical one (phase) by classification. It is scored on held-out real frames (their
true labels: the predictor's own ceiling) and on generated frames (the conditions they were generated with),
per guidance scale, plus a null-label row (unconditional samples scored against the conditions they were
not given: the floor). Generated frames follow the real label distribution: seed s gets the labels of a
seeded draw of one held-out real frame (:class:`RealConditions`).

The predictor is transformers' ResNet (the family of Table 2's ResNet-18 classifier, built the same way) at a
quarter of ResNet-18's width with one output per scalar and one logit per class: small enough to train on
the CPU in a minute, deep enough to measure ventricle size. No augmentation: zooms and crops change the
apparent cavity size the EF is read from. Categorical losses are class-weighted (phase "other" outnumbers ED
and ES), and balanced accuracy is reported next to accuracy.

Resumable: the predictor's weights (safetensors, with its settings and data fingerprint) and every setting's
samples (per-seed shards) are kept under ``out_dir`` and reused; the scores are recomputed from them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.cli import parse_seeds
from pipelines.components.conditioning import check_spec, decode, encode, label_dim
from pipelines.data.conditions import condition_column
from pipelines.evaluation.distribution_shift import fingerprint_arrays
from pipelines.evaluation.generation import generate_images, load_images
from pipelines.utils import atomic_write_json, atomic_write_text, jsonable, setting_differences, to_float

PREDICTOR_DIR = "predictor"
RESULTS_FILE = "conditioning.json"
TABLE_FILE = "conditioning.md"


# --------------------------------------------------------------------------------------------------
# conditions drawn from real frames
# --------------------------------------------------------------------------------------------------
def spec_of(pipeline) -> dict:
    spec = pipeline.config.get("conditions") if hasattr(pipeline, "config") else None
    if not spec:
        raise ValueError("this pipeline has no named conditions (config.conditions): it is unconditional; train "
                         "one with train_unconditional.py --condition (docs/conditioning.md)")
    return check_spec(dict(spec))


class RealConditions:
    """Per-seed conditions from real frames: seed s takes the labels of frame ``default_rng([draw_seed, s])``
    of ``frames`` (uniform over frames, so the conditions follow the real label distribution, and a seed's
    condition is the same in any batch or shard). Scalars outside the model's range (frames of another split
    than it trained on) are clipped to it; ``clipped`` counts them per condition."""

    def __init__(self, spec: dict, frames, draw_seed: int = 0, description: str = ""):
        self.spec, self.draw_seed, self.num_frames = spec, int(draw_seed), len(frames)
        self.values, self.clipped = {}, {}
        for condition in spec["conditions"]:
            column = condition_column(frames, condition)
            if condition["kind"] == "scalar":
                low, high = condition["range"]
                self.clipped[condition["name"]] = sum(not low <= v <= high for v in column)
                column = [min(max(v, low), high) for v in column]
            self.values[condition["name"]] = column
        self.description = description or f"labels of real frames drawn per seed (draw seed {draw_seed})"

    def frame_indices(self, seeds: Sequence[int]) -> list[int]:
        return [int(np.random.default_rng([self.draw_seed, int(s)]).integers(self.num_frames)) for s in seeds]

    def __call__(self, seeds: Sequence[int]) -> dict[str, list]:
        indices = self.frame_indices(seeds)
        return {name: [column[i] for i in indices] for name, column in self.values.items()}


class ConditionedPipeline:
    """A conditional pipeline whose calls get each seed's conditions from ``draw`` (everything else passes
    through), so FID, the sweep and generation use a conditional model unchanged."""

    def __init__(self, pipeline, draw: RealConditions):
        self.pipeline, self.draw = pipeline, draw

    def __call__(self, *args, seeds=None, **kwargs):
        if seeds is None:
            raise ValueError("a conditional model evaluated on drawn conditions needs seeds=... (one per image)")
        return self.pipeline(*args, seeds=seeds, **self.draw(seeds), **kwargs)

    def shard_labels(self, seeds: Sequence[int]) -> dict[str, np.ndarray]:
        """The conditions each seed is sampled with, as generation shards store them beside the images (so an
        export's FileList.csv / metadata.csv names the conditions used)."""
        return {name: np.asarray(values) for name, values in self.draw(seeds).items()}

    def __getattr__(self, name: str):
        return getattr(self.pipeline, name)


def with_real_conditions(pipeline, frames, draw_seed: int = 0):
    """``pipeline`` itself if unconditional, else wrapped to sample conditions drawn from ``frames``; and the
    draw's description for the run records (None when unconditional)."""
    spec = pipeline.config.get("conditions") if hasattr(pipeline, "config") else None
    if not spec:
        return pipeline, None
    draw = RealConditions(check_spec(dict(spec)), frames, draw_seed)
    return ConditionedPipeline(pipeline, draw), draw.description


# --------------------------------------------------------------------------------------------------
# the predictor
# --------------------------------------------------------------------------------------------------
class ConditionPredictor(nn.Module):
    """transformers' ResNet (basic blocks, depths 2-2-2-2) with ``outputs`` heads; input uint8-derived floats in
    [-1, 1]. Output layout = the label vector's without the "labelled" flag (scalars, then class logits)."""

    def __init__(self, channels: int, outputs: int, width: int = 16):
        super().__init__()
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], embedding_size=width,
                              hidden_sizes=[width, 2 * width, 4 * width, 8 * width], num_labels=outputs,
                              num_channels=channels)
        self.resnet = ResNetForImageClassification(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.resnet(pixel_values=images).logits


def _slices(spec: dict):
    """(condition, slice into the predictor's outputs) per condition."""
    start = 0
    for condition in spec["conditions"]:
        width = 1 if condition["kind"] == "scalar" else len(condition["classes"])
        yield condition, slice(start, start + width)
        start += width


def _loss(spec: dict, outputs: torch.Tensor, targets: torch.Tensor, class_weights: dict) -> torch.Tensor:
    total = outputs.new_zeros(())
    for condition, part in _slices(spec):
        if condition["kind"] == "scalar":
            total = total + F.mse_loss(outputs[:, part], targets[:, part])
        else:
            total = total + F.cross_entropy(outputs[:, part], targets[:, part].argmax(1),
                                            weight=class_weights[condition["name"]])
    return total


def _class_weights(spec: dict, targets: torch.Tensor) -> dict:
    """Inverse-frequency weights per categorical condition (a class absent from training gets weight 0)."""
    weights = {}
    for condition, part in _slices(spec):
        if condition["kind"] == "categorical":
            counts = targets[:, part].sum(0)
            weights[condition["name"]] = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp(min=1)),
                                                     torch.zeros_like(counts))
    return weights


def predict(model: nn.Module, images_u8: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(images_u8), batch_size):
            outs.append(model(to_float(torch.from_numpy(images_u8[start:start + batch_size]))).float())
    return torch.cat(outs)


def train_predictor(spec: dict, images_u8: np.ndarray, labels: torch.Tensor, out_dir: str | os.PathLike,
                    epochs: int = 8, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05,
                    width: int = 16, seed: int = 0, progress: bool = True) -> ConditionPredictor:
    """The predictor trained on ``images_u8`` (real frames) with their labels (encoded, flag first); reused
    from ``out_dir/predictor`` when its settings and data fingerprint match."""
    from safetensors.torch import load_file, save_file

    folder = Path(out_dir) / PREDICTOR_DIR
    settings = jsonable({"spec": spec, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                         "weight_decay": weight_decay, "width": width, "seed": seed, "data": fingerprint_arrays(images_u8, labels.numpy())})
    targets = labels[:, 1:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConditionPredictor(images_u8.shape[1], targets.shape[1], width)
    if (folder / "settings.json").exists() and (folder / "model.safetensors").exists():
        stored = json.loads((folder / "settings.json").read_text())
        if not setting_differences(stored, settings):
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
            return model.eval()
    weights = _class_weights(spec, targets)
    # AdamW's decay: each video's frames share one EF, so the predictor otherwise memorises videos.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(images_u8)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    from tqdm.auto import tqdm

    model.train()
    for _ in tqdm(range(epochs), desc="training the condition predictor on real frames", disable=not progress):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            loss = _loss(spec, model(to_float(images[index])), targets[index], weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    atomic_write_json(folder / "settings.json", settings, indent=1, sort_keys=True)  # last: marks it complete
    return model.eval()


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------
def condition_scores(spec: dict, outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per condition: scalars ``<name>_r2`` and ``<name>_mae`` (in the condition's own units), categorical
    ``<name>_accuracy`` and ``<name>_balanced_accuracy`` (mean recall over the classes present)."""
    scores: dict[str, float] = {}
    targets = labels[:, 1:]
    for condition, part in _slices(spec):
        name = condition["name"]
        if condition["kind"] == "scalar":
            low, high = condition["range"]
            predicted = ((outputs[:, part.start].double() + 1) / 2 * (high - low) + low)
            true = ((targets[:, part.start].double() + 1) / 2 * (high - low) + low)
            residual = ((true - predicted) ** 2).sum().item()
            spread = ((true - true.mean()) ** 2).sum().item()
            scores[f"{name}_r2"] = 1 - residual / spread if spread > 0 else float("nan")
            scores[f"{name}_mae"] = (true - predicted).abs().mean().item()
        else:
            predicted, true = outputs[:, part].argmax(1), targets[:, part].argmax(1)
            scores[f"{name}_accuracy"] = (predicted == true).double().mean().item()
            recalls = [(predicted[true == k] == k).double().mean().item() for k in range(part.stop - part.start)
                       if (true == k).any()]
            scores[f"{name}_balanced_accuracy"] = float(np.mean(recalls))
    return scores


def _score_columns(spec: dict) -> list[str]:
    columns = []
    for condition in spec["conditions"]:
        name = condition["name"]
        columns += [f"{name}_r2", f"{name}_mae"] if condition["kind"] == "scalar" else [
            f"{name}_accuracy", f"{name}_balanced_accuracy"]
    return columns


def conditioning_markdown(spec: dict, rows: list[dict]) -> str:
    columns = _score_columns(spec)
    lines = ["| frames | guidance scale | n | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for row in rows:
        values = " | ".join(f"{row[c]:.3f}" for c in columns)
        scale = "" if row["guidance_scale"] is None else f"{row['guidance_scale']:g}"
        lines.append(f"| {row['frames']} | {scale} | {row['n']} | {values} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------------
def conditioning_study(pipeline, train_frames, heldout_frames, out_dir: str | os.PathLike, guidance_scales=(1.0,),
                       seeds: str | Sequence[int] = "0-999", num_inference_steps: int = 18, null_row: bool = True,
                       gen_batch_size: int = 32, draw_seed: int = 0, predictor_options: dict | None = None,
                       sampler_kwargs: dict | None = None, run_info: dict | None = None,
                       samples_root: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Conditioning accuracy of ``pipeline`` per guidance scale (see the module doc); writes ``conditioning.md``
    and ``conditioning.json`` under ``out_dir`` (samples under ``samples_root``, default ``out_dir``) and returns
    the results."""
    spec = spec_of(pipeline)
    out = Path(out_dir)
    seeds = parse_seeds(seeds)
    for scale in guidance_scales:
        if not math.isfinite(scale):
            raise ValueError(f"--guidance_scales: expected finite numbers, got {scale}")
    draw = RealConditions(spec, heldout_frames, draw_seed,
                          description=f"labels of held-out real frames drawn per seed (draw seed {draw_seed})")
    train_labels = encode(spec, RealConditions(spec, train_frames).values, len(train_frames))
    heldout_labels = encode(spec, draw.values, len(heldout_frames))  # EF clipped to the model's range, as drawn
    assert train_labels.shape[1] == label_dim(spec)
    model = train_predictor(spec, train_frames.images_uint8(), train_labels, out, progress=progress,
                            **(predictor_options or {}))
    rows = [dict(frames="real (held out)", guidance_scale=None, n=len(heldout_frames),
                 **condition_scores(spec, predict(model, heldout_frames.images_uint8()), heldout_labels))]
    wanted = encode(spec, draw(seeds), len(seeds))
    settings = [("generated", float(s)) for s in guidance_scales] + ([("generated, null label", None)] if null_row else [])
    for kind, scale in settings:
        folder = Path(samples_root or out) / ("samples-null-label" if scale is None else f"samples-cfg{scale:g}")
        call = dict(sampler_kwargs or {})
        sampler = ConditionedPipeline(pipeline, draw) if scale is not None else pipeline
        if scale is not None:
            call["guidance_scale"] = scale
        generate_images(sampler, folder, seeds, batch_size=gen_batch_size, num_inference_steps=num_inference_steps,
                        run_info={**(run_info or {}), "conditions": draw.description if scale is not None else
                                  "null label (unconditional)"}, progress=progress, **call)
        images = load_images(folder, seeds=seeds)
        rows.append(dict(frames=kind, guidance_scale=scale, n=len(seeds),
                         **condition_scores(spec, predict(model, images), wanted)))
    table = conditioning_markdown(spec, rows)
    atomic_write_text(out / TABLE_FILE, table)
    result = {"rows": rows, "table": str(out / TABLE_FILE), "conditions": spec, "seeds": f"{seeds[0]}-{seeds[-1]}"
              if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds, "num_inference_steps": num_inference_steps,
              "predictor": {"network": "transformers ResNet, basic blocks 2-2-2-2", **(predictor_options or {}),
                            "train_frames": len(train_frames), "heldout_frames": len(heldout_frames)},
              "generated_conditions": draw.description, "heldout_clipped_to_range": draw.clipped,
              "decoded_example": decode(spec, wanted[:4])}
    atomic_write_json(out / RESULTS_FILE, jsonable(result), indent=1)
    return result


def main_args(args, pipeline, frames_loader, progress: bool = True) -> dict:
    """``evaluate.py conditioning``'s work given its parsed ``args``."""
    train_frames = frames_loader(args.dataset, args.train_split)
    heldout_frames = frames_loader(args.dataset, args.heldout_split)
    options = {"epochs": args.predictor_epochs, "width": args.predictor_width}
    return conditioning_study(pipeline, train_frames, heldout_frames, args.output_dir, args.guidance_scales,
                              seeds=args.seeds, num_inference_steps=args.steps, null_row=not args.no_null_row,
                              gen_batch_size=args.gen_batch_size, draw_seed=args.draw_seed, predictor_options=options,
                              sampler_kwargs=args.sampler_kwargs, samples_root=args.samples_dir,
                              run_info={"model": str(args.model), **({"guide": str(args.guide)} if args.guide else {})},
                              progress=progress)

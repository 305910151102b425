"""Train an unconditional EchoDiff model: any of ADM / DDPM++ / NCSN++ x EDM / VP / VE (paper Table 1).

    accelerate launch --config_file accelerate_configs/8gpu_a40.yaml train_unconditional.py \
        --dataset data/echonet_frames_64 --arch adm --precond edm --output_dir runs/adm-edm

Defaults are the paper's setup on EDM's training loop (global batch 512, dropout 0.05, no
augmentation, Adam lr 1e-3 with a 10 Mimg warm-up, EMA half-life 500 kimg with ramp-up 0.05,
duration from Table 1). The run resumes with ``--resume_from_checkpoint latest`` and ends with a
``DiffusionPipeline`` folder (EMA weights) in ``<output_dir>/pipeline``. See docs/training.md.
"""

import argparse
import json
import sys

from pipelines.training.loop import (
    ARCH_NAMES,
    MIXED_PRECISION,
    PAPER_DURATION_KIMG,
    PRECOND_NAMES,
    REPORT_TO,
    ConfigError,
    TrainConfig,
    train,
)


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"model_channels\": 64}}': {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(dataset="", output_dir="")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", required=True, help="frame dataset folder (save_to_disk output) or Hub dataset id")
    g.add_argument("--split", default=d.split)
    g.add_argument("--output_dir", required=True, help="checkpoints, logs, samples and the final pipeline")
    g.add_argument("--arch", default=d.arch, help=f"one of {list(ARCH_NAMES)}")
    g.add_argument("--precond", default=d.precond, help=f"preconditioning and loss: one of {list(PRECOND_NAMES)}")
    g.add_argument("--resolution", type=int, default=None, help="checked against the dataset (default: the dataset's)")
    g.add_argument("--channels", type=int, default=None, help="1 (gray, default) or 3 (gray repeated)")
    g.add_argument("--dropout", type=float, default=d.dropout)
    g.add_argument("--network_overrides", type=_json_object, default={},
                   help="JSON object of network config fields, e.g. a smaller model_channels")
    g = p.add_argument_group("optimisation (EDM's loop)")
    g.add_argument("--duration_kimg", type=float, default=None,
                   help=f"training length in thousands of images (default: Table 1, {PAPER_DURATION_KIMG})")
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="global batch over all processes")
    g.add_argument("--batch_per_gpu", type=int, default=None,
                   help="images per process per forward pass; gradient accumulation makes up the rest")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--lr_rampup_kimg", type=float, default=d.lr_rampup_kimg)
    g.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--ema_halflife_kimg", type=float, nargs="+", default=list(d.ema_halflife_kimg),
                   help="one or more EMA half-lives; the first is exported as <output_dir>/pipeline")
    g.add_argument("--ema_rampup_ratio", type=_optional_float, default=d.ema_rampup_ratio,
                   help="cap the half-life at this fraction of images seen ('none' to disable)")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("speed and memory")
    g.add_argument("--mixed_precision", default=d.mixed_precision,
                   help=f"one of {list(MIXED_PRECISION)}; auto: the accelerate config's, else bf16 on a CPU with "
                   "native bf16, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (inductor)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=d.channels_last,
                   help="channels-last (NHWC) network and inputs")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls/convolutions on Ampere+ GPUs")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    g.add_argument("--dataloader_num_workers", type=int, default=d.dataloader_num_workers)
    g = p.add_argument_group("checkpoints, logging, export")
    g.add_argument("--checkpointing_kimg", type=float, default=d.checkpointing_kimg)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--snapshot_kimg", type=float, default=d.snapshot_kimg, help="sample grid every N kimg")
    g.add_argument("--save_pipeline_at_snapshot", action="store_true")
    g.add_argument("--num_sample_images", type=int, default=d.num_sample_images)
    g.add_argument("--sample_steps", type=int, default=d.sample_steps, help="Heun steps for the sample grid")
    g.add_argument("--logging_steps", type=int, default=d.logging_steps)
    g.add_argument("--report_to", default=d.report_to, help=f"one of {list(REPORT_TO)}")
    g.add_argument("--tracker_project_name", default=d.tracker_project_name)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_private", action=argparse.BooleanOptionalAction, default=d.hub_private)
    g.add_argument("--no_progress_bar", dest="progress_bar", action="store_false")
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values = vars(args)
    values["ema_halflife_kimg"] = tuple(values["ema_halflife_kimg"])
    return TrainConfig(**values)


def main(argv: list[str] | None = None):
    return train(config_from_args(argv))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # bad arguments: one clear line, no traceback
        sys.exit(f"error: {err}")

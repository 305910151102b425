"""Train the Discriminator Guidance discriminator, pick its best epoch by FID, export a DG pipeline.

Stages (``--stages``, default all three; each resumes where it stopped):
  train   real frames vs unguided samples, both noised at sigma from --sigma_dist; BCE; a checkpoint
          per epoch (safetensors) under <output_dir>/checkpoints; tensorboard logs in <output_dir>/logs
  select  FID of DG samples for each saved epoch (the paper's epoch selection) ->
          <output_dir>/epoch_selection.json and .md
  export  <output_dir>/pipeline: the unguided pipeline + the best epoch's discriminator (+ dg_settings.json),
          with its model card (README.md, samples.png); --push_to_hub uploads it, privately by default

Examples:
  python train_discriminator.py --model runs/edm-adm/pipeline --dataset data/frames64 \\
      --fake runs/edm-adm/samples-steps30 --output_dir runs/dg
  accelerate launch train_discriminator.py --model runs/edm-adm/pipeline --dataset data/frames64 \\
      --generate_fake 50000 --output_dir runs/dg --variant unet-encoder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.cli import finite_float_arg, int_list_arg, json_object_arg, make_parser
from pipelines.components.guidance import DG_SIGMA_MIN
from pipelines.errors import UserInputError, run_cli
from pipelines.training.discriminator import DISCRIMINATOR_VARIANTS, SIGMA_DISTRIBUTIONS

STAGES = ("train", "select", "export")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--model", required=True, help="unguided pipeline folder or Hub id (the diffusion model)")
    p.add_argument("--dataset", required=True, help="frame dataset folder (build_frame_dataset) or Hub id")
    p.add_argument("--split", default="train", help="real frames' split (default train)")
    p.add_argument("--output_dir", required=True, help="output folder (checkpoints, logs, tables, pipeline)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of train, select, export (default all)")
    data = p.add_argument_group("data")
    data.add_argument("--fake", default=None, help="unguided samples: .npz, generation shard folder or PNG folder")
    data.add_argument("--generate_fake", type=int, default=None, metavar="N",
                      help="instead of --fake: generate N unguided samples with --model into <output_dir>/fake")
    data.add_argument("--fake_seed_offset", type=int, default=1_000_000,
                      help="first seed of generated training fakes (default 1000000, away from FID seeds)")
    data.add_argument("--num_real", type=int, default=50_000, help="real frames used (seeded subsample; default 50000)")
    data.add_argument("--num_fake", type=int, default=50_000, help="generated images used (default 50000)")
    data.add_argument("--val_fraction", type=finite_float_arg, default=0.1, help="held-out fraction (default 0.1)")
    data.add_argument("--steps", type=int, default=30, help="sampler steps for generated images (default 30)")
    data.add_argument("--gen_batch_size", type=int, default=64, help="images per pipeline call when generating "
                                                                     "(default 64)")
    arch = p.add_argument_group("discriminator")
    arch.add_argument("--variant", default="adm", choices=DISCRIMINATOR_VARIANTS,
                      help="adm: encoder trained from scratch; unet-encoder: the diffusion UNet's frozen encoder "
                           "+ a small trainable head (default adm)")
    arch.add_argument("--tiny", action="store_true", help="a tiny discriminator (tests / CPU demos)")
    arch.add_argument("--disc_config", type=json_object_arg, default={}, help="JSON overrides of the discriminator config")
    train = p.add_argument_group("training (defaults: the DG reference)")
    train.add_argument("--epochs", type=int, default=50, help="default 50")
    train.add_argument("--batch_size", type=int, default=128, help="global batch size (default 128)")
    train.add_argument("--lr", type=finite_float_arg, default=3e-4, help="Adam learning rate (default 3e-4)")
    train.add_argument("--weight_decay", type=finite_float_arg, default=1e-7, help="Adam weight decay (default 1e-7)")
    train.add_argument("--sigma_dist", default="log-uniform", choices=SIGMA_DISTRIBUTIONS,
                       help="training noise levels (default log-uniform over [--sigma_min, --sigma_max])")
    train.add_argument("--sigma_min", type=finite_float_arg, default=0.002, help="default 0.002")
    train.add_argument("--sigma_max", type=finite_float_arg, default=80.0, help="default 80")
    train.add_argument("--p_mean", type=finite_float_arg, default=-1.2, help="log-normal: mean of ln(sigma) (default -1.2)")
    train.add_argument("--p_std", type=finite_float_arg, default=1.2, help="log-normal: std of ln(sigma) (default 1.2)")
    train.add_argument("--val_buckets", type=int, default=8, help="sigma buckets for validation accuracy (default 8)")
    train.add_argument("--seed", type=int, default=0, help="default 0")
    sel = p.add_argument_group("epoch selection (FID of DG samples) and DG settings")
    sel.add_argument("--select_epochs", type=lambda text: text if text == "all" else int_list_arg(text), default="all",
                     help="'all' (default) or a comma list of epochs to score")
    sel.add_argument("--selection_seeds", default="0-49999", help="seeds of the DG samples scored (default 0-49999)")
    sel.add_argument("--num_ref", type=int, default=50_000, help="real subsample size of the FID reference "
                                                                 "(default 50000)")
    sel.add_argument("--cache_dir", default=None, help="FID feature / statistics cache")
    sel.add_argument("--fid_batch_size", type=int, default=32, help="Inception batch size (default 32)")
    sel.add_argument("--dg_weight_first_order", type=finite_float_arg, default=5.0, help="paper: 5 (default)")
    sel.add_argument("--dg_weight_second_order", type=finite_float_arg, default=0.0, help="paper: 0 (default)")
    sel.add_argument("--dg_boost", type=finite_float_arg, default=2.0, help="paper: 2 (default)")
    sel.add_argument("--dg_boost_churn", action="store_true", help="the reference's extra churn (off by default)")
    sel.add_argument("--dg_sigma_min", type=finite_float_arg, default=DG_SIGMA_MIN,
                     help=f"guidance interval start (default {DG_SIGMA_MIN})")
    sel.add_argument("--dg_sigma_max", type=finite_float_arg, default=None, help="guidance window end (default: none)")
    hub = p.add_argument_group("publishing")
    hub.add_argument("--push_to_hub", action="store_true", help="upload <output_dir>/pipeline (with its card) "
                     "to the Hub after the export stage")
    hub.add_argument("--hub_model_id", default=None, help="Hub repo for --push_to_hub, e.g. your-name/echodiff-dg")
    hub.add_argument("--hub_public", action="store_true", help="make a new Hub repo public (default private: "
                     "a model of EchoNet-Dynamic data stays under its research-use agreement)")
    p.add_argument("--no_progress_bar", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None, hub_api=None) -> dict:
    """``hub_api``: the ``huggingface_hub.HfApi`` of ``--push_to_hub`` (default: a new one)."""
    args = build_parser().parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise UserInputError("--push_to_hub needs --hub_model_id (e.g. your-name/echodiff-dg)")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or sorted(set(stages) - set(STAGES)):
        raise UserInputError(f"--stages must list train, select and/or export, got {args.stages!r}")
    disc_overrides = args.disc_config

    from accelerate import Accelerator

    from pipelines.hub import load_pipeline

    out = Path(args.output_dir)
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(out / "logs"))
    pipeline = load_pipeline(args.model, device=str(accelerator.device))
    pipeline.unet.requires_grad_(False)
    dg_kwargs = {"dg_weight_first_order": args.dg_weight_first_order,
                 "dg_weight_second_order": args.dg_weight_second_order, "dg_boost": args.dg_boost,
                 "dg_boost_churn": args.dg_boost_churn, "dg_sigma_min": args.dg_sigma_min,
                 "dg_sigma_max": args.dg_sigma_max}
    summary: dict = {"out": str(out)}
    if "train" in stages:
        summary["last_epoch"] = _train_stage(args, pipeline, disc_overrides, accelerator)
    best = None
    if "select" in stages:
        best, table = _select_stage(args, pipeline, dg_kwargs, accelerator)
        summary.update(best_epoch=best, table=table, table_md=str(out / "epoch_selection.md"))
    if "export" in stages and accelerator.is_main_process:
        summary["pipeline"] = str(_export_stage(args, out, pipeline, best, dg_kwargs))
        if args.push_to_hub:
            summary["hub_commit"] = str(_push_stage(args, Path(summary["pipeline"]), hub_api))
    accelerator.end_training()
    if accelerator.is_main_process:
        from pipelines.utils import atomic_write_json

        atomic_write_json(out / "summary.json", _jsonable(summary), default=str)
    return summary


def _train_stage(args, pipeline, disc_overrides: dict, accelerator) -> dict | None:
    from pipelines.evaluation.generation import load_or_generate_images
    from pipelines.training import discriminator as dg

    out, progress = Path(args.output_dir), not args.no_progress_bar
    if (args.fake is None) == (args.generate_fake is None):
        raise UserInputError("give exactly one of --fake (existing unguided samples) or --generate_fake N")
    resolution, channels = int(pipeline.unet.config.sample_size), int(pipeline.unet.config.in_channels)
    real = dg.real_images(args.dataset, args.split, args.num_real, args.seed, channels=channels)
    fake = load_or_generate_images(args.fake, pipeline, out / "fake", args.generate_fake or args.num_fake,
                               args.steps, args.gen_batch_size, accelerator, args.fake_seed_offset, progress)
    fake = fake[:args.num_fake]
    if real.shape[1:] != (channels, resolution, resolution):
        raise UserInputError(f"real frames are {real.shape[1:]}, the model makes {(channels, resolution, resolution)}")
    data = dg.make_real_fake_split(real, fake, args.val_fraction, seed=args.seed)
    accelerator.print(f"discriminator data: {len(real)} real, {len(fake)} generated, "
                      f"{len(data.train_indices)} train / {len(data.val_indices)} validation")
    model = dg.build_discriminator(args.variant, resolution, channels, unet=pipeline.unet, tiny=args.tiny,
                                   **dg.preconditioning_of(pipeline), **disc_overrides)
    config = dg.DiscriminatorTrainingConfig(
        num_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        weight_decay=args.weight_decay, val_fraction=args.val_fraction, num_val_buckets=args.val_buckets,
        seed=args.seed, sigma=dg.SigmaDistribution(args.sigma_dist, args.sigma_min, args.sigma_max,
                                                   args.p_mean, args.p_std))
    history = dg.train_discriminator(model, data, out, config, accelerator=accelerator, progress=progress)
    return history[-1] if history else None


def _select_stage(args, pipeline, dg_kwargs: dict, accelerator) -> tuple[int, list[dict]]:
    from pipelines.cli import parse_seeds
    from pipelines.data.frame_reader import load_frames
    from pipelines.evaluation.protocol import DEFAULT_CACHE_DIR, dg_epoch_fid_scorer
    from pipelines.training import discriminator as dg

    out = Path(args.output_dir)
    frames = load_frames(args.dataset, args.split)
    seeds = parse_seeds(args.selection_seeds)
    epochs = None if args.select_epochs == "all" else args.select_epochs
    fid_options = {"num_real": args.num_ref, "batch_size": args.fid_batch_size,
                   "cache_dir": Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE_DIR}
    score = dg_epoch_fid_scorer(pipeline, out, frames, seeds, args.steps, args.gen_batch_size, accelerator,
                                fid_options, not args.no_progress_bar, **dg_kwargs)
    settings = {"seeds": args.selection_seeds, "steps": args.steps, "num_ref": args.num_ref, **dg_kwargs}
    best, table = dg.select_best_epoch(out, score, epochs, settings=_jsonable(settings))
    accelerator.print((out / "epoch_selection.md").read_text())
    return best, table


def _card_options(args, repo_id: str | None) -> dict:
    return {"training_dataset": args.dataset, "repo_id": repo_id, "model": args.model, "grid_steps": args.steps,
            "reference": f"{args.num_ref:,} real frames at most ({args.split} split of {args.dataset})"}


def _push_stage(args, folder: Path, hub_api):
    """Upload the exported DG pipeline; its card is rewritten for the repo the Hub made (namespace included)."""
    from pipelines import hub
    from pipelines.training import discriminator as dg

    def write_card(target: Path, repo_id: str) -> None:
        settings = json.loads((target / "dg_settings.json").read_text())
        pipe = hub.load_pipeline(target)
        dg.write_guided_pipeline_card(target, pipe, settings["sampler"], settings["selection"],
                                      **_card_options(args, repo_id))

    return hub.push_folder(folder, args.hub_model_id, private=not args.hub_public, api=hub_api,
                           commit_message="Upload EchoDiff DG pipeline (train_discriminator.py)", write_card=write_card)


def _export_stage(args, out: Path, pipeline, best: int | None, dg_kwargs: dict) -> Path:
    from pipelines.training import discriminator as dg

    selection_path = out / "epoch_selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.is_file() else {}
    if best is None:
        best = selection.get("best_epoch") or (dg.saved_epochs(out) or [None])[-1]
    if best is None:
        raise UserInputError(f"nothing to export: no discriminator checkpoint under {out / 'checkpoints'}")
    disc = dg.load_epoch_discriminator(out, best, unet=pipeline.unet)
    from pipelines.hub import check_finite_module

    check_finite_module(disc, f"discriminator of epoch {best} under {out / 'checkpoints'}")
    folder = dg.export_guided_pipeline(pipeline, disc, out / "pipeline", _jsonable(dg_kwargs),
                                       {**selection, "exported_epoch": best},
                                       card=_card_options(args, args.hub_model_id if args.push_to_hub else None))
    print(f"DG pipeline (epoch {best}) written to {folder}")
    return folder


def _jsonable(obj):
    # inf is not JSON: write it as a string
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


if __name__ == "__main__":
    run_cli(main)

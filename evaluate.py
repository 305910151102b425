"""Evaluate EchoDiff models the way the paper does (FID as NVlabs EDM computes it).

Subcommands (each writes a JSON of results into --output_dir):
  fid          FID (+ KID) of a pipeline (folder / Hub id) or an image set (.npz, shard or PNG folder)
               against the cached statistics of a fixed, seeded subsample of the real frames
  optimal-fid  FID between two seeded halves of the real frames (patient-level and frame-level)
  fid-vs-nfe   FID + KID over sampler step counts, per sampler (--samplers) -> CSV, PNG, Markdown table
  variance     the paper's two variance experiments (mean +- std over --repeats)
  guidance-sweep  FID / KID over guidance weights and sigma intervals (autoguidance, DG, both) on one protocol
  sweep        the Table 1 grid: train each configured run, score it, write the table
  phema-sweep  post-hoc EMA (EDM2): FID per reconstructed EMA length of a --phema run, the best exported
  export-samples  generation shards -> a PNG folder (+ metadata.csv), a datasets image dataset (frame schema,
               --push_to_hub private) or an EchoNet-layout folder (FileList.csv + Videos/) for the builder
  conditioning  a conditional model's conditioning accuracy (EF R2 / MAE, phase accuracy) per guidance scale,
               read by a predictor trained on real frames, against the same on held-out real frames

A conditional model (train_unconditional.py --condition) samples every FID subcommand with conditions drawn
from the real frames' labels (per seed, docs/conditioning.md); pass guidance_scale in --sampler_kwargs.

Examples:
  python evaluate.py fid --model runs/edm-ddpmpp --dataset data/frames64 --seeds 0-49999
  python evaluate.py optimal-fid --dataset data/frames64 --split all
  python evaluate.py fid-vs-nfe --model runs/edm-adm --dataset data/frames64 --steps 5,10,18,30,50
  python evaluate.py guidance-sweep --model runs/main/pipeline --guide runs/guide/pipeline --dataset data/frames64 \\
      --ag_weights 1.5,2,3 --intervals 0:inf,0.28:5.42 --seeds 0-9999
  python evaluate.py phema-sweep --run runs/edm2-s --dataset data/frames64 --ema_std 0.03,0.05,0.07,0.1,0.15
  python evaluate.py fid-vs-nfe --model runs/edm-adm --dataset data/frames64 --samplers heun,dpmpp2m,unipc
  python evaluate.py conditioning --model runs/cond/pipeline --dataset data/frames64 --guidance_scales 1,2,4
  accelerate launch evaluate.py fid --model user/echodiff-adm --dataset user/echonet-frames
  python evaluate.py export-samples --samples runs/eval/samples-steps30 --format echonet --output_dir gen/echonet
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.cli import (
    add_subparser,
    float_list_arg,
    int_list_arg,
    interval_list_arg,
    json_object_arg,
    make_parser,
    weight_pair_list_arg,
)
from pipelines.errors import UserInputError, run_cli

SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")  # pipelines.training.precision (not imported for --help)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampler", default=None, help="sampler name (heun, euler, dpmpp2m, dpmpp3m, dpmpp2m_sde, "
                                                        "unipc; default: the pipeline's own scheduler)")
    parser.add_argument("--precision", default="auto", choices=SAMPLING_PRECISIONS,
                        help="network precision while sampling: auto (default) = bf16 autocast where the hardware "
                             "has native bf16, else fp32; fp32 to turn it off")


def _samples_name(steps: int, sampler: str | None) -> str:
    return f"samples-steps{steps}" if sampler is None else f"samples-{sampler}-steps{steps}"


def _add_reference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="frame dataset folder (build_frame_dataset) or Hub id")
    parser.add_argument("--split", default="train", help="split, 'all' or a comma list (default: train)")
    parser.add_argument("--num_real", type=int, default=50_000,
                        help="size of the fixed real subsample (default 50000; capped at the dataset size)")
    parser.add_argument("--subsample_seed", type=int, default=0, help="seed of the real subsample (default 0)")
    parser.add_argument("--ref_stats", default=None,
                        help="reference statistics .npz (default: derived from the fingerprint in --cache_dir)")


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="results/eval",
                        help="folder for the results JSON (default results/eval)")
    parser.add_argument("--cache_dir", default=None, help="feature / statistics cache (default $ECHODIFF_CACHE "
                                                          "or ~/.cache/echodiff)")
    parser.add_argument("--batch_size", type=int, default=32, help="Inception batch size")
    parser.add_argument("--device", default=None, help="device for Inception (default cuda if available)")
    parser.add_argument("--no_progress_bar", action="store_true", help="hide progress bars")


def _add_generation_args(parser: argparse.ArgumentParser, seeds_default: str = "0-49999") -> None:
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    parser.add_argument("--seeds", default=seeds_default, help=f"seeds, EDM style (default {seeds_default})")
    parser.add_argument("--gen_batch_size", type=int, default=32, help="images per pipeline call (per process)")
    parser.add_argument("--samples_dir", default=None, help="shard folder (default <output_dir>/samples-steps<N>)")
    parser.add_argument("--sampler_kwargs", type=json_object_arg, default={},
                        help='extra pipeline arguments as JSON, e.g. \'{"s_churn": 40}\'')
    parser.add_argument("--precision", default="auto", choices=SAMPLING_PRECISIONS,
                        help="network precision while sampling: auto (default) = bf16 autocast where the hardware "
                             "has native bf16, else fp32; fp32 to turn it off")
    _add_guide_arg(parser)


def _add_guide_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guide", default=None,
                        help="pipeline folder / Hub id whose UNet guides the model (autoguidance; pass ag_weight "
                             "in --sampler_kwargs or use guidance-sweep)")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fid = add_subparser(sub, "fid", help="FID (+ KID) of a pipeline or an image set against the real frames")
    fid.add_argument("--model", default=None, help="pipeline folder or Hub id to sample from")
    fid.add_argument("--images", default=None, help="instead of --model: .npz, shard folder or PNG folder")
    fid.add_argument("--seeds", default=None, help="seeds to generate/use, EDM style (default: 0-49999 with "
                                                    "--model, every image with --images)")
    fid.add_argument("--steps", type=int, default=30, help="sampler steps N (NFE = 2N - 1; default 30)")
    fid.add_argument("--gen_batch_size", type=int, default=32, help="images per pipeline call (per process)")
    fid.add_argument("--samples_dir", default=None, help="shard folder (default <output_dir>/samples-steps<N>)")
    fid.add_argument("--sampler_kwargs", type=json_object_arg, default={}, help="extra pipeline arguments as JSON")
    _add_sampling_args(fid)
    fid.add_argument("--no_kid", action="store_true", help="skip KID (needs the real subsample's features)")
    _add_guide_arg(fid)
    _add_reference_args(fid)
    _add_common_args(fid)

    opt = add_subparser(sub, "optimal-fid", help="FID between two seeded halves of the real frames")
    opt.add_argument("--dataset", required=True, help="frame dataset folder or Hub id")
    opt.add_argument("--split", default="all", help="split, 'all' or a comma list (default: all)")
    opt.add_argument("--seed", type=int, default=0, help="seed of the halves (default 0)")
    opt.add_argument("--max_per_half", type=int, default=None, help="cap each half (default: all frames)")
    _add_common_args(opt)

    nfe = add_subparser(sub, "fid-vs-nfe", help="FID over sampler step counts (Figure 1)")
    nfe.add_argument("--steps", type=int_list_arg, default=[5, 10, 18, 30, 50],
                     help="comma list of step counts N (default 5,10,18,30,50)")
    nfe.add_argument("--no_kid", action="store_true", help="skip KID")
    nfe.add_argument("--samplers", default=None, type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
                     help="comma list of samplers, one line each (e.g. heun,euler,dpmpp2m,dpmpp3m,unipc; default: "
                          "the pipeline's own scheduler)")
    _add_generation_args(nfe)
    _add_reference_args(nfe)
    _add_common_args(nfe)

    var = add_subparser(sub, "variance", help="the paper's variance experiments (mean +- std)")
    var.add_argument("--steps", type=int, default=18, help="sampler steps N (paper: 18)")
    var.add_argument("--repeats", type=int, default=10, help="repeats per experiment (paper: 10)")
    var.add_argument("--num_gen", type=int, default=50_000, help="generated images per repeat (paper: 50000)")
    var.add_argument("--model", required=True, help="pipeline folder or Hub id")
    var.add_argument("--gen_batch_size", type=int, default=32, help="images per pipeline call (per process)")
    var.add_argument("--sampler_kwargs", type=json_object_arg, default={}, help="extra pipeline arguments as JSON")
    _add_sampling_args(var)
    _add_reference_args(var)
    _add_common_args(var)

    guided = add_subparser(sub, "guidance-sweep", help="FID / KID over guidance weights and intervals")
    guided.add_argument("--steps", type=int, default=30, help="sampler steps N, the same for every row (default 30)")
    guided.add_argument("--ag_weights", type=float_list_arg, default=[],
                        help="autoguidance weights w (needs --guide or a pipeline with a guide_unet), e.g. 1.5,2,3")
    guided.add_argument("--dg_weights", type=float_list_arg, default=[],
                        help="DG first-order weights (needs a pipeline with a discriminator), e.g. 1,2,5")
    guided.add_argument("--intervals", type=interval_list_arg, default=[(0.0, float("inf"))],
                        help="sigma intervals LO:HI each guidance is swept over (default 0:inf)")
    guided.add_argument("--composed", type=weight_pair_list_arg, default=[],
                        help="autoguidance:DG weight pairs with both on, over the first interval, e.g. 2:1,3:2")
    guided.add_argument("--dg_options", type=json_object_arg, default={},
                        help='further DG arguments for the DG rows, e.g. \'{"dg_boost": 2}\'')
    guided.add_argument("--no_kid", action="store_true", help="skip KID")
    _add_generation_args(guided, seeds_default="0-9999")
    _add_reference_args(guided)
    _add_common_args(guided)
    phema = add_subparser(sub, "phema-sweep", help="FID per post-hoc EMA length of a --phema run (EDM2)")
    phema.add_argument("--run", required=True, help="training output_dir of a --phema run (with phema/ and pipeline/)")
    phema.add_argument("--ema_std", type=float_list_arg, default=[0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2],
                       help="comma list of relative EMA stds to reconstruct (default 0.02,0.03,0.05,0.07,0.1,0.15,0.2)")
    phema.add_argument("--steps", type=int, default=30, help="sampler steps N (NFE = 2N - 1; default 30)")
    phema.add_argument("--seeds", default="0-49999", help="seeds, EDM style (default 0-49999)")
    phema.add_argument("--gen_batch_size", type=int, default=32, help="images per pipeline call (per process)")
    phema.add_argument("--no_kid", action="store_true", help="skip KID")
    phema.add_argument("--no_export", action="store_true", help="do not save the best as a pipeline")
    _add_reference_args(phema)
    _add_common_args(phema)

    cond = add_subparser(sub, "conditioning", help="conditioning accuracy of a conditional model per guidance scale")
    cond.add_argument("--guidance_scales", type=float_list_arg, default=[1.0, 2.0, 4.0],
                      help="classifier-free guidance scales, one row each (default 1,2,4)")
    cond.add_argument("--steps", type=int, default=18, help="sampler steps N (default 18)")
    cond.add_argument("--train_split", default="train", help="real frames the predictor trains on (default train)")
    cond.add_argument("--heldout_split", default="validation",
                      help="held-out real frames: the predictor's own score and the generated conditions' source")
    cond.add_argument("--predictor_epochs", type=int, default=8, help="predictor training epochs (default 8)")
    cond.add_argument("--predictor_width", type=int, default=16, help="predictor ResNet base width (default 16)")
    cond.add_argument("--draw_seed", type=int, default=0, help="seed of the per-seed condition draw (default 0)")
    cond.add_argument("--no_null_row", action="store_true", help="skip the null-label (unconditional) row")
    _add_generation_args(cond, seeds_default="0-999")
    cond.add_argument("--dataset", required=True, help="frame dataset folder (build_frame_dataset) or Hub id")
    _add_common_args(cond)

    from pipelines.evaluation import sweep as sweep_lib

    sweep_lib.build_parser(add_subparser(sub, "sweep", help="Table 1 grid (configs/sweep_table1.yaml, configs/sweep_demo.yaml)"))

    export = add_subparser(sub, "export-samples", help="generation shards -> PNG folder, datasets dataset or EchoNet layout")
    export.add_argument("--samples", required=True, help="folder of generation shards (shard-*.npz)")
    export.add_argument("--format", required=True, choices=("png", "dataset", "echonet"),
                        help="png: <seed>.png + metadata.csv; dataset: datasets save_to_disk (frame schema); "
                             "echonet: FileList.csv + Videos/ (build_echonet_frames.py reads it)")
    export.add_argument("--output_dir", required=True, help="where the export goes")
    export.add_argument("--seeds", default=None, help="only these seeds, EDM style (default: every sample)")
    export.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                        help="--format dataset: also push it to this (private) Hub dataset repo")
    return parser


def _export_samples(args) -> dict:
    from pipelines.evaluation.sample_export import EXPORTERS

    if args.push_to_hub and args.format != "dataset":
        raise UserInputError("--push_to_hub works with --format dataset only")
    extra = {"push_to_hub": args.push_to_hub} if args.format == "dataset" else {}
    EXPORTERS[args.format](args.samples, args.output_dir, seeds=args.seeds, **extra)
    print(f"exported {args.samples} as {args.format} to {args.output_dir}")
    return {"format": args.format, "output_dir": str(args.output_dir)}


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.command == "sweep":
        from pipelines.evaluation import sweep as sweep_lib

        return sweep_lib.main(args=args)
    if args.command == "export-samples":
        return _export_samples(args)

    from pipelines.data.frame_reader import load_frames
    from pipelines.evaluation import protocol as ev
    from pipelines.evaluation.fid import InceptionDetector

    out = Path(args.output_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else ev.DEFAULT_CACHE_DIR
    progress = not args.no_progress_bar
    device = args.device or ev.default_device()

    if args.command == "optimal-fid":
        frames = load_frames(args.dataset, args.split)
        result = ev.optimal_fid(frames, seed=args.seed, max_per_half=args.max_per_half,
                                detector=InceptionDetector(device=device), cache_dir=cache_dir,
                                batch_size=args.batch_size, progress=progress)
        result["paper"] = {"64px": 0.88, "112px": 0.95}
        return _finish(result, out / "optimal_fid.json")

    if args.command == "conditioning":
        from pipelines.evaluation.conditioning import main_args
        from pipelines.hub import attach_guide, load_pipeline
        from pipelines.training.precision import resolve_sampling_precision

        pipeline = load_pipeline(args.model, device=device)
        if args.guide is not None:
            attach_guide(pipeline, args.guide, device=device)
        args.sampler_kwargs = {**args.sampler_kwargs, "precision": resolve_sampling_precision(args.precision, device)}
        result = main_args(args, pipeline, load_frames, progress=progress)
        return _finish(result, out / "conditioning.json")

    frames = load_frames(args.dataset, args.split)
    common = {"num_real": args.num_real, "subsample_seed": args.subsample_seed, "stats_path": args.ref_stats,
              "cache_dir": cache_dir, "batch_size": args.batch_size, "progress": progress}

    if args.command == "fid" and args.images is not None:
        if args.model is not None:
            raise UserInputError("give either --model or --images, not both")
        from pipelines.evaluation.generation import load_images

        if args.seeds is not None and not _has_seeds(args.images):
            raise UserInputError(f"--seeds selects images of a shard folder; {args.images} has no generation shards")
        images = load_images(args.images, seeds=args.seeds)
        result = ev.fid_of_images(images, frames, detector=InceptionDetector(device=device), kid=not args.no_kid,
                                  **common)
        result["images"] = str(args.images)
        return _finish(result, out / "fid.json")
    if args.command == "fid" and args.model is None:
        raise UserInputError("fid needs --model (pipeline folder / Hub id) or --images (.npz, shard or PNG folder)")

    from accelerate import Accelerator

    from pipelines.hub import load_pipeline

    accelerator = Accelerator()
    if args.command == "phema-sweep":
        from pipelines.evaluation.phema_sweep import phema_sweep

        result = phema_sweep(args.run, args.ema_std, frames, out, seeds=args.seeds, num_inference_steps=args.steps,
                             pipeline=load_pipeline(Path(args.run) / "pipeline", device=str(accelerator.device)),
                             export=not args.no_export, accelerator=accelerator, gen_batch_size=args.gen_batch_size,
                             detector=InceptionDetector(device=device) if accelerator.is_main_process else None,
                             kid=not args.no_kid, **common)
        return _finish(result, out / "phema_sweep.json") if accelerator.is_main_process else None
    from pipelines.training.precision import resolve_sampling_precision

    pipeline = load_pipeline(args.model, device=str(accelerator.device))
    sampler = getattr(args, "sampler", None)
    sampler_kwargs = {**args.sampler_kwargs, "precision": resolve_sampling_precision(args.precision, accelerator.device),
                      **({"sampler": sampler} if sampler else {})}
    run_info = {"model": str(args.model)}
    if getattr(args, "guide", None) is not None:
        from pipelines.hub import attach_guide

        attach_guide(pipeline, args.guide, device=str(accelerator.device))
        run_info["guide"] = str(args.guide)
    from pipelines.evaluation.conditioning import with_real_conditions

    pipeline, drawn = with_real_conditions(pipeline, frames, args.subsample_seed)  # conditional models only
    if drawn is not None:
        run_info["conditions"] = drawn
    detector = InceptionDetector(device=device) if accelerator.is_main_process else None
    gen = {"gen_batch_size": args.gen_batch_size, "accelerator": accelerator, "run_info": run_info}

    if args.command == "fid":
        samples = Path(args.samples_dir) if args.samples_dir else out / _samples_name(args.steps, sampler)
        result = ev.fid_of_samples(pipeline, samples, args.seeds or "0-49999", frames, num_inference_steps=args.steps,
                                   detector=detector, kid=not args.no_kid, **gen, **common, **sampler_kwargs)
        path = out / "fid.json"
    elif args.command == "fid-vs-nfe":
        steps = args.steps
        rows = ev.fid_vs_nfe(pipeline, steps, frames, out, seeds=args.seeds, samplers=args.samplers,
                             detector=detector, kid=not args.no_kid, **gen, **common, **sampler_kwargs)
        result = None if rows is None else {"rows": rows, "csv": str(out / "fid_vs_nfe.csv"),
                                            "plot": str(out / "fid_vs_nfe.png"), "table": str(out / "fid_vs_nfe.md"),
                                            "precision": sampler_kwargs["precision"]}
        path = out / "fid_vs_nfe.json"
    elif args.command == "guidance-sweep":
        from pipelines.evaluation.guidance_sweep import guidance_grid, guidance_sweep

        settings = guidance_grid(args.ag_weights, args.dg_weights, args.intervals, args.composed)
        rows = guidance_sweep(pipeline, frames, out, settings, seeds=args.seeds, num_inference_steps=args.steps,
                              samples_root=args.samples_dir,
                              dg_options=args.dg_options, sampler_kwargs=sampler_kwargs, detector=detector,
                              kid=not args.no_kid, **gen, **common)
        result = None if rows is None else {"rows": rows, "table": str(out / "guidance_sweep.md"),
                                            "plot": str(out / "guidance_sweep.png")}
        path = out / "guidance_sweep.json"
    else:
        result = ev.variance_study(pipeline, frames, out, repeats=args.repeats, num_gen=args.num_gen,
                                   num_real=args.num_real, subsample_seed=args.subsample_seed,
                                   num_inference_steps=args.steps, detector=detector, cache_dir=cache_dir,
                                   batch_size=args.batch_size, progress=progress, **gen, **sampler_kwargs)
        path = out / "variance.json"
    if result is not None:
        result["model"] = str(args.model)
    return _finish(result, path) if accelerator.is_main_process else None


def _has_seeds(path: str) -> bool:
    from pipelines.evaluation.generation import SHARD_GLOB

    return Path(path).is_dir() and any(Path(path).glob(SHARD_GLOB))


def _finish(result: dict, path: Path) -> dict:
    from pipelines.utils import atomic_write_json

    atomic_write_json(path, result)
    shown = {k: v for k, v in result.items() if k not in ("reference",)}
    print(json.dumps(shown, indent=2, default=str))
    print(f"results written to {path}")
    return result


if __name__ == "__main__":
    run_cli(main)

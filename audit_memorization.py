"""Memorization / privacy audit of generated frames against the training frames.

    python audit_memorization.py --dataset data/echonet-frames-64 --generated samples/adm_edm_dg \\
        --output_dir results/audit --features pixel inception --filter

For each generated frame: its nearest training frame (pixel correlation and/or Inception cosine), a
threshold at the 95th percentile of held-out real frames' nearest-train similarity, the memorization
rate, the most-matched training videos, closest_pairs.png, summary.json (+ audit_section.md for the
model card) and, with --filter, filtered.npz holding only the generated frames under the threshold.
"""

from pathlib import Path

import numpy as np
import torch

from pipelines.cli import finite_float_arg, make_parser
from pipelines.errors import run_cli
from pipelines.evaluation.feature_cache import ArrayFrames
from pipelines.evaluation.memorization import (
    COMBINE_RULES,
    FEATURE_SPACES,
    FrameSource,
    cached_inception_fn,
    run_memorization_audit,
)
from pipelines.utils import seeded_subset

# Each subset draws from its own stream, np.random.default_rng([seed, key]).
TRAIN_KEY, HELDOUT_KEY, GENERATED_KEY = 0, 1, 2


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="frame dataset folder (build_frame_dataset) or Hub id")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--heldout_splits", nargs="+", default=["validation"],
                        help="real splits never trained on, for the threshold (e.g. validation test)")
    parser.add_argument("--generated", required=True, help="generated samples: shard folder, .npz or PNG folder")
    parser.add_argument("--output_dir", required=True, help="folder for the report")
    parser.add_argument("--features", nargs="+", default=["pixel"], choices=FEATURE_SPACES)
    parser.add_argument("--combine", default="any", choices=COMBINE_RULES,
                        help="with several feature spaces: flag when any / all thresholds are exceeded")
    parser.add_argument("--percentile", type=finite_float_arg, default=95.0)
    parser.add_argument("--filter", action="store_true", help="write filtered.npz (unflagged generated frames)")
    parser.add_argument("--num_pairs", type=int, default=16, help="closest pairs in the PNG grid and JSON")
    parser.add_argument("--max_heldout", type=int, default=None, help="seeded subset of held-out frames")
    parser.add_argument("--max_generated", type=int, default=None, help="seeded subset of generated frames (filtered.npz then holds kept frames of that subset)")
    parser.add_argument("--max_train", type=int, default=None,
                        help="quick tries only: a subset of training frames misses copies of the others")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=None,
                        help="per-frame Inception feature cache (resumable, shared with FID); default OUTPUT_DIR/cache")
    parser.add_argument("--batch_size", type=int, default=64, help="Inception batch size")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from pipelines.data.frame_reader import FrameDataset
    from pipelines.evaluation.generation import load_images

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.generated).exists():
        parser.error(f"--generated '{args.generated}' does not exist (a shard folder, .npz or PNG folder)")
    generated_all, seeds_all = load_images(args.generated, return_seeds=True)
    train_ds = FrameDataset(args.dataset, split=args.train_split, channels=generated_all.shape[1])
    train_idx = seeded_subset(len(train_ds), args.max_train, [args.seed, TRAIN_KEY])
    heldout_parts = []
    for split in args.heldout_splits:
        ds = FrameDataset(args.dataset, split=split, channels=generated_all.shape[1])
        heldout_parts.append(FrameSource(ds, np.arange(len(ds)), split))
    total_heldout = sum(len(p.indices) for p in heldout_parts)
    keep = seeded_subset(total_heldout, args.max_heldout, [args.seed, HELDOUT_KEY])
    offsets = np.cumsum([0] + [len(p.indices) for p in heldout_parts])
    for k, part in enumerate(heldout_parts):  # split the seeded held-out subset back per split
        part.indices = keep[(keep >= offsets[k]) & (keep < offsets[k + 1])] - offsets[k]
    heldout_parts = [p for p in heldout_parts if len(p.indices)]
    gen_idx = seeded_subset(len(generated_all), args.max_generated, [args.seed, GENERATED_KEY])
    generated = generated_all[gen_idx]
    seeds = seeds_all[gen_idx] if seeds_all is not None else None

    train = train_ds.images_uint8(train_idx)
    heldout = np.concatenate([p.dataset.images_uint8(p.indices) for p in heldout_parts])
    video_ids = [str(v) for v in train_ds.column("video_id")[train_idx]]
    print(f"train {len(train)} ({args.train_split}), held-out {len(heldout)} ({' + '.join(args.heldout_splits)}), "
          f"generated {len(generated)} frames of {generated.shape[1:]}")
    inception_fn = None
    if "inception" in args.features:
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.output_dir) / "cache"
        sources = {
            "train": [FrameSource(train_ds, train_idx, args.train_split)],
            "heldout": heldout_parts,
            "generated": [FrameSource(ArrayFrames(generated_all, str(args.generated)), gen_idx, "generated")],
        }
        inception_fn = cached_inception_fn(sources, cache_dir, batch_size=args.batch_size, progress=True)
    metadata = {"dataset": str(args.dataset), "train_split": args.train_split, "heldout_splits": args.heldout_splits,
                "generated": str(args.generated), "max_train": args.max_train, "seed": args.seed}
    summary = run_memorization_audit(
        train, heldout, generated, args.output_dir, train_video_ids=video_ids, feature_spaces=args.features,
        percentile=args.percentile, combine=args.combine, filter_output=args.filter, generated_seeds=seeds,
        num_pairs=args.num_pairs, inception_fn=inception_fn, metadata=metadata,
    )
    print(f"memorization rate: {100 * summary['memorization_rate']:.2f}% "
          f"(held-out real frames: {100 * summary['heldout_flag_rate']['combined']:.2f}%); "
          f"report in {args.output_dir}/summary.json")


if __name__ == "__main__":
    run_cli(main)

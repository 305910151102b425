#!/usr/bin/env python3
"""Build the EchoNet-Dynamic frame dataset (Hugging Face `datasets`, save_to_disk), optionally push it.

    python build_echonet_frames.py --echonet_dir /data/EchoNet-Dynamic --output_dir data/echonet-frames-64 \\
        --resolution 64 --frame_stride 5 --num_workers 2

With the full dataset and the defaults the build prints a total of 358,259 frames (also in
OUTPUT_DIR/build_summary.json). An interrupted build resumes when rerun with the same options.
Pushing (private) needs --push_to_hub USER/NAME --agree_to_research_use_agreement: EchoNet-Dynamic's
research-use agreement forbids redistribution.
"""

from pipelines.cli import finite_float_arg, make_parser
from pipelines.data.frame_builder import (
    DEFAULT_RESIZE_FILTER,
    RESIZE_FILTERS,
    build_frame_dataset,
    push_frame_dataset,
)
from pipelines.errors import run_cli


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--echonet_dir", required=True, help="folder with Videos/, FileList.csv, VolumeTracings.csv")
    parser.add_argument("--output_dir", required=True, help="output folder (save_to_disk layout)")
    parser.add_argument("--resolution", type=int, default=64, help="64 (paper), 112 = native")
    parser.add_argument("--frame_stride", type=int, default=5, help="keep frames whose index mod stride == 0")
    parser.add_argument("--resize_filter", default=DEFAULT_RESIZE_FILTER, choices=sorted(RESIZE_FILTERS))
    parser.add_argument("--splits", nargs="+", default=None, help="subset of train validation test (default all)")
    parser.add_argument("--num_workers", type=int, default=2, help="decoding processes")
    parser.add_argument("--max_videos", type=int, default=None, help="only the first N videos (quick tries)")
    parser.add_argument("--max_bad_fraction", type=finite_float_arg, default=0.01,
                        help="fail when more than this fraction of videos is unusable")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing output folder")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="push to this (private) dataset repo")
    parser.add_argument("--public", action="store_true", help="make the pushed repo public: synthetic frames only "
                        "(EchoNet-derived frames are refused, as is an existing public repo)")
    parser.add_argument("--agree_to_research_use_agreement", action="store_true",
                        help="confirm the push stays within EchoNet-Dynamic's research-use agreement")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.agree_to_research_use_agreement:
        parser.error("--push_to_hub needs --agree_to_research_use_agreement (EchoNet-Dynamic forbids redistribution)")
    dataset = build_frame_dataset(args.echonet_dir, args.output_dir, resolution=args.resolution,
                                  frame_stride=args.frame_stride, resize_filter=args.resize_filter,
                                  splits=args.splits, num_workers=args.num_workers, max_videos=args.max_videos,
                                  overwrite=args.overwrite, max_bad_fraction=args.max_bad_fraction)
    print(f"saved to {args.output_dir}: {dataset}")
    if args.push_to_hub:
        push_frame_dataset(args.output_dir, args.push_to_hub, agree_to_research_use_agreement=True, private=not args.public)
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub} (private={not args.public})")
    return dataset


if __name__ == "__main__":
    run_cli(main)

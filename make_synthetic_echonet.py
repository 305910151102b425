#!/usr/bin/env python3
"""Write a synthetic folder in EchoNet-Dynamic's layout (Videos/*.avi, FileList.csv, VolumeTracings.csv).

    python make_synthetic_echonet.py --output_dir data/synthetic-echonet --num_videos 200 --seed 0
"""

import time

from pipelines.cli import make_parser
from pipelines.data.synthetic_echonet import STYLES, write_synthetic_echonet
from pipelines.errors import run_cli


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--output_dir", required=True, help="output folder")
    parser.add_argument("--num_videos", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parametrisation", default="echonet", choices=sorted(STYLES),
                        help="style family; 'shifted' is a visibly different set (FID checks)")
    parser.add_argument("--min_frames", type=int, default=None, help="override the frame-count range (low)")
    parser.add_argument("--max_frames", type=int, default=None, help="override the frame-count range (high)")
    parser.add_argument("--num_workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing synthetic folder")
    args = parser.parse_args(argv)
    num_frames = None
    if args.min_frames is not None or args.max_frames is not None:
        if args.min_frames is None or args.max_frames is None:
            parser.error("--min_frames and --max_frames go together")
        num_frames = (args.min_frames, args.max_frames)
    start = time.perf_counter()
    out = write_synthetic_echonet(args.output_dir, num_videos=args.num_videos, seed=args.seed,
                                  parametrisation=args.parametrisation, num_workers=args.num_workers,
                                  num_frames=num_frames, overwrite=args.overwrite)
    print(f"wrote {args.num_videos} videos to {out} in {time.perf_counter() - start:.1f} s")
    return out


if __name__ == "__main__":
    run_cli(main)

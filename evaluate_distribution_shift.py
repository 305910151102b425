"""Real-vs-generated classifiers (the paper's Table 2): Linear, ResNet-18 and Aug. ResNet-18.

    python evaluate_distribution_shift.py --dataset data/echonet-frames-64 \\
        --generated Pre-DG=samples/adm_edm --generated Post-DG=samples/adm_edm_dg --output_dir results/table2

Writes table.md / table.csv / results.json, per-epoch tensorboard curves and resumable per-classifier
runs under --output_dir; rerunning the same command skips finished classifiers and resumes interrupted ones.
Validation accuracy 50% = real and generated frames are indistinguishable.
"""

from pathlib import Path

import torch

from pipelines.cli import finite_float_arg, make_parser
from pipelines.errors import UserInputError, run_cli
from pipelines.evaluation.distribution_shift import (
    CLASSIFIER_NAMES,
    AugmentConfig,
    ClassifierConfig,
    run_distribution_shift,
    select_subset,
)


def parse_generated(values: list[str]) -> dict[str, Path]:
    sets: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserInputError(f"--generated {value!r}: expected NAME=PATH, e.g. Pre-DG=samples/pre_dg")
        if name in sets:
            raise UserInputError(f"--generated: the name {name!r} is given twice")
        if not Path(path).exists():
            raise UserInputError(f"--generated {name}: '{path}' does not exist (a shard folder, .npz or PNG folder)")
        sets[name] = Path(path)
    return sets


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="frame dataset folder (build_frame_dataset) or Hub id")
    parser.add_argument("--split", default="train", help="split of the real frames (default train)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="channels of the real frames (default: the dataset's, 1 for echo)")
    parser.add_argument("--generated", action="append", required=True, metavar="NAME=PATH",
                        help="a set of generated samples (table row); repeat for Pre-DG, Post-DG, ...")
    parser.add_argument("--output_dir", required=True, help="output folder (resumable)")
    parser.add_argument("--classifiers", nargs="+", default=list(CLASSIFIER_NAMES), choices=CLASSIFIER_NAMES)
    parser.add_argument("--num_per_class", type=int, default=50_000, help="real and generated frames each "
                                                                           "(default 50000)")
    parser.add_argument("--val_fraction", type=finite_float_arg, default=0.1, help="validation fraction (default 0.1)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=finite_float_arg, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU and GPU)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--max_zoom", type=finite_float_arg, default=AugmentConfig.max_zoom)
    parser.add_argument("--flip_p", type=finite_float_arg, default=AugmentConfig.flip_p)
    parser.add_argument("--max_rotation", type=finite_float_arg, default=AugmentConfig.max_rotation_deg, help="degrees")
    parser.add_argument("--no_tensorboard", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    from pipelines.data.frame_reader import FrameDataset
    from pipelines.evaluation.generation import load_images

    if args.threads:
        torch.set_num_threads(args.threads)
    generated_paths = parse_generated(args.generated)
    if args.num_per_class < 2:
        parser.error(f"--num_per_class must be >= 2, got {args.num_per_class}")
    config = ClassifierConfig(
        epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed, bf16=args.bf16,
        device=args.device,
        augment=AugmentConfig(max_zoom=args.max_zoom, flip_p=args.flip_p, max_rotation_deg=args.max_rotation),
    )
    dataset = FrameDataset(args.dataset, split=args.split, channels=args.channels)
    real = dataset.images_uint8(select_subset(len(dataset), args.num_per_class, args.seed, 0))
    print(f"real: {len(real)} frames of {real.shape[1:]} from {args.dataset} ({args.split})")
    sets = {name: (lambda path=path: load_images(path)) for name, path in generated_paths.items()}
    run_distribution_shift(real, sets, args.output_dir, classifiers=args.classifiers, config=config,
                           num_per_class=args.num_per_class, val_fraction=args.val_fraction,
                           tensorboard=not args.no_tensorboard)
    print((Path(args.output_dir) / "table.md").read_text())


if __name__ == "__main__":
    run_cli(main)

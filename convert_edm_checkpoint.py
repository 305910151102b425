"""Convert an NVlabs EDM network (SongUNet = DDPM++/NCSN++, DhariwalUNet = ADM) into an EchoDiff model folder.

Examples:
  python convert_edm_checkpoint.py edm_net.pt out/ddpmpp-converted
  python convert_edm_checkpoint.py network-snapshot-010000.pkl out/adm --arch adm

The name table and its rules are in docs/edm_checkpoint_mapping.md.
"""

import argparse
import json
import logging

from pipelines.cli import make_parser
from pipelines.convert_edm import convert_edm_checkpoint
from pipelines.errors import run_cli
from pipelines.networks import ARCHITECTURES


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (VALUE as JSON), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as embedding_type=fourier


def main(argv=None) -> None:
    parser = make_parser(
        __doc__,
        epilog="An EDM .pkl carries its classes' source code, which plain unpickling would run: it is read here as "
               "data (EDM's persistence records and tensors only; any other global is refused by name), so no EDM "
               "checkout is needed and nothing in the file runs. .pt files are read with torch.load(weights_only=True).",
    )
    parser.add_argument("checkpoint", help="EDM network: state_dict .pt/.pth, .safetensors, or network-snapshot-*.pkl")
    parser.add_argument("out_dir", help="output folder for the diffusers model (config.json + safetensors)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None,
                        help="expected architecture (checked against the tensors; inferred when omitted)")
    parser.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="config field not stored in the weights, e.g. dropout=0.05 or channels_per_head=64")
    parser.add_argument("--drop_augment", action="store_true",
                        help="drop EDM's map_augment.weight (augmentation conditioning) instead of refusing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = convert_edm_checkpoint(args.checkpoint, args.out_dir, arch=args.arch, drop_augment=args.drop_augment,
                                   **dict(args.overrides))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} -> {args.out_dir}: {type(model).__name__}, {n_params:,} parameters")


if __name__ == "__main__":
    run_cli(main)

"""EchoDiff Quick start: the whole job on a built-in synthetic EchoNet-layout dataset (~10 min on 2 CPU cores).

    python demo.py                      # results in results/demo/ (re-running reuses finished stages)
    python demo.py --tiny --output_dir results/demo-tiny   # a seconds-long smoke run
    python demo.py --autoguidance       # then: a smaller guide (1/4 of the images) and unguided vs autoguidance

Generates a synthetic EchoNet-Dynamic-layout folder, builds 64x64 frames, trains a small DDPM++ under
EDM, samples it and its untrained initialisation, scores both with FID and KID against the real
frames, computes the Optimal FID of the real frames, and leaves the sample grid, metrics JSON, loss
curve and the saved pipeline with its model card. See pipelines/demo.py.
"""

from pipelines.cli import finite_float_arg, make_parser
from pipelines.demo import DemoConfig, run_demo, tiny_demo_config
from pipelines.errors import run_cli


def main(argv=None):
    d = DemoConfig()
    p = make_parser(__doc__)
    p.add_argument("--output_dir", default=d.out_dir, help="results folder")
    p.add_argument("--tiny", action="store_true", help="16 px, a tiny network, a few images (a smoke test)")
    p.add_argument("--duration_kimg", type=finite_float_arg, default=None, help=f"training length (default {d.duration_kimg})")
    p.add_argument("--num_generated", type=int, default=None,
                   help=f"images scored per model (default {d.num_generated})")
    p.add_argument("--steps", type=int, default=None, help=f"Heun sampler steps (default {d.sampler_steps})")
    p.add_argument("--num_videos", type=int, default=None, help=f"synthetic videos (default {d.num_videos})")
    p.add_argument("--autoguidance", action="store_true",
                   help=f"also train a guide ({d.guide_fraction:g} of the images, model_channels "
                        f"{d.guide_network_overrides['model_channels']}) and score autoguidance at w = "
                        f"{', '.join(f'{w:g}' for w in d.ag_weights)} (about 5 more minutes)")
    p.add_argument("--no_progress_bar", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    changes = {k: v for k, v in {"duration_kimg": args.duration_kimg, "num_generated": args.num_generated,
                                 "sampler_steps": args.steps, "num_videos": args.num_videos}.items() if v is not None}
    changes["progress"] = not args.no_progress_bar
    changes["autoguidance"] = args.autoguidance
    cfg = tiny_demo_config(args.output_dir, **changes) if args.tiny else DemoConfig(out_dir=args.output_dir, **changes)
    return run_demo(cfg)


if __name__ == "__main__":
    run_cli(main)

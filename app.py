"""EchoDiff sampling app (Gradio; also the app file of a Hugging Face Space).

    python app.py                                   # serves results/demo/pipeline (the Quick start's) on localhost:7860
    python app.py --model runs/adm-edm/pipeline --port 7861
    python app.py --model user/echodiff-adm-edm --revision <commit> --trust_remote_code --lock_model   # as a Space

A Space runs it with no flags: ECHODIFF_MODEL, ECHODIFF_REVISION, ECHODIFF_TRUST_REMOTE_CODE and
ECHODIFF_LOCK_MODEL stand in (model_cards/space_card.md is the Space's README).

A browser page to sample a saved pipeline: seeds, steps, churn, Discriminator Guidance when the pipeline has
a discriminator; downloads the PNGs and a uint8 NPZ. See pipelines/app.py.
"""

import os

from pipelines.app import DEFAULT_MODEL, MAX_IMAGES, MAX_STEPS
from pipelines.cli import make_parser
from pipelines.errors import run_cli


def _env_flag(name: str) -> bool:
    """A Space passes no flags: its settings' variables stand in for them."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model", default=os.environ.get("ECHODIFF_MODEL", DEFAULT_MODEL),
                   help=f"saved pipeline folder or Hub id (default: $ECHODIFF_MODEL or {DEFAULT_MODEL})")
    p.add_argument("--revision", default=os.environ.get("ECHODIFF_REVISION"),
                   help="Hub revision to pin (commit, tag or branch; default: $ECHODIFF_REVISION)")
    p.add_argument("--trust_remote_code", action="store_true", default=_env_flag("ECHODIFF_TRUST_REMOTE_CODE"),
                   help="run the --model Hub repository's pipeline code (read it first); local folders are trusted "
                        "(default: $ECHODIFF_TRUST_REMOTE_CODE=1)")
    p.add_argument("--lock_model", action="store_true", default=_env_flag("ECHODIFF_LOCK_MODEL"),
                   help="hide the model box: visitors of a public server cannot make it load other code "
                        "(default: $ECHODIFF_LOCK_MODEL=1)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1; a Space sets 0.0.0.0)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port")
    p.add_argument("--output_dir", default=None, help="where generated files are kept (default: a temp folder)")
    p.add_argument("--max_images", type=int, default=MAX_IMAGES, help="most images one request may ask for")
    p.add_argument("--max_steps", type=int, default=MAX_STEPS, help="most sampler steps one request may ask for")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from pipelines.app import build_app, launch_app

    blocks = build_app(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code,
                       device=args.device, lock_model=args.lock_model, out_root=args.output_dir,
                       max_images=args.max_images, max_steps=args.max_steps)
    launch_app(blocks, host=args.host, port=args.port)


if __name__ == "__main__":
    run_cli(main)

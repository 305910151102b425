"""Train an unconditional EchoDiff model: any of ADM / DDPM++ / NCSN++ x EDM / VP / VE (paper Table 1).

    accelerate launch --config_file accelerate_configs/8gpu_a40.yaml train_unconditional.py \\
        --dataset data/echonet_frames_64 --arch adm --precond edm --output_dir runs/adm-edm

Defaults are the paper's setup on EDM's training loop (global batch 512, dropout 0.05, no
augmentation, Adam lr 1e-3 with a 10 Mimg warm-up, EMA half-life 500 kimg with ramp-up 0.05,
duration from Table 1). The run resumes with ``--resume_from_checkpoint latest`` and ends with a
``DiffusionPipeline`` folder (EMA weights) in ``<output_dir>/pipeline``. See docs/training.md.
"""

import logging

from pipelines.errors import run_cli
from pipelines.training import TrainConfig, train
from pipelines.training.config import config_from_cli_args


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of these flags (one flag per field of ``pipelines.training.TrainConfig``)."""
    return config_from_cli_args(argv, description=__doc__)


def configure_logging() -> None:
    """As diffusers' training scripts do: timestamped records; EchoDiff's at INFO, the libraries' warnings only."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.WARNING)
    logging.getLogger("pipelines").setLevel(logging.INFO)


def main(argv: list[str] | None = None):
    configure_logging()
    return train(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)

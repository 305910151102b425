"""Training of the diffusion models (EDM's loop on accelerate) and of the DG discriminator.

``train(TrainConfig(dataset=..., output_dir=...))`` is what ``train_unconditional.py`` runs. Modules:
``config`` (the settings, declared once; the CLI derives from them), ``precision``, ``data_order``,
``step`` (one optimiser step), ``stats``, ``checkpoints`` (the atomic scheme of every training loop),
``export`` (sample grids, EMA pipelines, model card), ``loop`` (``train``), ``discriminator`` (DG).
"""

from pipelines.training.config import ConfigError, TrainConfig, validate_config
from pipelines.training.loop import TrainResult, train
from pipelines.training.precision import resolve_mixed_precision

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "resolve_mixed_precision", "train", "validate_config"]

"""Training compressors: regeneration pretraining and QA fine-tuning (see :mod:`.trainer`)."""

from .trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]

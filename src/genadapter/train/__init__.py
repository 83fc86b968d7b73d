"""Training recipes: self-supervised pretraining and instruction tuning of the adapter generator."""

from .config import TrainConfig

__all__ = ["TrainConfig"]

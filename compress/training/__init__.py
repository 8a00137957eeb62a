"""The one training loop, shared by fine-tuning and distillation."""

from compress.training.loop import TrainingFields, TrainResult, train

__all__ = ["TrainingFields", "TrainResult", "train"]

"""Evaluation: size, speed and accuracy of a model. Reads bundles, never changes them."""

from compress.evaluate.accuracy import evaluate_accuracy, macro_f1
from compress.evaluate.size import count_parameters, measure_size
from compress.evaluate.speed import measure_speed

__all__ = ["count_parameters", "evaluate_accuracy", "macro_f1", "measure_size", "measure_speed"]

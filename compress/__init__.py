"""compress: prune -> recover -> quantize -> report -> publish Hugging Face models, from one recipe."""

from compress.bundle import ModelBundle
from compress.errors import CompressError, DataError, ModelError, RecipeError, StageError
from compress.recipe import DataSpec, EvalSpec, ModelSpec, Recipe, load_recipe
from compress.registry import StageConfig, register_stage
from compress.report.schema import Report
from compress.runner import run
from compress.stages import Finetune

__version__ = "0.1.0"

__all__ = [
    "CompressError", "DataError", "DataSpec", "EvalSpec", "Finetune", "ModelBundle", "ModelError", "ModelSpec",
    "Recipe", "RecipeError", "Report", "StageConfig", "StageError", "load_recipe", "register_stage", "run",
]

"""compress: prune -> recover -> quantize -> report -> publish Hugging Face models, from one recipe.

The public names load on first use (PEP 562), so importing one submodule (`compress.specs`,
`compress.data`) does not import every stage, and each module's own imports are what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
# The name pip knows this project by (pyproject's [project] name). The PyPI package named
# `compress` is an unrelated project, so install lines must use this name.
DISTRIBUTION = "compress-hf"

_PUBLIC = {
    "ModelBundle": "compress.bundle",
    "CompressError": "compress.errors", "DataError": "compress.errors", "ModelError": "compress.errors",
    "RecipeError": "compress.errors", "StageError": "compress.errors",
    "DataSpec": "compress.specs", "EvalSpec": "compress.specs", "ModelSpec": "compress.specs",
    "Recipe": "compress.recipe", "load_recipe": "compress.recipe",
    "StageConfig": "compress.registry", "StageResult": "compress.registry", "register_stage": "compress.registry",
    "Report": "compress.report.schema",
    "run": "compress.runner",
    "Finetune": "compress.stages",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])

"""Small helpers on transformers configs and dtypes, shared by loading, planning, pre-flight checks,
quantization and distillation (each once had its own copy)."""

from __future__ import annotations

import copy
from typing import Any

import torch

# The dtypes a recipe may name (model.dtype, compute_dtype), by name.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def derived_config(config: Any, changes: dict[str, Any]) -> Any:
    """A copy of `config` with `changes` applied; the original is untouched. A new layer count also
    resizes per-layer lists (`layer_types`, e.g. Gemma's sliding/full attention pattern)."""
    config = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(config, key, value)
    layers = changes.get("num_hidden_layers")
    if layers is not None and isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = (config.layer_types * layers)[:layers]
    return config

"""Which linear layers a prune or low-rank stage touches, chosen by regular expressions on names."""

from __future__ import annotations

import re
from typing import Any

import torch

# Output heads and embeddings are tiny next to the blocks but decide every prediction; pruning or
# factorising them costs far more accuracy than it saves, so they are left alone unless asked for.
DEFAULT_EXCLUDE = [r"(^|\.)lm_head$", r"(^|\.)classifier(\.|$)", r"(^|\.)score$", r"embed"]


def is_conv1d(module: Any) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer whose weight is stored as (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _float_linear(module: Any) -> bool:
    # nn.Linear or a subclass that only changes forward (Falcon's FalconLinear); not bitsandbytes'
    # subclasses, whose packed weights (Params4bit, Int8Params) cannot be masked or factorised.
    return (isinstance(module, torch.nn.Linear) and type(module.weight) is torch.nn.Parameter
            and module.weight.is_floating_point())


def select_linears(model: Any, include: list[str] | None, exclude: list[str] | None,
                   conv1d: bool = False) -> dict[str, torch.nn.Module]:
    """`{module name: layer}` whose name matches an `include` pattern (all if None) and no `exclude`.

    Float linear layers, and with `conv1d` also Conv1D layers (for callers that handle their
    transposed weight)."""
    inc = [re.compile(p) for p in include] if include else None
    exc = [re.compile(p) for p in (DEFAULT_EXCLUDE if exclude is None else exclude)]
    out = {}
    for name, module in model.named_modules():
        if not (_float_linear(module) or (conv1d and is_conv1d(module))):
            continue
        if inc is not None and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        out[name] = module
    return out


def oriented(module: Any) -> torch.Tensor:
    """The layer's weight as (out, in), a view: Conv1D's is stored transposed."""
    return module.weight.T if is_conv1d(module) else module.weight


def in_features(module: Any) -> int:
    return oriented(module).shape[1]


def bad_patterns(patterns: list[str] | None) -> list[str]:
    """Patterns that are not valid regular expressions, with the reason."""
    problems = []
    for p in patterns or []:
        try:
            re.compile(p)
        except re.error as exc:
            problems.append(f"{p!r} ({exc})")
    return problems


def pattern_value(name: str, overrides: dict[str, float] | None, default: float) -> float:
    """The first override whose pattern matches `name`, else `default` (per-layer sparsity)."""
    for pattern, value in (overrides or {}).items():
        if re.search(pattern, name):
            return value
    return default

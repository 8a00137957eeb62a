"""Which linear layers a prune or low-rank stage touches, chosen by regular expressions on names."""

from __future__ import annotations

import re
from typing import Any

import torch

# Output heads and embeddings are tiny next to the blocks but decide every prediction; pruning or
# factorising them costs far more accuracy than it saves, so they are left alone unless asked for.
DEFAULT_EXCLUDE = [r"(^|\.)lm_head$", r"(^|\.)classifier(\.|$)", r"(^|\.)score$", r"embed"]


def select_linears(model: Any, include: list[str] | None,
                   exclude: list[str] | None) -> dict[str, torch.nn.Linear]:
    """`{module name: Linear}` whose name matches an `include` pattern (all if None) and no `exclude`."""
    inc = [re.compile(p) for p in include] if include else None
    exc = [re.compile(p) for p in (DEFAULT_EXCLUDE if exclude is None else exclude)]
    out = {}
    for name, module in model.named_modules():
        # Exactly Linear: quantized subclasses (bitsandbytes) store packed weights that cannot be
        # masked or factorised, and a factorised layer's halves are already low-rank.
        if type(module) is not torch.nn.Linear:
            continue
        if inc is not None and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        out[name] = module
    return out


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

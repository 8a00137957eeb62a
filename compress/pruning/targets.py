"""Which linear layers a prune or low-rank stage touches (names chosen by compress.layers' one rule)."""

from __future__ import annotations

from typing import Any

import torch

from compress.layers import is_default_ignored, matches_any, output_heads


def is_conv1d(module: Any) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer whose weight is stored as (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _float_linear(module: Any) -> bool:
    # nn.Linear or a subclass that only changes forward (Falcon's FalconLinear); not bitsandbytes'
    # subclasses, whose packed weights (Params4bit, Int8Params) cannot be masked or factorised.
    return (isinstance(module, torch.nn.Linear) and type(module.weight) is torch.nn.Parameter
            and module.weight.is_floating_point())


def select_linears(model: Any, targets: list[str] | None, ignore: list[str] | None,
                   conv1d: bool = False) -> dict[str, torch.nn.Module]:
    """`{module name: layer}` matched by a `targets` pattern (all if None) and by no `ignore` pattern
    (the one selector's rule: compress.layers).

    Output heads and embedding-side layers are tiny next to the blocks but decide every prediction,
    so they are skipped unless `targets` names them. Float linear layers, and with `conv1d` also
    Conv1D layers (for callers that handle their transposed weight)."""
    heads = output_heads(model)
    out = {}
    for name, module in model.named_modules():
        if not (_float_linear(module) or (conv1d and is_conv1d(module))):
            continue
        if targets is not None and not matches_any(name, targets):
            continue
        if targets is None and is_default_ignored(name, heads):
            continue
        if matches_any(name, ignore):
            continue
        out[name] = module
    return out


def oriented(module: Any) -> torch.Tensor:
    """The layer's weight as (out, in), a view: Conv1D's is stored transposed."""
    return module.weight.T if is_conv1d(module) else module.weight


def in_features(module: Any) -> int:
    return oriented(module).shape[1]

"""Which layers a quantize stage touches: name patterns, module types, the output head, embeddings.

Patterns follow the one selector's rule (compress.layers): a pattern matches a whole trailing run of
dotted name parts, so `query` matches `bert.encoder.layer.0.attention.self.query` and `layer\\.0\\..*`
everything in layer 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compress.layers import bad_patterns, matches, output_heads

__all__ = ["bad_patterns", "head_names", "matches", "select_layers", "unmatched_patterns"]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


_BEHAVES_LINEAR: dict[type, bool] = {}


def behaves_linear(cls: type) -> bool:
    """Whether an nn.Linear subclass computes exactly x @ W.T + b (Falcon's FalconLinear does, written
    as a matmul). Tried once per class on a small CPU instance, so quantized subclasses (bitsandbytes,
    whose weights are not float) and layers with their own maths are told apart by behaviour, not
    by a list of names that goes stale."""
    if cls is nn.Linear:
        return True
    if not issubclass(cls, nn.Linear):
        return False
    if cls not in _BEHAVES_LINEAR:
        answer = _probe_linear(cls)
        if answer is None:  # could not run here (e.g. inside transformers' meta-device init): ask again later
            return False
        _BEHAVES_LINEAR[cls] = answer
    return _BEHAVES_LINEAR[cls]


def _probe_linear(cls: type) -> bool | None:
    try:
        with torch.no_grad(), torch.device("cpu"):
            layer = cls(8, 4, bias=True, device="cpu")
            if layer.weight.is_meta:
                return None
            if not layer.weight.is_floating_point():
                return False
            x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
            return bool(torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6))
    except Exception:  # noqa: BLE001 - another constructor signature or forward: not a plain linear
        return False


def linear_kind(module: nn.Module) -> str | None:
    """"linear" for a layer computing x @ W.T + b with W (out, in); "conv1d" for GPT-2's Conv1D, the
    same map with the weight stored transposed (in, out); None for anything else (quantized layers too)."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Linear) and behaves_linear(type(module)):
        return "linear"
    return None


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear or Conv1D layer."""
    if linear_kind(module) == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float weight as (out, in), whichever way the layer stores it."""
    w = module.weight.detach()
    return w.t() if linear_kind(module) == "conv1d" else w


def as_linear(module: nn.Module) -> nn.Linear:
    """A plain nn.Linear with the same map (the layer itself when it already is one): lets every
    scheme and the SVD treat Conv1D and linear subclasses as the one thing they are."""
    if type(module) is nn.Linear:
        return module
    n_in, n_out = in_out(module)
    w = dense_weight(module)
    linear = nn.Linear(n_in, n_out, bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach())
    return linear


def class_names(module: nn.Module) -> set[str]:
    names = {cls.__name__ for cls in type(module).__mro__}
    # Conv1D is a linear map with a transposed weight: module_types "Linear" covers it.
    return names | {"Linear"} if linear_kind(module) == "conv1d" else names


def head_names(model: nn.Module) -> set[str]:
    """The output head(s) that are linear layers (compress.layers.output_heads)."""
    return {h for h in output_heads(model) if linear_kind(model.get_submodule(h)) is not None}


@dataclass
class Selection:
    linear: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    # Embeddings a quantized table cannot stand in for (name -> why), left in float.
    embeddings_kept: dict[str, str] = field(default_factory=dict)


def select_layers(model: nn.Module, include: list[str] | None, exclude: list[str], module_types: list[str],
                  quantize_head: bool, embeddings: bool, skip_types: tuple[type, ...] = ()) -> Selection:
    """Linear layers (and embeddings, if asked) to quantize, in model order."""
    heads = head_names(model)
    sel = Selection()
    for name, mod in model.named_modules():
        if not name or isinstance(mod, skip_types):
            continue
        if any(matches(name, p) for p in exclude):
            continue
        if isinstance(mod, nn.Embedding):
            if embeddings and (include is None or any(matches(name, p) for p in include)):
                from compress.quant.embedding import embedding_problem

                why = embedding_problem(mod)
                if why is None:
                    sel.embeddings.append(name)
                else:
                    sel.embeddings_kept[name] = why
            continue
        if linear_kind(mod) is None or not (class_names(mod) & set(module_types)):
            continue
        if include is not None and not any(matches(name, p) for p in include):
            continue
        if name in heads and not quantize_head:
            sel.skipped_head.append(name)
            continue
        sel.linear.append(name)
    return sel


def unmatched_patterns(model: nn.Module, patterns: list[str]) -> list[str]:
    from compress.layers import unmatched_patterns as unmatched

    return unmatched([n for n, _ in model.named_modules() if n], patterns)

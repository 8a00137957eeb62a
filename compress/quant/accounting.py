"""Size accounting of quantized layers: stored bytes, true bits per weight, and the format's limit.

"Stored bytes" are the layer's saved tensors except the bias: codes plus every scale, zero point,
absmax, code book and packed quant-state, so small layers pay their fixed overheads honestly.
"Limit" is what the format would cost on an infinitely large layer (e.g. NF4 with double quant:
4 + 8/64 + 32/(64*256) = 4.127 bits, 7.75x smaller than fp32).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.quant import dynamic, embedding, weight_only  # noqa: F401  (register their layer kinds)
from compress.quant.bnb_weights import is_cpu_packed
from compress.quant.kinds import is_own_layer, own_layer_types


def _bnb_types() -> tuple[type, ...]:
    try:
        from compress.quant.bnb import bnb_layer_types

        return bnb_layer_types()
    except ImportError:
        return ()


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    types = own_layer_types() + _bnb_types()
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, types)}


def _stored_bytes(module: nn.Module) -> int:
    total = 0
    for key, value in module.state_dict().items():
        if key == "bias" or key.endswith(".bias") or not isinstance(value, torch.Tensor):
            continue
        total += value.numel() * value.element_size()
    return total


def _describe_bnb(module: nn.Module) -> tuple[str, int, int, float]:
    """(kind, in, out, limit bits) of a bitsandbytes layer."""
    import bitsandbytes as bnb

    out_f, in_f = module.out_features, module.in_features
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "bnb-int8", in_f, out_f, 8 + 32 / in_f  # one fp32 row scale (SCB) per output row
    state = module.weight.quant_state
    block = state.blocksize
    # A weight repacked for AVX512-BF16 CPUs (see bnb_weights) has its statistics flattened in memory;
    # what it stores and saves is still the original, double-quantized layout (256-value blocks).
    nested = state.original_nested if is_cpu_packed(module.weight) else state.nested
    if nested:
        limit = 4 + 8 / block + 32 / (block * getattr(getattr(state, "state2", None), "blocksize", 256))
    else:
        limit = 4 + 32 / block
    return f"bnb-{state.quant_type}", in_f, out_f, limit


def describe_layer(name: str, module: nn.Module) -> dict[str, Any]:
    """One quantized layer: weights, stored bytes, bits per weight, compression vs fp32 and its limit."""
    if is_own_layer(module):
        rows, cols, kind, limit = module.size_facts()
    else:
        kind, cols, rows, limit = _describe_bnb(module)
    weights = rows * cols
    stored = _stored_bytes(module)
    bits = 8 * stored / weights
    return {"layer": name, "kind": kind, "shape": [rows, cols], "weights": weights, "bytes": stored,
            "fp32_bytes": 4 * weights, "bits_per_weight": round(bits, 4),
            "compression": round(32 / bits, 3), "limit_bits_per_weight": round(limit, 4),
            "limit_compression": round(32 / limit, 3)}


def size_summary(model: nn.Module) -> dict[str, Any]:
    """Per-layer rows plus totals over the quantized layers and their share of the whole model."""
    layers = [describe_layer(n, m) for n, m in quantized_modules(model).items()]
    weights = sum(r["weights"] for r in layers)
    stored = sum(r["bytes"] for r in layers)
    limit_bits = sum(r["limit_bits_per_weight"] * r["weights"] for r in layers) / weights if weights else None
    quantized_ids = {id(p) for m in quantized_modules(model).values() for p in m.parameters()}
    float_weights = sum(p.numel() for p in model.parameters()
                        if id(p) not in quantized_ids and p.is_floating_point())
    summary: dict[str, Any] = {
        "quantized_layers": len(layers),
        "quantized_weights": weights,
        "float_weights_left": float_weights,
        "quantized_share": round(weights / (weights + float_weights), 4) if weights else 0.0,
        "quantized_bytes": stored,
        "quantized_bits_per_weight": round(8 * stored / weights, 4) if weights else None,
        "quantized_compression": round(4 * weights / stored, 3) if stored else None,
        "limit_bits_per_weight": round(limit_bits, 4) if limit_bits else None,
        "limit_compression": round(32 / limit_bits, 3) if limit_bits else None,
    }
    return {"summary": summary, "layers": layers}

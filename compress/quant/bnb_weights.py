"""Read the float weight back out of a bitsandbytes layer, whatever layout it is in right now.

Why this exists: on CPUs with AVX512-BF16 (AMD Zen 4 EPYC, Intel Sapphire Rapids and newer),
bitsandbytes >= 0.49 repacks a `Linear4bit` weight the first time the layer runs in eval mode
without gradients: `[N*K/2, 1]` uint8 becomes a `[N, K/2]` tile layout, the absmax turns bf16 and
the double-quantized statistics are flattened (`packing_format_for_cpu`). peft's
`dequantize_bnb_weight` and `bnb.functional.dequantize_4bit` then read the tiles as if they were
the canonical layout and return garbage (relative error 1.4 against the dense weight, where nf4's
own error is 0.09). bitsandbytes undoes the repacking only when it saves a state dict, so every
dequantization in compress goes through here: the repacking is undone on a *copy* with
bitsandbytes' own inverse.

The repacking is also lossy (bf16 absmax; the inverse re-quantizes the statistics), so a layer that
ran once and was then saved no longer holds the weights it was evaluated with, and the same recipe
gives different numbers on Intel and AMD machines. Models compress holds are therefore pinned to
the canonical layout (`keep_canonical_layout`); measured on MiniLM-sized nf4 layers on this 2-core
AMD EPYC, the packed kernel was no faster at batch 32 (65-72 ms either way). Published checkpoints
are canonical either way, and plain transformers may repack them on load as it likes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def is_cpu_packed(weight: Any) -> bool:
    """True when bitsandbytes has repacked this 4-bit weight into its AVX512-BF16 CPU layout."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def canonical_4bit(weight: Any) -> tuple[torch.Tensor, Any]:
    """(packed data, quant state) of a `Params4bit` in bitsandbytes' canonical layout; a copy when
    the weight is in the CPU tile layout, the weight's own tensors otherwise."""
    state = weight.quant_state
    if not is_cpu_packed(weight):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    # The inverse rewrites the state it is given in place; work on copies.
    return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))


def dequantize_weight(module: Any) -> torch.Tensor:
    """The float weight `[out, in]` a bitsandbytes `Linear4bit`/`Linear8bitLt` (or plain layer) holds."""
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit) or getattr(weight, "quant_state", None) is not None:
        data, state = canonical_4bit(weight)
        return bnb.functional.dequantize_4bit(data, state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, getattr(module, "state", None))
    return weight.detach()


def dequantize_tensor(tensor: Any) -> torch.Tensor:
    """Dequantize a bare `Params4bit` (no module at hand), layout-aware like `dequantize_weight`."""
    import bitsandbytes as bnb

    data, state = canonical_4bit(tensor)
    return bnb.functional.dequantize_4bit(data, state)


def keep_canonical_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking the 4-bit layers of `model` on this CPU (undoing any repacking
    already done), so every machine computes and saves the same weights. Returns the layers pinned."""
    count = 0
    unpack_cpu_layout(model)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def unpack_cpu_layout(model: Any) -> int:
    """Put every repacked 4-bit weight of `model` back into the canonical layout, in place (what
    bitsandbytes itself does before saving), so code that reads `weight.data` directly — peft's own
    merges — sees the layout it expects. The layer repacks again on its next eval-mode forward.
    Returns how many layers were unpacked."""
    count = 0
    for module in model.modules():
        # The registered parameter, not `module.weight`: on compress's own quantized layers that is a
        # property that dequantizes the whole weight.
        weight = module._parameters.get("weight")
        if weight is not None and is_cpu_packed(weight):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = weight.quant_state
            count += 1
    return count


def pack_like_avx512_cpu(module: Any) -> None:
    """Repack a `Linear4bit` the way bitsandbytes does on AVX512-BF16 CPUs, on any CPU: lets tests
    cover that layout on machines whose CPU would never produce it."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    weight = module.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = weight.quant_state

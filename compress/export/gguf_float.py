"""A plain float Hugging Face folder of a compress model, for converters that read only plain folders.

llama.cpp's `convert_hf_to_gguf.py` maps Hugging Face tensor names; compress's own layers store
other tensors (`qweight`/`scales`/`zeros` for int8-dynamic and weight-only int8/int4, `first`/`second`
for low-rank factors) and it stops at them (`Can not map tensor '...qweight'`). So the exporter
first writes the model as plain float weights: each compress layer becomes the dense matrix it
multiplies by (codes x scales, or second @ first), everything else is copied, and the result is
loaded into a fresh model of the plain architecture (strict: every tensor accounted for) and saved
with `save_pretrained`, so the folder is exactly what transformers itself would write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import StageError

# Bundle formats whose weights can be written as plain float tensors, and the fix for the others.
DENSE_FORMATS = ("hf", "quantized", "lowrank")


def format_problem(bundle_format: str) -> str | None:
    """None when a bundle of this format can be written as a plain float folder, else the reason."""
    if bundle_format in DENSE_FORMATS:
        return None
    if bundle_format == "peft-adapter":
        return ("the model is a base with an unmerged adapter (finetune merge: none); set the finetune stage's "
                "merge to full (or export before it)")
    return (f"the model's format is {bundle_format!r}, which compress cannot write as plain float weights; "
            f"export before that stage, or quantize with compress's own schemes (int8-weight, int4-weight, gptq)")


def dense_layers(model: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], dict[str, int]]:
    """{layer name: (dense float weight, bias)} for every compress layer in `model`, and how many of
    each kind. A tied quantized head is left out: the plain model ties it to its embedding again."""
    from compress.quant.embedding import TiedQuantHead
    from compress.quant.kinds import is_own_layer
    from compress.stages.lowrank import LowRankLinear

    dense: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    kinds: dict[str, int] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if any(name.startswith(f"{done}.") for done in dense):
                continue  # inside a low-rank pair already multiplied back (its factors may be quantized)
            if isinstance(module, LowRankLinear):
                # second(first(x)) = x @ (second.W @ first.W)^T + second.b, so the product is exact math.
                weight = module.second.weight.float() @ module.first.weight.float()
                bias = module.second.bias
            elif isinstance(module, TiedQuantHead):
                kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
                continue
            elif is_own_layer(module):
                # `.weight` is the matrix the layer multiplies by (codes x scales, smoothing undone).
                weight, bias = module.weight, getattr(module, "bias", None)
            else:
                continue
            kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
            dense[name] = (weight.detach().float().cpu().contiguous(),
                           None if bias is None else bias.detach().float().cpu().contiguous())
    return dense, kinds


def float_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """`model`'s state dict with every compress layer replaced by `<name>.weight` (and `.bias`)."""
    dense, kinds = dense_layers(model)
    prefixes = tuple(f"{name}." for name in dense)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, (weight, bias) in dense.items():
        state[f"{name}.weight"] = weight
        if bias is not None:
            state[f"{name}.bias"] = bias
    return state, kinds


def write_float_folder(bundle: Any, folder: Path, dtype: torch.dtype = torch.float32) -> str | None:
    """Write `bundle` as a plain float HF folder (weights, config, tokenizer) into `folder`.

    Returns None when the model had no compress layers (its weights are copied as they are), else a
    sentence saying what was dequantized or multiplied back (for the facts)."""
    from compress.bundle import auto_class

    why = format_problem(bundle.format)
    if why:
        raise StageError(f"gguf export: {why}")
    model = bundle.model
    state, kinds = float_state_dict(model)
    plain = auto_class(bundle.task).from_config(model.config, dtype=dtype)
    expected = set(plain.state_dict())
    tied = {k for k in expected - set(state) if _is_tied(plain, k)}
    missing = sorted(expected - set(state) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise StageError(f"gguf export: the float weights do not fit {type(plain).__name__} (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); this model's layers cannot be written as "
                         f"a plain folder")
    plain.load_state_dict({k: v.to(dtype) for k, v in state.items() if k in expected}, strict=False)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    del plain
    if not kinds:
        return None
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return (f"dequantized for llama.cpp's converter: compress's own layers ({counts}) were written as the float "
            f"matrices they multiply by (codes x scales; low-rank factors multiplied back), then converted")


def _is_tied(model: nn.Module, key: str) -> bool:
    """True when `key` shares its storage with another tensor of `model` (a tied weight)."""
    tensors = dict(model.state_dict(keep_vars=True))
    target = tensors[key]
    return any(other is not target and other.data_ptr() == target.data_ptr() for name, other in tensors.items()
               if name != key)

"""bitsandbytes LLM.int8 / NF4 / FP4 through transformers' own integration.

Going through `from_pretrained(quantization_config=BitsAndBytesConfig(...))` (from a scratch copy
of the in-memory model) means the result is a standard transformers bnb checkpoint: it saves
with `save_pretrained` and reloads with plain `from_pretrained`, on CPU as on GPU.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.quant.bnb_weights import keep_canonical_layout

BNB_SCHEMES = ("int8", "nf4", "fp4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bnb_layer_types() -> tuple[type, ...]:
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def probe(linear: nn.Linear, scheme: str, device: str, compute_dtype: str, double_quant: bool) -> str | None:
    """Quantize a copy of one layer and run it once; None if that works, else the error."""
    import bitsandbytes as bnb

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            w = linear.weight.detach().to(device).clone()
            x = torch.randn(2, linear.in_features, device=device)
            if scheme == "int8":
                layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False,
                                            has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
                layer = layer.to(device)
            else:
                dtype = _DTYPES[compute_dtype]
                layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=dtype, quant_type=scheme,
                                          compress_statistics=double_quant, device=device)
                layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=scheme,
                                                 compress_statistics=double_quant)._quantize(device)
                x = x.to(dtype)
            y = layer(x)
            if not torch.isfinite(y).all():
                return "the quantized layer produced non-finite outputs"
    except Exception as exc:  # bnb raises a variety of types for unsupported devices and shapes
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


def quantize_with_bnb(model: Any, task: str, scheme: str, targets: list[str], work_dir: Path, device: str,
                      compute_dtype: str, double_quant: bool, int8_threshold: float) -> Any:
    """Reload `model` through transformers with only `targets` quantized by bitsandbytes."""
    from transformers import BitsAndBytesConfig

    from compress.bundle import auto_class

    src = Path(work_dir) / "bnb-source"
    model.save_pretrained(src)
    keep = set(targets)
    # Every other linear layer is named explicitly, escaped, so transformers' pattern matching
    # (prefix at a module boundary, or suffix) skips exactly those layers and nothing else.
    skip = [re.escape(name) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name not in keep]
    if scheme == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip,
                                     llm_int8_threshold=int8_threshold)
    else:
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme,
                                     bnb_4bit_use_double_quant=double_quant,
                                     bnb_4bit_compute_dtype=_DTYPES[compute_dtype],
                                     llm_int8_skip_modules=skip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = auto_class(task).from_pretrained(str(src), quantization_config=qconfig,
                                                     device_map={"": device})
    keep_canonical_layout(quantized)  # same numbers on every CPU (see quant/bnb_weights)
    quantized.eval()
    for p in quantized.parameters():
        p.requires_grad_(False)
    return quantized

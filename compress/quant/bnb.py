"""bitsandbytes LLM.int8 / NF4 / FP4 through transformers' own integration.

Going through `from_pretrained(quantization_config=BitsAndBytesConfig(...))` (from a scratch copy
of the in-memory model) means the result is a standard transformers bnb checkpoint: it saves
with `save_pretrained` and reloads with plain `from_pretrained`, on CPU as on GPU.

One exception: transformers 5 converts only layers whose type is exactly `nn.Linear` (or GPT-2's
Conv1D), so subclasses that compute the same map — Falcon's `FalconLinear` — stayed float and a
Falcon "int8" model held no int8 layer. `linear_subclasses_as_linear()` makes the loader turn
such layers into plain linears first; models that need it are saved in the `hf-bnb` format,
whose loader applies it again (plain `from_pretrained` leaves those layers float and cannot
place their quantized tensors).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.bundle import ModelFormat, auto_class, from_pretrained_checked, register_format
from compress.modelconfig import TORCH_DTYPES
from compress.portable import read_config
from compress.quant.bnb_weights import keep_canonical_layout
from compress.quant.select import as_linear, behaves_linear, linear_kind

BNB_SCHEMES = ("int8", "nf4", "fp4")
FORMAT = "hf-bnb"


def bnb_layer_types() -> tuple[type, ...]:
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def linear_subclasses(model: nn.Module) -> list[str]:
    """Layers that are nn.Linear subclasses computing a plain linear map (transformers skips them)."""
    return [name for name, mod in model.named_modules()
            if type(mod) is not nn.Linear and isinstance(mod, nn.Linear) and behaves_linear(type(mod))]


def output_format(model: nn.Module) -> str:
    """`hf` when plain transformers reloads this model's bnb checkpoint, else `hf-bnb` (see above)."""
    return FORMAT if linear_subclasses(model) else "hf"


@contextmanager
def linear_subclasses_as_linear() -> Iterator[None]:
    """While active, transformers' bitsandbytes loader first replaces every nn.Linear subclass that
    behaves as a plain linear by nn.Linear (same parameter names, so weights load unchanged), then
    converts as usual. It patches the loader's helper for the duration of the call, because
    transformers offers no hook for it; the original is always restored."""
    import transformers.integrations.bitsandbytes as bnb_integration
    from transformers import integrations

    original = bnb_integration.replace_with_bnb_linear

    def replace(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        for name in linear_subclasses(model):
            mod = model.get_submodule(name)
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              device=mod.weight.device, dtype=mod.weight.dtype)
            model.set_submodule(name, plain)
        return original(model, *args, **kwargs)

    # The quantizers import the helper from `transformers.integrations` when they run.
    previous = integrations.__dict__.get("replace_with_bnb_linear")
    integrations.replace_with_bnb_linear = replace
    bnb_integration.replace_with_bnb_linear = replace
    try:
        yield
    finally:
        bnb_integration.replace_with_bnb_linear = original
        if previous is None:
            del integrations.replace_with_bnb_linear
        else:
            integrations.replace_with_bnb_linear = previous


def probe(linear: nn.Linear, scheme: str, device: str, compute_dtype: str, double_quant: bool) -> str | None:
    """Quantize a copy of one layer and run it once; None if that works, else the error."""
    import bitsandbytes as bnb

    try:
        linear = as_linear(linear)  # Conv1D and linear subclasses are probed as the linear they are
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
                dtype = TORCH_DTYPES[compute_dtype]
                layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=dtype, quant_type=scheme,
                                          compress_statistics=double_quant, device=device)
                layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=scheme,
                                                 compress_statistics=double_quant)._quantize(device)
                x = x.to(dtype)
            y = layer(x)
            if not torch.isfinite(y).all():
                return "the quantized layer produced non-finite outputs"
    except Exception as exc:  # noqa: BLE001 - bnb raises many types for unsupported devices and shapes
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


def quantize_with_bnb(model: Any, task: str, scheme: str, targets: list[str], work_dir: Path, device: str,
                      compute_dtype: str, double_quant: bool, int8_threshold: float) -> Any:
    """Reload `model` through transformers with only `targets` quantized by bitsandbytes."""
    from transformers import BitsAndBytesConfig

    src = Path(work_dir) / "bnb-source"
    model.save_pretrained(src)
    keep = set(targets)
    # Every other linear layer is named explicitly, escaped and anchored at the end: transformers
    # matches a skip pattern as a prefix at a module boundary *or as a plain suffix*, so an
    # unanchored "classifier" also skipped DistilBERT's "pre_classifier". "name$" matches that
    # full name only (and, as a literal, is never a suffix of a module name).
    skip = [re.escape(name) + "$" for name, mod in model.named_modules()
            if linear_kind(mod) is not None and name not in keep]
    if scheme == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip,
                                     llm_int8_threshold=int8_threshold)
    else:
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme,
                                     bnb_4bit_use_double_quant=double_quant,
                                     bnb_4bit_compute_dtype=TORCH_DTYPES[compute_dtype],
                                     llm_int8_skip_modules=skip)
    with warnings.catch_warnings(), linear_subclasses_as_linear():
        warnings.simplefilter("ignore")
        quantized = auto_class(task).from_pretrained(str(src), quantization_config=qconfig,
                                                     device_map={"": device})
    keep_canonical_layout(quantized)  # same numbers on every CPU (see quant/bnb_weights)
    quantized.eval()
    for p in quantized.parameters():
        p.requires_grad_(False)
    return quantized


def _save(bundle: Any, folder: Path) -> None:
    bundle.model.save_pretrained(folder)


def _load(folder: Path, meta: dict[str, Any]) -> Any:
    with warnings.catch_warnings(), linear_subclasses_as_linear():
        warnings.simplefilter("ignore")
        model = from_pretrained_checked(meta["task"], str(folder), config=read_config(folder))
    keep_canonical_layout(model)
    model.eval()
    return model


register_format(ModelFormat(FORMAT, _save, _load, plain_loadable=False))

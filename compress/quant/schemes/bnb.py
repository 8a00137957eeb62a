"""Schemes int8 (LLM.int8), nf4 and fp4: bitsandbytes through transformers' own integration."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from compress.quant import bnb as bnb_quant
from compress.quant.config import CPU_ALTERNATIVE, QUANTIZE_SCHEMES, Quantize, SchemeOutput
from compress.quant.select import dense_weight
from compress.quant.verify import weight_error


class _Bnb(Quantize):
    bitsandbytes: ClassVar[bool] = True

    def _probe_args(self) -> tuple[str, bool]:
        return "float32", True

    def layer_problem(self, module: nn.Module, device: str) -> str | None:
        return bnb_quant.probe(module, self.scheme, device, *self._probe_args())

    def scheme_problems(self, bundle: Any, ctx: Any) -> list[str]:
        why = bnb_quant.probe(nn.Linear(64, 64), self.scheme, ctx.device, *self._probe_args())
        if why is None:
            return []
        return [(f"scheme: bitsandbytes {self.scheme} cannot run on device {ctx.device} ({why}); "
                f"use {CPU_ALTERNATIVE}")]


class Int8Bnb(_Bnb):
    """bitsandbytes LLM.int8: int8 weights, outlier activations in fp16 (a transformers checkpoint)."""

    scheme: Literal["int8"] = "int8"
    int8_threshold: float = Field(6.0, ge=0, description=(
        "int8: LLM.int8 outlier threshold; activations above it use an fp16 matmul (0 = none)."))


class Nf4(_Bnb):
    """bitsandbytes NF4: 4-bit normal-float weights in blocks of 64 (a transformers checkpoint)."""

    scheme: Literal["nf4"] = "nf4"
    double_quant: bool = Field(True, description=(
        "nf4/fp4: quantize the block scales too (4.127 instead of 4.5 bits/weight)."))
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="nf4/fp4: dtype the 4-bit weights are dequantized to for the matmul.")

    def _probe_args(self) -> tuple[str, bool]:
        return self.compute_dtype, self.double_quant


class Fp4(Nf4):
    """bitsandbytes FP4: 4-bit float weights in blocks of 64 (a transformers checkpoint)."""

    scheme: Literal["fp4"] = "fp4"  # type: ignore[assignment]


def quantize_bnb(model: nn.Module, targets: list[str], config: _Bnb, bundle: Any, ctx: Any) -> SchemeOutput:
    """Quantize through transformers' bitsandbytes loader; each layer's error against the float model."""
    compute_dtype, double_quant = config._probe_args()
    threshold = getattr(config, "int8_threshold", 6.0)
    fmt = bnb_quant.output_format(model)
    with torch.no_grad():
        quantized = bnb_quant.quantize_with_bnb(model, bundle.task, config.scheme, targets, ctx.work_dir,
                                                ctx.device, compute_dtype, double_quant, threshold)
        errors = {name: weight_error(quantized.get_submodule(name), dense_weight(model.get_submodule(name)))
                  for name in targets}
    return SchemeOutput(quantized, errors, format=fmt)


for _cls in (Int8Bnb, Nf4, Fp4):
    QUANTIZE_SCHEMES.register(_cls, quantize_bnb)

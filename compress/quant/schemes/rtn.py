"""Schemes int8-weight and int4-weight: weight-only round-to-nearest with per-group scales; and the
fields every weight-only scheme (these, gptq, awq) shares: the group size and the bit width."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.quant.config import QUANTIZE_SCHEMES, Quantize, SchemeOutput
from compress.quant.schemes.common import replace_layers
from compress.quant.select import in_out
from compress.quant.verify import low_bit_bound
from compress.quant.weight_only import WeightOnlyLinear, group_problem

BITS_HELP = ("Bits per weight: 4 (default), 3 or 2, stored packed (int3: 8 weights in 3 bytes) with a "
             "uint8 zero point and an fp32 scale per group. Below 4 bits error grows fast: use groups of "
             "128 or less, and a calibrated scheme (gptq, awq).")


class WeightOnly(Quantize):
    """Base of the weight-only schemes: a group size and a bit width."""

    group_size: int = Field(128, ge=0, description=(
        "Weights per scale/zero point along the input dimension; 0 = one per output channel."))

    def weight_bits(self) -> int:
        return getattr(self, "bits", 4)

    def layer_problem(self, module: nn.Module, device: str) -> str | None:
        return group_problem(in_out(module)[0], self.weight_bits(), self.group_size)

    def error_bound(self) -> float:
        bits = self.weight_bits()
        return super().error_bound() if bits >= 4 else low_bit_bound(bits)


class Int8Weight(WeightOnly):
    """int8 weights with per-group (default: per-row) scales, round-to-nearest; activations stay float."""

    scheme: Literal["int8-weight"] = "int8-weight"
    group_size: int = Field(0, ge=0, description=(
        "Weights per scale along the input dimension; 0 = one per output channel (the default)."))

    def weight_bits(self) -> int:
        return 8


class Int4Weight(WeightOnly):
    """4-bit (or 3/2-bit) weights with per-group scales and zero points, round-to-nearest."""

    scheme: Literal["int4-weight"] = "int4-weight"
    bits: Literal[2, 3, 4] = Field(4, description=BITS_HELP)


def quantize_rtn(model: nn.Module, targets: list[str], config: WeightOnly, bundle: Any,
                 ctx: Any) -> SchemeOutput:
    """Round each target's weight to the nearest grid point of its group."""
    bits, group = config.weight_bits(), config.group_size
    with torch.no_grad():
        errors = replace_layers(model, targets, lambda _n, lin: WeightOnlyLinear.from_linear(lin, bits, group))
    return SchemeOutput(model, errors)


QUANTIZE_SCHEMES.register(Int8Weight, quantize_rtn)
QUANTIZE_SCHEMES.register(Int4Weight, quantize_rtn)

"""Weight-only int8 / int4 linear layers: integer weights with per-group scales, dequantized per call.

Hand-written because the maintained options do not fit here: torchao's int4 weight-only tensors
need CUDA/MSLK kernels, its CPU int8 weight-only path measured ~2x slower than fp32 on this
machine, and its tensor subclasses do not serialise to plain safetensors. The layout below is
plain tensors (int codes, fp32 scales, uint8 zero points), so it saves and reloads exactly.

Layout: int8 is symmetric (codes -127..127, zero point 0, not stored); 4, 3 and 2 bits are
asymmetric (codes 0..2^bits-1 with a uint8 zero point per group). int4 packs two codes per byte;
int3 packs eight codes into three bytes and int2 four codes per byte, little-endian (the same
rule that gives int4's nibble order), so the stored bits per weight are the nominal ones. The grid
always contains 0, so pruned (zero) weights stay exactly zero after quantization.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.quant.kinds import register_layer_kind


def effective_group(in_features: int, group_size: int) -> int:
    """Group length along the input dimension; 0 or a group wider than the row means one per row."""
    return in_features if group_size <= 0 or group_size >= in_features else group_size


SUPPORTED_BITS = (2, 3, 4, 8)
# Codes packed together so they fill whole bytes: int4 two per byte, int3 eight in three bytes, int2 four.
PACK_COUNT = {2: 4, 3: 8, 4: 2}


def group_problem(in_features: int, bits: int, group_size: int) -> str | None:
    """Why a layer with `in_features` inputs cannot use this layout, or None when it can."""
    g = effective_group(in_features, group_size)
    if in_features % g:
        return (f"in_features {in_features} is not a multiple of group_size {group_size}; "
                f"use a group_size dividing {in_features}, or 0 (one group per row)")
    count = PACK_COUNT.get(bits, 1)
    if in_features % count:
        return (f"in_features {in_features} is not a multiple of {count}, and int{bits} packs {count} "
                f"weights together")
    return None


def quant_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `w` (rows = groups). int8: symmetric; int4: asymmetric min-max."""
    if bits == 8:
        scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127
        return scale, torch.zeros_like(scale)
    qmax = 2**bits - 1
    # Widen the range to include 0 so zero weights map to a code exactly (as reference GPTQ does).
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of `w` (any leading shape) for broadcastable `scale`/`zero`."""
    if bits == 8:
        return torch.round(w / scale).clamp(-127, 127)
    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)


def symmetric_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `w` for a symmetric grid in the asymmetric layout: zero = 2^(bits-1),
    scale = absmax / (2^(bits-1) - 1), so 0 is a code and the grid is centred (AWQ's zero_point: false)."""
    half = 2 ** (bits - 1)
    scale = (w.abs().amax(dim=-1) / (half - 1)).clamp(min=1e-12)
    return scale, torch.full_like(scale, float(half))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.uint8, device=packed.device)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (0..2^bits-1) along the last dimension into uint8: int4 as `pack_int4`, int3 and int2
    as little-endian runs of PACK_COUNT[bits] codes (hand-written: torch has no sub-byte dtypes to save).
    Byte arithmetic throughout: uint8 shifts drop the bits that move past a byte, which is what puts a
    code's low bits in one byte and its high bits in the next."""
    if bits == 4:
        return pack_int4(codes)
    c = codes.to(torch.uint8)
    if bits == 2:
        return c[..., 0::4] | (c[..., 1::4] << 2) | (c[..., 2::4] << 4) | (c[..., 3::4] << 6)
    # int3: c0..c7 fill 24 bits, c0 in bits 0-2 of the first byte ... c7 in bits 5-7 of the third.
    c = c.reshape(*codes.shape[:-1], -1, 8)
    b0 = c[..., 0] | (c[..., 1] << 3) | (c[..., 2] << 6)
    b1 = (c[..., 2] >> 2) | (c[..., 3] << 1) | (c[..., 4] << 4) | (c[..., 5] << 7)
    b2 = (c[..., 5] >> 1) | (c[..., 6] << 2) | (c[..., 7] << 5)
    return torch.stack((b0, b1, b2), -1).reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`: uint8 codes along the last dimension."""
    if bits == 4:
        return unpack_int4(packed)
    p = packed.to(torch.uint8)
    if bits == 2:
        parts = [(p >> shift) & 3 for shift in (0, 2, 4, 6)]
    else:
        p = p.reshape(*packed.shape[:-1], -1, 3)
        b0, b1, b2 = p[..., 0], p[..., 1], p[..., 2]
        parts = [b0 & 7, (b0 >> 3) & 7, (b0 >> 6) | ((b1 & 1) << 2), (b1 >> 1) & 7, (b1 >> 4) & 7,
                 (b1 >> 7) | ((b2 & 3) << 1), (b2 >> 2) & 7, b2 >> 5]
    return torch.stack(parts, -1).reshape(*packed.shape[:-1], -1)


def group_limit_bits(bits: int, group: int) -> float:
    """Bits per weight on an infinitely large layer: codes + one fp32 scale (+ an 8-bit zero below 8
    bits) per group."""
    return bits + (32 + (8 if bits < 8 else 0)) / group


class QuantizedWeight(nn.Module):
    """Base of layers holding an (rows, cols) weight as integer codes + per-group scale/zero.

    The codes are an `nn.Parameter` (frozen) carrying `quant_shape`, the logical shape, so
    `compress.evaluate.size` counts one parameter per logical weight, packed or not. Layers keep
    their tensors directly (no child module) so size accounting sees them as leaf layers.
    """

    def _setup_quant(self, rows: int, cols: int, bits: int, group_size: int) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, not {bits}")
        self.q_rows, self.q_cols, self.bits = rows, cols, bits
        self.group = effective_group(cols, group_size)
        groups = cols // self.group
        if bits == 8:
            codes = torch.zeros(rows, cols, dtype=torch.int8)
        else:
            codes = torch.zeros(rows, cols * bits // 8, dtype=torch.uint8)
        self.qweight = nn.Parameter(codes, requires_grad=False)
        self.qweight.quant_shape = (rows, cols)
        self.register_buffer("scales", torch.ones(rows, groups))
        if bits < 8:
            self.register_buffer("zeros", torch.zeros(rows, groups, dtype=torch.uint8))
        else:
            self.zeros = None

    def set_from_float(self, w: torch.Tensor) -> None:
        """Round-to-nearest quantization of a float weight."""
        grouped = w.detach().float().reshape(self.q_rows, -1, self.group)
        scale, zero = quant_params(grouped, self.bits)
        codes = quantize_codes(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), self.bits)
        self.set_codes(codes.reshape(self.q_rows, self.q_cols), scale, zero)

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store precomputed codes (out, in) with scale/zero (out, groups), e.g. from GPTQ."""
        with torch.no_grad():
            if self.bits == 8:
                self.qweight.copy_(codes.to(torch.int8))
            else:
                self.qweight.copy_(pack_codes(codes, self.bits))
                self.zeros.copy_(zero.to(torch.uint8))
            self.scales.copy_(scale.float())

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantized fp32 rows (all, or those picked by `index`, for embedding lookups)."""
        codes, scales = self.qweight, self.scales
        zeros = self.zeros
        if index is not None:
            codes, scales = codes[index], scales[index]
            zeros = zeros[index] if zeros is not None else None
        lead = codes.shape[:-1]
        if self.bits == 8:
            q = codes.float().reshape(*lead, -1, self.group)
            w = q * scales.unsqueeze(-1)
        else:
            q = unpack_codes(codes, self.bits).float().reshape(*lead, -1, self.group)
            w = (q - zeros.float().unsqueeze(-1)) * scales.unsqueeze(-1)
        return w.reshape(*lead, self.q_cols)


@register_layer_kind
class WeightOnlyLinear(QuantizedWeight):
    """Linear layer with int8/int4 weights; activations stay float (weight-only quantization)."""

    kind = "weight-only"

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self._setup_quant(out_features, in_features, bits, group_size)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> WeightOnlyLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        layer.set_from_float(linear.weight)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that inspects `.weight`; not stored)."""
        return self.rows()

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> WeightOnlyLinear:
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec["bits"], spec["group_size"])

    def size_facts(self) -> tuple[int, int, str, float]:
        label = f"{self.kind}-int{self.bits}"
        return self.q_rows, self.q_cols, label, group_limit_bits(self.bits, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rows().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group}"

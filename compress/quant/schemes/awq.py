"""Scheme awq: activation-aware scales folded into the previous op, clipping search, then the same
weight-only layers as int4-weight and gptq (so it saves, reloads and exports as they do).

Layers whose input comes from no foldable op (attention outputs under grouped KV heads, GELU MLPs,
encoders whose norms also feed the residual) are quantized with clipping only: an input scale kept on
the layer would need a layer kind of its own that compressed-tensors cannot express.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.calibration import input_stats, to_device
from compress.errors import StageError
from compress.quant.awq import (
    clip_and_quantize,
    find_mappings,
    fold,
    output_error,
    rtn,
    search_scale,
)
from compress.quant.config import QUANTIZE_SCHEMES, SchemeOutput
from compress.quant.schemes.common import draw_calibration, replace_layers, weight_only_layer
from compress.quant.schemes.rtn import BITS_HELP, WeightOnly
from compress.quant.select import dense_weight

# Folding is exact algebra; in float32 the logits move by rounding only (tiny Llama: ~1e-7 of the
# largest logit). A wrong fold moves them by O(1). Half precision rounds each folded weight.
FOLD_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
HALF_FOLD_TOLERANCE = 0.05


class Awq(WeightOnly):
    """AWQ: activation-aware input-channel scales folded into the previous op, then clipping search.

    Weight-only layers of 4, 3 or 2 bits, the same kind as int4-weight and gptq."""

    scheme: Literal["awq"] = "awq"
    bits: Literal[2, 3, 4] = Field(4, description=BITS_HELP)
    zero_point: bool = Field(True, description=(
        "Asymmetric groups (a zero point per group, min-max range); false = symmetric groups centred on 0."))
    clip: bool = Field(True, description=(
        "Search each group's range shrink (1.0 down to 0.55) by its output error on calibration inputs."))
    duo_scaling: bool = Field(False, description=(
        "Scale by mean|x|^alpha / mean|w|^(1-alpha) (AutoAWQ's default) instead of the paper's mean|x|^alpha."))
    scale_grid: int = Field(20, ge=1, le=100, description=(
        "Values of alpha tried in [0, 1) for the scale mean|x|^alpha (alpha 0 = no scaling)."))

    def uses_calibration(self) -> bool:
        return True


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**to_device(batch, device, labels=False))
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def quantize_awq(model: nn.Module, targets: list[str], config: Awq, bundle: Any, ctx: Any) -> SchemeOutput:
    """Search and fold the scales, check the float model is unchanged, then clip and round every target."""
    batches, facts = draw_calibration(model, config, bundle, ctx)
    stats = input_stats(model, {n: model.get_submodule(n) for n in targets}, batches, hessian=True)
    hessians = {n: stats[n].mean_hessian() for n in targets}
    symmetric = not config.zero_point
    probe = {k: v[:2] for k, v in batches[0].items()}
    before = _logits(model, probe)
    mappings = find_mappings(model, targets)
    alphas, scaled_err, rtn_err = [], 0.0, 0.0
    with torch.no_grad():
        for mapping in mappings:
            first = mapping.balance[0]
            weights = [dense_weight(model.get_submodule(b)).float() for b in mapping.balance]
            s, alpha, err, base = search_scale(weights, stats[first].mean_abs(), hessians[first], config.bits,
                                               config.group_size, symmetric, config.duo_scaling,
                                               config.scale_grid)
            fold(model, mapping, s)
            inv = 1 / s
            for b in mapping.balance:  # their inputs are now x / s
                hessians[b] = hessians[b] * inv.unsqueeze(0) * inv.unsqueeze(1)
            alphas.append(alpha)
            scaled_err, rtn_err = scaled_err + err, rtn_err + base
    after = _logits(model, probe)
    change = float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
    bound = FOLD_TOLERANCE.get(next(model.parameters()).dtype, HALF_FOLD_TOLERANCE)
    if not change <= bound:
        raise StageError(f"quantize.scheme: awq: folding the scales into {len(mappings)} sites (e.g. "
                         f"{mappings[0].prev if mappings else '-'}) changed the float model's logits by "
                         f"{change:.3g} of the largest logit (bound {bound:g}), before any rounding; this "
                         f"architecture's layout does not match the fold patterns; use scheme gptq")

    clip_err = clip_rtn_err = 0.0

    def build(name: str, linear: nn.Linear) -> nn.Module:
        nonlocal clip_err, clip_rtn_err
        weight, hessian = linear.weight.detach().float(), hessians[name]
        codes, scales, zeros = clip_and_quantize(weight, hessian, config.bits, config.group_size, symmetric,
                                                 config.clip)
        layer = weight_only_layer(linear, config.bits, config.group_size, codes, scales, zeros)
        clip_err += output_error(layer.weight.detach().float() - weight, hessian)
        clip_rtn_err += output_error(rtn(weight, config.bits, config.group_size, symmetric) - weight, hessian)
        return layer

    with torch.no_grad():
        errors = replace_layers(model, targets, build)
    scaled = {b for m in mappings for b in m.balance}
    facts.update({
        "bits": config.bits, "zero_point": config.zero_point, "clip": config.clip,
        "awq_fold_sites": len(mappings), "awq_scaled_layers": len(scaled),
        "awq_unscaled_layers": len(targets) - len(scaled),
        "awq_alpha_mean": round(sum(alphas) / len(alphas), 3) if alphas else None,
        "awq_fold_logit_change": float(f"{change:.3g}"),
        # Output error (tr(ΔW H ΔWᵀ)) relative to round-to-nearest: of the scaled layers after scaling,
        # and of every layer after clipping.
        "awq_scale_error_vs_rtn": round(scaled_err / rtn_err, 4) if rtn_err > 0 else None,
        "awq_clip_error_vs_rtn": round(clip_err / clip_rtn_err, 4) if clip_rtn_err > 0 else None,
    })
    return SchemeOutput(model, errors, facts)


QUANTIZE_SCHEMES.register(Awq, quantize_awq)

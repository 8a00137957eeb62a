"""Scheme int8-dynamic: int8 weights x run-time int8 activations on fbgemm (the CPU speed path),
optionally SmoothQuant-scaled on calibration data."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.quant.config import QUANTIZE_SCHEMES, Quantize, SchemeOutput
from compress.quant.dynamic import DynamicInt8Linear, kernel_available, smoothing_factors
from compress.quant.schemes.common import calibration_stats, replace_layers


class Int8Dynamic(Quantize):
    """int8 weights and int8 activations quantized at run time (fbgemm): the CPU speed path."""

    scheme: Literal["int8-dynamic"] = "int8-dynamic"
    activation_scales: Literal["auto", "per-tensor", "per-token"] = Field("auto", description=(
        "int8-dynamic: one activation scale per tensor (fastest: fbgemm's own) or per token (robust to "
        "outlier tokens; its extra passes cost time on small CPUs). auto = per-token for causal LMs, "
        "whose outlier tokens wreck a shared scale (SmolLM2-135M: perplexity 78.7 fp32, 261.6 "
        "per-tensor, 86.2 per-token), per-tensor for classifiers."))
    smooth_alpha: float | None = Field(None, ge=0, le=1, description=(
        "int8-dynamic: SmoothQuant strength, moving activation outliers into weights using calibration "
        "data (0.5 is typical); unset = no smoothing, no calibration."))

    def uses_calibration(self) -> bool:
        return self.smooth_alpha is not None

    def resolved_activation_scales(self, task: str) -> str:
        if self.activation_scales != "auto":
            return self.activation_scales
        return "per-token" if task == "causal-lm" else "per-tensor"

    def scheme_problems(self, bundle: Any, ctx: Any) -> list[str]:
        if torch.device(ctx.device).type != "cpu":
            return [(f"scheme: int8-dynamic runs on CPU kernels (fbgemm) but the device is {ctx.device}; "
                    f"use scheme int8 or nf4 (bitsandbytes) on GPU, or set device: cpu")]
        why = kernel_available()
        return [] if why is None else [f"scheme: int8-dynamic cannot run here ({why}); use int8-weight"]


def quantize_dynamic(model: nn.Module, targets: list[str], config: Int8Dynamic, bundle: Any,
                     ctx: Any) -> SchemeOutput:
    """Swap each target for a DynamicInt8Linear (SmoothQuant factors from calibration when asked)."""
    facts: dict[str, Any] = {}
    stats = None
    if config.uses_calibration():
        stats, facts = calibration_stats(model, targets, config, bundle, ctx, hessian=False)
    per_token = config.resolved_activation_scales(bundle.task) == "per-token"
    facts["activation_scales"] = "per-token" if per_token else "per-tensor"

    def build(name: str, linear: nn.Linear) -> nn.Module:
        smooth = None
        if stats is not None:
            smooth = smoothing_factors(stats[name].absmax, linear.weight, config.smooth_alpha)
        return DynamicInt8Linear.from_linear(linear, smooth, per_token)

    with torch.no_grad():
        errors = replace_layers(model, targets, build)
    return SchemeOutput(model, errors, facts)


QUANTIZE_SCHEMES.register(Int8Dynamic, quantize_dynamic)

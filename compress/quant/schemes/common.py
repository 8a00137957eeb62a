"""What the weight-only and calibrated schemes share: drawing calibration data and measuring inputs,
and swapping each target for its quantized layer while measuring its weight error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from compress.calibration import InputStats, batch_rows, batch_tokens, calibration_batches, input_stats
from compress.quant.format import set_module
from compress.quant.select import as_linear, dense_weight
from compress.quant.verify import weight_error
from compress.quant.weight_only import WeightOnlyLinear


def draw_calibration(model: nn.Module, config: Any, bundle: Any, ctx: Any) -> tuple[list[Any], dict[str, Any]]:
    """The calibration batches of this stage (its samples and seed) and the facts that describe them."""
    seed = ctx.seed if config.calibration_seed is None else config.calibration_seed
    batches = calibration_batches(bundle, ctx.data, config.calibration_samples, seed,
                                  field="quantize.calibration_samples")
    return batches, {"calibration_samples": batch_rows(batches), "calibration_seed": seed,
                     "calibration_tokens": batch_tokens(batches)}


def calibration_stats(model: nn.Module, names: list[str], config: Any, bundle: Any, ctx: Any,
                      hessian: bool) -> tuple[dict[str, InputStats], dict[str, Any]]:
    """Per target, what its inputs were on the stage's calibration data; and the calibration facts."""
    batches, facts = draw_calibration(model, config, bundle, ctx)
    stats = input_stats(model, {n: model.get_submodule(n) for n in names}, batches, hessian=hessian)
    return stats, facts


def replace_layers(model: nn.Module, names: list[str],
                   build: Callable[[str, nn.Linear], nn.Module]) -> dict[str, float]:
    """Swap each named layer for `build(name, plain linear)`; returns each one's relative weight error,
    measured on what the model now holds at that name against the float weight it replaced."""
    errors = {}
    for name in names:
        original = model.get_submodule(name)
        linear = as_linear(original)  # Conv1D / linear subclasses: the plain linear they compute
        new = build(name, linear)
        set_module(model, name, new.to(linear.weight.device))
        errors[name] = weight_error(model.get_submodule(name), dense_weight(original))
    return errors


def weight_only_layer(linear: nn.Linear, bits: int, group: int, codes: Any, scales: Any, zeros: Any
                      ) -> WeightOnlyLinear:
    """A weight-only layer holding precomputed codes (GPTQ, AWQ) and the linear's bias."""
    new = WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None, bits, group)
    new.set_codes(codes, scales, zeros)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.detach().float())
    return new

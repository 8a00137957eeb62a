"""Scheme mixed: each layer's width (8 / 4 / 3 / 2 bits, or float) chosen by measured sensitivity under
an average-bits budget (compress/quant/mixed.py), quantized with GPTQ or round-to-nearest.

A scheme of its own rather than `bits: auto` on gptq / int4-weight: the budget, the candidate widths
and the choice of quantizer are fields no other scheme has, and the family refuses a field of another
scheme by name, so `avg_bits` on `scheme: gptq` is a clear error instead of a silently ignored key.
The layers it writes are the same `WeightOnlyLinear` as int4-weight / gptq / awq, one width each, so
saving, reloading, size accounting and export need nothing new.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.calibration import input_stats
from compress.calibration.gradients import output_grad_sq
from compress.errors import StageError
from compress.quant.config import QUANTIZE_SCHEMES, SchemeOutput
from compress.quant.gptq import gptq_quantize
from compress.quant.mixed import Option, assign, check_assignment, sensitivity, stored_bits
from compress.quant.schemes.common import (
    draw_calibration,
    replace_layers,
    weight_only_layer,
)
from compress.quant.schemes.rtn import WeightOnly
from compress.quant.select import as_linear, in_out
from compress.quant.verify import WEIGHT_ERROR_BOUND, low_bit_bound
from compress.quant.weight_only import WeightOnlyLinear, effective_group, group_limit_bits, group_problem


class Mixed(WeightOnly):
    """Per-layer bit widths from measured sensitivity, under an average-bits budget."""

    scheme: Literal["mixed"] = "mixed"
    avg_bits: float = Field(4.5, gt=2, le=32, description=(
        "Budget: parameter-weighted average bits per weight over the quantized layers, scales and zero "
        "points included (4-bit with group_size 128 costs 4.3125, 3-bit 3.3125, 8-bit per row "
        "8 + 32/in_features)."))
    candidate_bits: list[Literal[2, 3, 4, 8]] = Field([3, 4, 8], min_length=1, description=(
        "Widths a layer may get. 8 bits is round-to-nearest with one scale per row; 4/3/2 bits use "
        "group_size and the quantizer."))
    keep_float: bool = Field(False, description=(
        "Also allow a layer to stay in float (costing its dtype's 16 or 32 bits) when it is worth it."))
    sensitivity: Literal["fisher", "output-error"] = Field("fisher", description=(
        "How a layer's cost at a width is measured. fisher: the calibration loss increase to second order, "
        "½ Σ_i F_i (ΔW H ΔWᵀ)_ii with F the squared loss gradient at the layer's outputs (one backward pass "
        "over the calibration data; needs labels). output-error: tr(ΔW H ΔWᵀ), the layer's own output "
        "error (no backward, but blind to how much the loss feels each layer)."))
    quantizer: Literal["gptq", "rtn"] = Field("gptq", description=(
        "How 4/3/2-bit layers are rounded: gptq (error-compensated on calibration inputs) or rtn "
        "(round-to-nearest, as int4-weight). Sensitivity is measured on what this quantizer produces."))

    def scheme_field_problems(self) -> list[str]:
        problems = []
        if len(set(self.candidate_bits)) != len(self.candidate_bits):
            problems.append("candidate_bits: a width is listed twice; list each once")
        if not self.keep_float and self.avg_bits < min(self.candidate_bits):
            problems.append(f"avg_bits: {self.avg_bits:g} is below the narrowest width in candidate_bits "
                            f"({min(self.candidate_bits)}); raise avg_bits or add a narrower width")
        return problems

    def uses_calibration(self) -> bool:
        return True

    def widths(self) -> list[int]:
        return sorted(set(self.candidate_bits))

    def group_for(self, bits: int) -> int:
        """8 bits keeps one scale per row (int8-weight's default); narrower widths use group_size."""
        return 0 if bits == 8 else self.group_size

    def layer_problem(self, module: nn.Module, device: str) -> str | None:
        n_in = in_out(module)[0]
        for bits in self.widths():
            why = group_problem(n_in, bits, self.group_for(bits))
            if why:
                return f"int{bits}: {why}"
        return None

    def width_bound(self, bits: int) -> float:
        """The relative weight error bound of a layer at `bits` (the bound its uniform scheme has)."""
        if bits == 8:
            return WEIGHT_ERROR_BOUND["int8-weight"]
        if bits == 4:
            return WEIGHT_ERROR_BOUND["gptq" if self.quantizer == "gptq" else "int4-weight"]
        return low_bit_bound(bits)

    def error_bound(self) -> float:
        # The stage's uniform check gets the loosest width's bound; each layer is checked against its
        # own width's bound by check_assignment.
        return max(self.width_bound(b) for b in self.widths())


SENSITIVITY = {"fisher": "loss increase 1/2 sum_i F_i ((W-Q) H (W-Q)^T)_ii",
               "output-error": "output error tr((W-Q) H (W-Q)^T)"}


def _quantized(linear: nn.Linear, hessian: torch.Tensor, bits: int, config: Mixed, name: str) -> nn.Module:
    group = config.group_for(bits)
    if bits == 8 or config.quantizer == "rtn":
        return WeightOnlyLinear.from_linear(linear, bits, group)
    try:  # GPTQ's defaults (damping 0.01, no act-order): the options of scheme gptq stay there
        codes, scales, zeros = gptq_quantize(linear.weight, hessian, bits, group)
    except ValueError as exc:
        raise StageError(f"quantize.quantizer: layer {name}: {exc}; calibrate on more data "
                         f"(calibration_samples) or use quantizer: rtn") from None
    return weight_only_layer(linear, bits, group, codes, scales, zeros)


def _cheapest(model: nn.Module, targets: list[str], config: Mixed) -> float:
    """Bits per weight with every layer at its narrowest option, from shapes alone."""
    total = cost = 0.0
    for name in targets:
        n_in, n_out = in_out(model.get_submodule(name))
        options = [group_limit_bits(b, effective_group(n_in, config.group_for(b))) for b in config.widths()]
        if config.keep_float:
            options.append(8.0 * model.get_submodule(name).weight.element_size())
        total += n_in * n_out
        cost += min(options) * n_in * n_out
    return cost / total if total else 0.0


def quantize_mixed(model: nn.Module, targets: list[str], config: Mixed, bundle: Any,
                   ctx: Any) -> SchemeOutput:
    """Measure every target at every candidate width, assign widths under the budget, install them."""
    floor = _cheapest(model, targets, config)
    if floor > config.avg_bits:  # before any calibration work
        raise StageError(f"quantize.avg_bits: {config.avg_bits:g} bits per weight is below the cheapest "
                         f"assignment, {floor:.4f} (every layer at its narrowest width, scales and zero "
                         f"points included); raise avg_bits, add a narrower width to candidate_bits, or use "
                         f"a larger group_size")
    batches, facts = draw_calibration(model, config, bundle, ctx)
    modules = {n: model.get_submodule(n) for n in targets}
    stats = input_stats(model, modules, batches, hessian=True)
    fisher: dict[str, torch.Tensor] = {}
    if config.sensitivity == "fisher":
        fisher = output_grad_sq(model, modules, batches, field="quantize.sensitivity")
    options: dict[str, list[Option]] = {}
    weights: dict[str, int] = {}
    with torch.no_grad():
        for name in targets:
            linear = as_linear(model.get_submodule(name))
            hessian = stats.pop(name).mean_hessian()
            # No gradient reached the layer: it does not move the loss, so no width costs anything.
            weight_of = (fisher.get(name, torch.zeros(linear.out_features))
                         if config.sensitivity == "fisher" else None)
            opts = []
            for bits in config.widths():
                layer = _quantized(linear, hessian, bits, config, name)
                opts.append(Option(bits, layer, stored_bits(layer),
                                   sensitivity(linear.weight, layer.weight, hessian, weight_of)))
            if config.keep_float:
                opts.append(Option(None, None, stored_bits(linear), 0.0))
            options[name] = opts
            weights[name] = linear.weight.numel()
    chosen = assign(options, weights, config.avg_bits)
    quantized = [n for n in targets if chosen[n].bits is not None]
    with torch.no_grad():
        errors = replace_layers(model, quantized, lambda n, _lin: chosen[n].layer)
    assigned = {n: chosen[n].bits for n in targets}
    bounds = {b: config.width_bound(b) for b in config.widths()}
    achieved = check_assignment(model, assigned, config.avg_bits, errors, bounds)
    counts = {("float" if b is None else f"int{b}"): sum(v == b for v in assigned.values())
              for b in [*config.widths(), None] if b is not None or config.keep_float}
    facts.update({
        "avg_bits_budget": config.avg_bits, "avg_bits_achieved": round(achieved, 4),
        "quantizer": config.quantizer, "sensitivity": SENSITIVITY[config.sensitivity],
        "layers_per_width": counts,
        # Per layer: the width chosen and the sensitivity at every candidate width (float = 0).
        "mixed_assignment": {n: {"bits": chosen[n].bits, "sensitivity": float(f"{chosen[n].sensitivity:.4g}"),
                                 "by_bits": {("float" if o.bits is None else str(o.bits)):
                                             float(f"{o.sensitivity:.4g}") for o in options[n]}}
                             for n in targets},
    })
    return SchemeOutput(model, errors, facts, kept_float=[n for n in targets if chosen[n].bits is None])


QUANTIZE_SCHEMES.register(Mixed, quantize_mixed)

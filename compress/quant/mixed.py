"""Mixed precision by measured sensitivity: each layer's bit width chosen under an average-bits budget.

Sensitivity of a layer at a width is the calibration loss increase of quantizing that layer alone at
that width, to second order: ½ Σ_i F_i (ΔW H ΔWᵀ)_ii, where ΔW = W - Q with Q what the real quantizer
(GPTQ or round-to-nearest) produces at that width, H = XᵀX / n the layer's input Hessian (the shared
calibration pass) and F_i the mean squared loss gradient at output channel i (one backward pass,
compress/calibration/gradients.py): HAWQ's idea with the Fisher in the layer's output space.
`sensitivity: output-error` drops F (tr(ΔW H ΔWᵀ), the GPTQ-style layer-wise proxy, no backward).
Measured on a tiny Llama with an outlier layer (tests/test_mixed_precision.py): against the real logit
error of quantizing each layer alone, the Fisher-weighted measure ranks the 14 layers with Spearman
0.97, the output error alone 0.12. The output error cannot see that an error in o_proj / down_proj
(whose small inputs give small output errors) goes straight into the residual stream, nor that q/k
errors barely move a nearly uniform attention; with it, mixed lost to uniform 4-bit at the same budget.
The exact alternative (the loss with only that layer quantized) needs one forward pass per layer per
width (SmolLM2-135M: 211 layers x 3 widths = 633 passes) where this needs one forward and one backward.

Costs are what the stored layer really holds per weight, as the size accounting reports it
(`size_facts`' limit: codes plus an fp32 scale and an 8-bit zero point per group), so a budget of
4.5 bits is 4.5 bits on disk; a layer kept in float costs its dtype's bits.

The assignment is a greedy multiple-choice knapsack: every layer starts at its cheapest width and the
upgrade (to any wider option, not only the next) with the largest sensitivity drop per added bit that
still fits is taken, until none fits. Greedy-by-ratio is optimal on the convex hull of each layer's
(cost, sensitivity) curve and within one item of the knapsack optimum; an exact dynamic programme
over a discretised budget would cost far more for a difference of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import StageError
from compress.quant.weight_only import WeightOnlyLinear


@dataclass
class Option:
    """One way to store a layer: `bits` (None = kept float), the layer built for it (None for float),
    its cost in bits per weight and its sensitivity (output error)."""

    bits: int | None
    layer: nn.Module | None
    bits_per_weight: float
    sensitivity: float


def sensitivity(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor,
                fisher: torch.Tensor | None = None) -> float:
    """The loss increase of replacing `weight` (out, in) by `quantized`, to second order: ½ Σ_i F_i
    (ΔW H ΔWᵀ)_ii with F the output-gradient Fisher (see compress.calibration.gradients); without F,
    the layer's output error tr(ΔW H ΔWᵀ)."""
    d = weight.detach().float() - quantized.detach().float().to(weight.device)
    per_row = ((d @ hessian.detach().float().to(d.device)) * d).sum(1)  # statistics are kept on the CPU
    return float(per_row.sum()) if fisher is None else 0.5 * float((fisher.float().to(d.device) * per_row).sum())


def stored_bits(layer: nn.Module) -> float:
    """Bits per weight a layer holds: a quantized layer's format limit (codes, scales, zero points),
    a float layer's dtype width."""
    if isinstance(layer, WeightOnlyLinear):
        return float(layer.size_facts()[3])
    return 8.0 * layer.weight.element_size()


def assign(options: dict[str, list[Option]], weights: dict[str, int], avg_bits: float) -> dict[str, Option]:
    """The option of each layer minimising the summed sensitivity with sum(bits * weights) <= avg_bits *
    sum(weights). Raises StageError when even the cheapest options exceed the budget."""
    total = sum(weights.values())
    budget = avg_bits * total
    chosen = {n: min(opts, key=lambda o: (o.bits_per_weight, o.sensitivity)) for n, opts in options.items()}
    spent = sum(chosen[n].bits_per_weight * weights[n] for n in options)
    if spent > budget * (1 + 1e-12):
        raise StageError(f"quantize.avg_bits: {avg_bits:g} bits per weight is below the cheapest assignment, "
                         f"{spent / total:.4f} (every layer at its narrowest width, scales and zero points "
                         f"included); raise avg_bits, add a narrower width to candidate_bits, or use a "
                         f"larger group_size")
    while True:
        best: tuple[float, str, Option] | None = None
        for name, opts in options.items():
            cur = chosen[name]
            for opt in opts:
                extra = (opt.bits_per_weight - cur.bits_per_weight) * weights[name]
                gain = cur.sensitivity - opt.sensitivity
                if extra <= 0 or gain <= 0 or spent + extra > budget * (1 + 1e-12):
                    continue
                ratio = gain / extra
                if best is None or ratio > best[0]:
                    best = (ratio, name, opt)
        if best is None:
            return chosen
        _, name, opt = best
        spent += (opt.bits_per_weight - chosen[name].bits_per_weight) * weights[name]
        chosen[name] = opt


def average_bits(model: nn.Module, names: list[str]) -> float:
    """Parameter-weighted bits per weight the layers `names` of `model` hold now."""
    total = bits = 0.0
    for name in names:
        layer = model.get_submodule(name)
        n = _weights(layer)
        total += n
        bits += stored_bits(layer) * n
    return bits / total if total else 0.0


def _weights(layer: nn.Module) -> int:
    if isinstance(layer, WeightOnlyLinear):
        return layer.q_rows * layer.q_cols
    return layer.weight.numel()


def _held_bits(layer: nn.Module) -> int | None:
    """The width a layer holds: its code bits, or None for a float layer."""
    if isinstance(layer, WeightOnlyLinear):
        return layer.bits
    if getattr(layer, "weight", None) is not None and layer.weight.is_floating_point():
        return None
    raise StageError(f"quantize: mixed: a layer of type {type(layer).__name__} is neither float nor "
                     f"weight-only")


def check_assignment(model: nn.Module, assigned: dict[str, int | None], avg_bits: float,
                     errors: dict[str, float], bounds: dict[int, float]) -> float:
    """What the mixed scheme promises, checked on the model it returns: every layer holds its assigned
    width (None = float), each quantized layer's weight error is within its width's bound, and the
    parameter-weighted bits per weight of the layers (scales and zero points included) are within the
    budget. Returns that average; raises StageError naming the layer and the number."""
    for name, bits in assigned.items():
        held = _held_bits(model.get_submodule(name))
        if held != bits:
            want = "float" if bits is None else f"int{bits}"
            got = "float" if held is None else f"int{held}"
            raise StageError(f"quantize: mixed: layer {name} was assigned {want} but holds {got}; the "
                             f"assignment was not applied")
        if bits is not None and not errors.get(name, float("nan")) <= bounds[bits]:
            err = errors.get(name, float("nan"))
            raise StageError(f"quantize: mixed: layer {name}: relative weight error {err:.4g} exceeds the "
                             f"int{bits} bound {bounds[bits]:g}")
    achieved = average_bits(model, list(assigned))
    if achieved > avg_bits * (1 + 1e-9):
        raise StageError(f"quantize.avg_bits: the {len(assigned)} layers hold {achieved:.4f} bits per weight "
                         f"on average (scales and zero points included), above the budget {avg_bits:g}; "
                         f"the assignment overspent it")
    return achieved

"""Choosing a group's quantization grid: min-max, symmetric, or the range shrink that minimises an error.

Min-max keeps every weight on the grid but spends levels on the rare largest ones; shrinking the range
(clipping the extremes) rounds the bulk finer. GPTQ's reference quantizer searches the shrink factor
per group against the weight error |w - q|^2.4 (`mse_scale`); AWQ searches it against the group's
output error (d^T H_gg d with H the input Hessian), its weight clipping. Both are `shrink_search` with
a different error function, written here once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compress.quant.weight_only import quant_params, quantize_codes, symmetric_params

# GPTQ's reference Quantizer (mse=True): 100 steps down to 20% of the range, error |d|^2.4.
MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4


def grid_params(w: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `w` from its full range: asymmetric min-max, or symmetric absmax."""
    return symmetric_params(w, bits) if symmetric and bits < 8 else quant_params(w, bits)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w rounded to the grid and mapped back to float (`scale`/`zero` broadcast against `w`)."""
    q = quantize_codes(w, scale, zero, bits)
    return q * scale if bits == 8 else (q - zero) * scale


def shrink_search(w: torch.Tensor, bits: int, error: Callable[[torch.Tensor], torch.Tensor],
                  ratios: torch.Tensor, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `w` (leading dims = groups, last = the group's weights), the grid whose range is
    `ratio` times the full one, for the ratio in `ratios` that minimises `error(w - dequantized)`
    (which maps (..., g) differences to (...) errors). Ratio 1 (min-max) should be among `ratios`."""
    best_err = torch.full(w.shape[:-1], float("inf"), device=w.device)
    best_scale = torch.zeros(w.shape[:-1], device=w.device)
    best_zero = torch.zeros(w.shape[:-1], device=w.device)
    for ratio in ratios.tolist():
        scale, zero = grid_params(w * ratio, bits, symmetric)  # the shrunk range's grid
        err = error(w - fake_quantize(w, scale.unsqueeze(-1), zero.unsqueeze(-1), bits))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def mse_params(w: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's `mse_scale`: the shrink of each row's range minimising sum |w - q|^2.4."""
    ratios = 1 - torch.arange(int(MSE_MAX_SHRINK * MSE_GRID)) / MSE_GRID
    return shrink_search(w, bits, lambda d: d.abs().pow(MSE_NORM).sum(-1), ratios, symmetric)

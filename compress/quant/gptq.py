"""GPTQ (Frantar et al., 2023, arXiv:2210.17323): 2/3/4-bit weights chosen to minimise ||WX - QX||^2.

Hand-written because no maintained implementation runs on this CPU with our torch: torchao's
`prototype.gptq` asserts CUDA (and its int4 tensors need MSLK), and llm-compressor / optimum-quanto
/ auto-gptq are not installable offline here. This follows the paper's Algorithm 1 with lazy
batch updates and the Cholesky form of the inverse Hessian, with the reference code's options
(activation order, static groups, MSE grid search), and writes the same layout as round-to-nearest
(`WeightOnlyLinear`), so reload and size accounting are shared.

By default Hessians are collected in one pass over the float model (every layer sees float inputs),
as torchao's GPTQ does; scheme gptq's `true_sequential` instead quantizes block by block and
sub-layer by sub-layer on quantized inputs (compress/calibration/sequential.py), as the reference does.
"""

from __future__ import annotations

import torch

from compress.hessian import HessianError, damped_inverse_factor
from compress.quant.grid import mse_params
from compress.quant.weight_only import effective_group, quant_params, quantize_codes


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False, mse_scale: bool = False,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize an (out, in) weight given its input Hessian (in, in).

    `act_order` visits columns in descending H_jj (the inputs with the most energy first, while the
    most columns are left to absorb their error). `static_groups` fits every group's grid on the
    weight before any update, in original order; act-order with groups needs it, because the stored
    layout keeps each group's columns contiguous (no per-column group index). `mse_scale` fits each
    group's grid by the range shrink minimising |w - q|^2.4 instead of min-max.

    Returns (codes (out, in), scales (out, groups), zeros (out, groups)) in the weight-only layout.
    Raises compress.hessian.HessianError (a ValueError) when the damped Hessian is not positive definite.
    """
    cols_in = weight.shape[1]
    group = effective_group(cols_in, group_size)
    if act_order and group < cols_in and not static_groups:
        raise ValueError("act_order with groups needs static_groups (the layout stores contiguous groups)")
    params = mse_params if mse_scale else quant_params
    H = hessian.detach().float()
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    W0 = weight.detach().float()
    if perm is not None:
        W0, H = W0[:, perm], H[perm][:, perm]
    # Dead inputs zeroed, damping and the factor of H⁻¹: the core shared with SparseGPT.
    try:
        W, Hinv, _dead = damped_inverse_factor(W0, H, damp)
    except HessianError as exc:
        raise HessianError(f"{exc}; raise gptq_damp") from None
    rows, cols = W.shape
    # Column j (in visiting order) belongs to group orig[j] // group of the stored layout.
    orig = perm if perm is not None else torch.arange(cols, device=W.device)
    scales = torch.zeros(rows, cols // group)
    zeros = torch.zeros(rows, cols // group)
    if static_groups:
        unpermuted = torch.empty_like(W)
        unpermuted[:, orig] = W
        s, z = params(unpermuted.reshape(rows, -1, group), bits)
        scales, zeros = s, z
    # Blocks hold whole groups so a group's scale is fitted on already-updated columns.
    block = max(group, (block_size // group) * group) if group < cols else cols

    codes = torch.zeros(rows, cols)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(orig[col]) // group
            if not static_groups and col % group == 0:
                scales[:, g], zeros[:, g] = params(W1[:, i: i + group], bits)
            scale, zero = scales[:, g], zeros[:, g]
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, bits)
            codes[:, col] = q
            deq = q * scale if bits == 8 else (q - zero) * scale
            Q1[:, i] = deq
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros


def reconstruction_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Layer-wise output error tr((W-Q) H (W-Q)^T), i.e. mean ||WX - QX||^2 up to a constant."""
    d = weight.detach().float() - dequantized.detach().float()
    return float(torch.einsum("ij,jk,ik->", d, hessian.detach().float(), d))

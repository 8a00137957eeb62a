"""What the quantize stage promises, checked before it returns (StageError naming the layer and the number).

1. Every selected layer is quantized, and at least one layer is: a scheme that quietly quantizes
   nothing (Falcon's FalconLinear under transformers' bitsandbytes loader) must not pass as success.
2. Each layer's dequantized weight is within a relative error of the float weight it replaced,
   ||W_q - W|| / ||W||, bounded per scheme. The bounds sit between what correct quantization gives
   on real weights and what broken quantization gives (a 4-bit weight read in the wrong layout:
   1.4; a dropped or doubled scale: >= 0.5; all zeros: 1.0). Measured, largest layer / mean over
   layers, with compress's own code (`weight_only`, `dynamic`) and bitsandbytes 0.50:
     MiniLM-L6 (37 linears, real fp32 weights): int8 row-wise 0.021 / 0.009, nf4 0.099 / 0.094,
       fp4 0.139 / 0.127, int4 group 128 0.119 / 0.107, gptq (20 tweets) 0.158 / 0.137;
       embeddings int8 0.034, int4 group 64 0.160.
     SmolLM2-135M (211 linears with the tied head, weights dequantized from its Q4_1 GGUF): int8
       0.012 / 0.009, nf4 0.107 / 0.094, fp4 0.160 / 0.126, int4 one group per row 0.177 / 0.127,
       gptq one group per row (20 sentences) 0.276 / 0.171; embeddings int8 0.012, int4 0.114.
     The 16 tiny test architectures (N(0, 0.02) init, 64-wide rows), worst layer of any: int8 0.007,
       nf4 0.095, int4 0.103, gptq 0.164; embeddings int8 0.007.
   GPTQ minimises the layer's output error, not its weight error, so its weight error is a little
   above round-to-nearest's and gets the loosest bound.
   SmoothQuant layers are measured on the weight they rounded (see `weight_error`): MiniLM, 64
   tweets, alpha 0.5 / 0.8 / 1.0: 0.016 / 0.027 / 0.032 worst layer.
3. A replaced embedding returns what the float one returned (scaled embeddings keep their scale),
   within the embedding bound, on every row (or 8,192 sampled rows of a larger table).
4. A table tied to the output head is quantized once and stays tied: the head reads the quantized
   embedding and no float copy of the table is left in the model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compress.errors import StageError
from compress.quant.accounting import quantized_modules
from compress.quant.embedding import QuantEmbedding, TiedQuantHead

WEIGHT_ERROR_BOUND: dict[str, float] = {
    # int8 row-wise absmax: 0.021 worst real layer; 0.05 leaves room for heavier-tailed rows.
    "int8": 0.05, "int8-dynamic": 0.05, "int8-weight": 0.05,
    # 4-bit: 0.10-0.18 on real layers (gptq 0.28); 0.3 / 0.35 stay far below a broken layer's 0.5+.
    "nf4": 0.3, "fp4": 0.3, "int4-weight": 0.3, "gptq": 0.35,
    # AWQ is measured on the scaled weight it rounded (W diag(s), see weight_error); its clipping adds
    # a little weight error for less output error, as GPTQ's updates do.
    "awq": 0.35,
}
# Below 4 bits the grid is 2-4x coarser. Measured worst layer (tiny Llama / GPT-2 / OPT, group 32,
# 8 calibration blocks): 3 bits RTN 0.178, AWQ 0.184, GPTQ act-order 0.313; 2 bits RTN 0.417, AWQ
# 0.367, GPTQ act-order 0.713 (GPTQ trades weight error for output error). The 3-bit bound still
# fails a doubled scale or an all-zero layer (1.0); at 2 bits only a wrongly unpacked layer (>1) fails.
LOW_BIT_ERROR_BOUND: dict[int, float] = {3: 0.6, 2: 0.95}
EMBEDDING_ERROR_BOUND: dict[str, float] = {"int8": 0.05, "int4": 0.3}
_PROBE_ROWS = 8192


def low_bit_bound(bits: int) -> float:
    """The weight error bound of 3- and 2-bit weight-only layers (any scheme)."""
    return LOW_BIT_ERROR_BOUND[bits]


def relative_error(quantized: torch.Tensor, dense: torch.Tensor) -> float:
    """||Q - W|| / ||W|| in float32 on CPU; inf when the shapes differ, nan propagates (and fails)."""
    q, w = quantized.detach().float().cpu(), dense.detach().float().cpu()
    if q.shape != w.shape:
        return math.inf
    norm = float(w.norm())
    diff = float((q - w).norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def dequantized(module: nn.Module) -> torch.Tensor:
    """The float weight (out, in) a quantized layer computes with."""
    if isinstance(module, nn.Linear) and not module.weight.is_floating_point():
        from compress.quant.bnb_weights import dequantize_weight  # bitsandbytes, layout-aware

        return dequantize_weight(module)
    return module.weight


def weight_error(module: nn.Module, dense: torch.Tensor) -> float:
    """Relative error of the weight a quantized layer holds against the float weight `dense` (out, in).

    A SmoothQuant layer (int8-dynamic with smooth_alpha) holds W * diag(s) in int8 and divides its
    input by s, which is exact algebra: its error is measured on W * diag(s), the matrix it rounded.
    Measured on W instead it looks inflated where it does not matter: MiniLM's pooler reads 0.089 at
    alpha 0.5 (against 0.021 unsmoothed), because columns with tiny activations are scaled down
    before rounding, exactly the columns that barely reach the output."""
    smooth_inv = getattr(module, "smooth_inv", None)
    if smooth_inv is not None:
        held = module.codes().float() * module.scales.unsqueeze(1)
        return relative_error(held, dense.float() / smooth_inv.unsqueeze(0))
    return relative_error(dequantized(module), dense)


def check_layers(model: nn.Module, scheme: str, targets: list[str], errors: dict[str, float],
                 embeddings: list[str], selected: int, bound: float | None = None) -> dict[str, Any]:
    """Promises 1 and 2 for the linear layers `targets` and the embeddings replaced (`selected` layers
    were chosen before unsupported ones were skipped); returns the facts for the report."""
    quantized = quantized_modules(model)
    if not targets and not embeddings:
        raise StageError(f"quantize: scheme {scheme} quantized no layer ({selected} selected, "
                         f"{selected} skipped as unsupported); nothing was compressed. Use another scheme, "
                         f"or loosen include/exclude")
    for name in targets + embeddings:
        if name not in quantized:
            kind = type(model.get_submodule(name)).__name__
            raise StageError(f"quantize: layer {name} was selected for {scheme} but is still a {kind} "
                             f"(not quantized; {sum(n in quantized for n in targets + embeddings)} of "
                             f"{len(targets) + len(embeddings)} selected layers were)")
    bound = WEIGHT_ERROR_BOUND[scheme] if bound is None else bound
    for name in targets:
        err = errors.get(name, math.nan)
        if not err <= bound:
            raise StageError(f"quantize: layer {name}: relative weight error {err:.4g} "
                             f"(||W_q - W|| / ||W||) exceeds the {scheme} bound {bound:g}; the quantized "
                             f"weights do not represent the layer")
    values = [errors[n] for n in targets]
    return {"weight_error_bound": bound,
            "weight_error_max": round(max(values), 5) if values else None,
            "weight_error_mean": round(sum(values) / len(values), 5) if values else None,
            "weight_error_worst_layer": max(targets, key=lambda n: errors[n]) if targets else None}


def _probe_ids(rows: int, device: torch.device) -> torch.Tensor:
    if rows <= _PROBE_ROWS:
        return torch.arange(rows, device=device).unsqueeze(0)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, rows, (1, _PROBE_ROWS), generator=g).to(device)


def check_embedding(name: str, dense: nn.Module, replaced: nn.Module, bits: str) -> float:
    """Promise 3: the replacement's lookups match the float module's (its own forward, scale included)."""
    ids = _probe_ids(dense.num_embeddings, dense.weight.device)
    with torch.no_grad():
        err = relative_error(replaced(ids), dense(ids))
    bound = EMBEDDING_ERROR_BOUND[bits]
    if not err <= bound:
        raise StageError(f"quantize.embeddings: layer {name}: the {bits} embedding's output differs from the "
                         f"float {type(dense).__name__}'s by {err:.4g} (relative, over {ids.numel()} rows; "
                         f"bound {bound:g}); the replacement does not keep the embedding's forward")
    return err


def check_tied(model: nn.Module, name: str, dense_table: torch.Tensor) -> None:
    """Promise 4 for an embedding `name` whose float table `dense_table` the output head shared."""
    head = model.get_output_embeddings()
    source = model.get_submodule(name)
    if not (isinstance(head, TiedQuantHead) and head.source is source and isinstance(source, QuantEmbedding)):
        raise StageError(f"quantize.embeddings: layer {name} was tied to the output head, but after "
                         f"quantization the head is a {type(head).__name__} that does not read it; a tied "
                         f"table must be quantized once and stay tied")
    copies = [n for n, p in model.named_parameters() if p is dense_table or (
        p.shape == dense_table.shape and p.is_floating_point() and p.data_ptr() == dense_table.data_ptr())]
    if copies:
        raise StageError(f"quantize.embeddings: layer {name}: the float table "
                         f"({dense_table.numel()} weights) is still in the model as {copies[0]}; a tied "
                         f"table must be stored once, quantized")

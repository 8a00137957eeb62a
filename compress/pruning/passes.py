"""How each unstructured / N:M method makes its keep-masks over a model: one generator per method,
each yielding (layer name, keep-mask) as layers are decided. The prune stage applies and checks the
masks; benchmarks call the same passes so they prune exactly as the stage does.

`sparsity` is the share to prune per layer (uniform, per-layer, or OWL's); `nm` an (n, m) pattern,
which then decides instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from compress.calibration.sequential import fit_sequentially
from compress.pruning import sparsegpt
from compress.pruning.masks import magnitude_score, nm_mask, unstructured_mask, wanda_score
from compress.pruning.targets import oriented

Masks = Iterator[tuple[str, torch.Tensor]]


def score_masks(method: str, linears: dict[str, torch.nn.Module], norms: dict[str, torch.Tensor],
                sparsity: dict[str, float], nm: tuple[int, int] | None) -> Masks:
    """Magnitude or one-pass Wanda (input norms of the unpruned model): a keep-mask per layer from a
    score, weights left as they are."""
    for name, lin in linears.items():
        weight = oriented(lin)  # (out, in) for Conv1D too, so rows are outputs and N:M runs along inputs
        score = wanda_score(weight, norms[name]) if method == "wanda" else magnitude_score(weight)
        if nm is not None:
            yield name, nm_mask(score, *nm)
        else:
            yield name, unstructured_mask(score, sparsity[name], per_row=method == "wanda")


def sparsegpt_masks(model: Any, linears: dict[str, torch.nn.Module], batches: list, sparsity: dict[str, float],
                    nm: tuple[int, int] | None) -> Masks:
    """SparseGPT block by block; each layer's weights are pruned and updated in place."""

    def prune_layer(name: str, lin: torch.nn.Module, hessian: torch.Tensor) -> torch.Tensor:
        share = sparsity[name] if nm is None else 0.0
        weight, mask = sparsegpt.sparsegpt_prune(oriented(lin), hessian, share, nm)
        oriented(lin).copy_(weight)
        return mask

    return sparsegpt.prune_sequentially(model, linears, batches, prune_layer)


def wanda_sequential_masks(model: Any, linears: dict[str, torch.nn.Module], batches: list,
                           sparsity: dict[str, float], nm: tuple[int, int] | None) -> Masks:
    """Wanda block by block: each layer's input norms from the outputs of the blocks pruned before it
    (the shared loop SparseGPT and GPTQ use, collecting only the Hessian's diagonal, ||X_j||² / n)."""

    def prune_layer(name: str, lin: torch.nn.Module, diagonal: torch.Tensor) -> torch.Tensor:
        # The 1/n scale of the diagonal does not change a ranking within a row or an N:M group.
        score = wanda_score(oriented(lin), diagonal.sqrt())
        mask = nm_mask(score, *nm) if nm is not None else unstructured_mask(score, sparsity[name], per_row=True)
        oriented(lin).mul_(mask.to(lin.weight.dtype))  # now, so the next block's inputs see it pruned
        return mask

    return fit_sequentially(model, linears, batches, prune_layer, field="targets", diagonal=True)

"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer and update its remaining weights so the
layer's output on calibration inputs changes as little as possible.

Written here rather than imported: llm-compressor's SparseGPTModifier runs only inside its own
session/`oneshot` lifecycle and pins its own transformers range, and the algorithm itself is the
short loop below, following the authors' reference code (IST-DASLab/sparsegpt).

The layer's inputs X (real tokens only) give H = XᵀX / n. Columns are visited left to right in blocks;
each pruned weight's error is spread onto the not-yet-visited columns through the Cholesky factor of
H⁻¹ (the optimal brain surgeon update), so later weights compensate for earlier removals.
Blocks of a model are pruned in order, each measured on the outputs of the already-pruned blocks
before it, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from compress.calibration.sequential import fit_sequentially
from compress.errors import StageError
from compress.hessian import HessianError, damped_inverse_factor


def prune_sequentially(model: Any, linears: dict[str, torch.nn.Linear], batches: list[dict[str, torch.Tensor]],
                       prune_layer: Callable[[str, torch.nn.Linear, torch.Tensor], torch.Tensor]
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Prune block after block, each measured on the outputs of the already-pruned blocks before it
    (the shared loop of `compress.calibration.sequential`, which GPTQ uses too).
    `prune_layer(name, linear, hessian)` prunes one layer in place and returns its keep-mask."""

    def fit(name: str, linear: torch.nn.Module, hessian: torch.Tensor) -> torch.Tensor:
        try:
            return prune_layer(name, linear, hessian)  # type: ignore[arg-type]
        except HessianError as exc:
            raise StageError(f"method: sparsegpt: layer {name}: {exc}; calibrate on more data "
                             f"(calibration_samples) or use method: wanda") from None

    yield from fit_sequentially(model, linears, batches, fit, field="targets")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None, block_size: int = 128,
                    damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned and updated weight, and its keep-mask (True = kept).

    `sparsity` is the share removed (unstructured, chosen per block of columns across all rows);
    `nm=(n, m)` keeps n of every m consecutive inputs instead. `damp` adds that share of H's mean
    diagonal, which keeps the Cholesky factorisation stable. Raises compress.hessian.HessianError when
    the damped Hessian is not positive definite.
    """
    # Dead inputs zeroed, damping and the factor of H⁻¹: the core shared with GPTQ.
    W, Hinv, dead = damped_inverse_factor(weight, hessian, damp)
    _rows, cols = W.shape
    drop = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        if nm is None:
            score = W1 ** 2 / d.unsqueeze(0) ** 2
            k = int(score.numel() * sparsity)
            drop1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                drop1.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
        else:
            drop1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = W1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2
                drop1.scatter_(1, i + torch.topk(group, nm[1] - nm[0], dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(drop1[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, start:end] = W1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
        drop[:, start:end] = drop1
    keep = ~drop & ~dead.unsqueeze(0)
    return (W * keep).to(weight.dtype), keep

"""Keep-masks (True = keep) for unstructured and N:M pruning, from magnitude or Wanda scores."""

from __future__ import annotations

import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: a weight matters as much as the activations it multiplies (Sun et al. 2023)."""
    return weight.detach().abs().float() * input_norm.to(weight.device).float().unsqueeze(0)


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Drop the `sparsity` share of lowest scores, over the whole matrix or within each output row.

    Wanda compares weights within an output row (each output keeps the same share of its inputs);
    magnitude pruning classically ranks the whole layer.
    """
    if sparsity <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if per_row:
        k = int(score.shape[1] * sparsity)
        if k == 0:
            return torch.ones_like(score, dtype=torch.bool)
        drop = torch.topk(score, k, dim=1, largest=False).indices
        mask = torch.ones_like(score, dtype=torch.bool)
        mask.scatter_(1, drop, False)
        return mask
    k = int(score.numel() * sparsity)
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    drop = torch.topk(score.flatten(), k, largest=False).indices
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    mask[drop] = False
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive inputs of each output row.

    This is the layout sparse tensor cores accelerate (2:4); groups run along the input dimension.
    """
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"input dimension {cols} is not divisible by M={m}")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, keep, True)
    return mask.reshape(rows, cols)


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive inputs holds at most `n` non-zeros."""
    rows, cols = weight.shape
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(2)
    return bool((nonzero <= n).all())

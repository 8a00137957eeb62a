"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity").

Uniform sparsity prunes every block alike, but blocks differ in how many *outlier* weights they
hold (Wanda scores |W_ij|·||X_j|| far above their block's mean), and those outliers carry the
model. OWL gives each block a sparsity that falls as its outlier ratio rises, spread over
[target − λ, target + λ] and averaging the target, so the model's overall sparsity is unchanged.

Written here (about 40 lines) because no maintained library exposes it: the authors' code is a
research script tied to its own LLaMA loop, and llm-compressor 0.14 has no layer-wise allocation.
It follows the authors' `prune_wanda_outlier` (ratios from the dense model's Wanda scores, one per
decoder block, min-max scaled to [0, 2λ], re-centred on the target).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from compress.pruning.masks import wanda_score
from compress.pruning.targets import oriented

_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj" -> "model.layers.3"


def block_of(layer_name: str) -> str | None:
    """The repeated block a layer belongs to (its name up to the first index), None outside blocks."""
    found = _BLOCK.match(layer_name)
    return found.group(1) if found else None


def outlier_ratios(linears: dict[str, torch.nn.Module], norms: dict[str, torch.Tensor],
                   threshold: float) -> dict[str, float]:
    """Per block: the share of its layers' Wanda scores above `threshold` × their mean."""
    blocks: dict[str, list[str]] = defaultdict(list)
    for name in linears:
        block = block_of(name)
        if block is not None:
            blocks[block].append(name)
    ratios = {}
    for block, names in blocks.items():
        scores = torch.cat([wanda_score(oriented(linears[n]), norms[n]).flatten() for n in names])
        ratios[block] = float((scores > threshold * scores.mean()).float().mean())
    return ratios


def block_sparsities(ratios: dict[str, float], target: float, spread: float) -> dict[str, float]:
    """OWL's allocation: more outliers, less sparsity; values in [target − spread, target + spread]
    with mean `target` (equal-sized blocks keep the overall sparsity)."""
    if not ratios:
        return {}
    values = torch.tensor(list(ratios.values()), dtype=torch.float64)
    width = float(values.max() - values.min())
    if width == 0:  # no block stands out: uniform
        return dict.fromkeys(ratios, target)
    scaled = (values - values.min()) / width * 2 * spread
    sparsity = target - (scaled - scaled.mean())
    return {block: round(float(s), 6) for block, s in zip(ratios, sparsity, strict=True)}


def layer_sparsities(linears: dict[str, torch.nn.Module], blocks: dict[str, float],
                     target: float) -> dict[str, float]:
    """Each layer's sparsity: its block's, or the target for layers outside the blocks."""
    return {name: blocks.get(block_of(name) or "", target) for name in linears}

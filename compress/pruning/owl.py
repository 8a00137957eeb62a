"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity").

Uniform sparsity prunes every block alike, but blocks differ in how many *outlier* weights they
hold (Wanda scores |W_ij|·||X_j|| far above their block's mean), and those outliers carry the
model. OWL gives each block a sparsity that falls as its outlier ratio rises: the ratios are min-max
scaled onto a span of 2λ and re-centred so the blocks average the target, so the model's overall
sparsity is unchanged. As in the authors' code (not the paper's "[S − λ, S + λ]" wording) the span is
centred on the mean, not on the target: a lone outlier block sits almost 2λ below the target and the
others a little above it.

Written here (about 40 lines) because no maintained library exposes it: the authors' code is a
research script tied to its own LLaMA loop, and llm-compressor 0.14's (`sparsity_profile="owl"`) fails
inside its own `oneshot` on two bugs (bench/peer_llmc.py patches them to run it side by side).
It follows the authors' `prune_wanda_outlier` (ratios from the dense model's Wanda scores, one per
decoder block, min-max scaled to [0, 2λ], re-centred on the target).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from compress.errors import StageError
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
    """OWL's allocation: more outliers, less sparsity; the most and least pruned blocks are 2 × `spread`
    apart and the mean is `target` (equal-sized blocks keep the overall sparsity).

    The span is centred on the blocks' mean, so a block can move up to almost 2 × `spread` from the
    target (the recipe's `sparsity ± owl_spread` check does not bound it); a block pushed outside
    [0, 1) is a StageError naming `owl_spread`, not a silently clipped (and so off-target) allocation.
    """
    if not ratios:
        return {}
    values = torch.tensor(list(ratios.values()), dtype=torch.float64)
    width = float(values.max() - values.min())
    if width == 0:  # no block stands out: uniform
        return dict.fromkeys(ratios, target)
    scaled = (values - values.min()) / width * 2 * spread
    sparsity = target - (scaled - scaled.mean())
    outside = {block: round(float(s), 4) for block, s in zip(ratios, sparsity, strict=True) if not 0 <= s < 1}
    if outside:
        raise StageError(f"owl_spread: {spread} around sparsity {target} gives block sparsities outside "
                         f"[0, 1) for {outside} (OWL's span is centred on the blocks' mean, so a block "
                         f"can move up to 2 x owl_spread); lower owl_spread or sparsity")
    return {block: round(float(s), 6) for block, s in zip(ratios, sparsity, strict=True)}


def layer_sparsities(linears: dict[str, torch.nn.Module], blocks: dict[str, float],
                     target: float) -> dict[str, float]:
    """Each layer's sparsity: its block's, or the target for layers outside the blocks."""
    return {name: blocks.get(block_of(name) or "", target) for name in linears}

"""What a prune stage promises, checked on the model it returns (StageError naming the layer and the
number when it does not hold): masked weights are zero, each layer reaches its sparsity or N:M
pattern, and a structurally pruned model has exactly the shapes its rewritten config builds, so
plain `from_pretrained` reloads it."""

from __future__ import annotations

from typing import Any

import torch

from compress.errors import StageError
from compress.pruning.masks import check_nm
from compress.pruning.targets import oriented


def check_masked(stage: str, linears: dict[str, Any], masks: dict[str, torch.Tensor],
                 targets: dict[str, float] | None, nm: tuple[int, int] | None) -> None:
    """Every pruned layer: zeros wherever its mask drops, and at least its target sparsity (less at most
    one weight per row of rounding, the coarsest any method rounds) or its N:M pattern."""
    for name, layer in linears.items():
        weight, mask = layer.weight.detach(), masks[f"{name}.weight"].to(layer.weight.device)
        alive = int((weight[~mask] != 0).sum())
        if alive:
            raise StageError(f"{stage}: layer {name} holds {alive} non-zero weights where its mask prunes; "
                             f"the mask was not applied")
        w = oriented(layer).detach()
        if nm is not None:
            if not check_nm(w, *nm):
                worst = int((w.reshape(w.shape[0], -1, nm[1]) != 0).sum(-1).max())
                raise StageError(f"{stage}: layer {name} breaks the {nm[0]}:{nm[1]} pattern: a group of "
                                 f"{nm[1]} inputs keeps {worst} non-zero weights (at most {nm[0]} allowed)")
            continue
        target = targets[name]
        measured = float((w == 0).sum()) / w.numel()
        if measured < target - 1 / w.shape[1] - 1e-9:
            raise StageError(f"{stage}: layer {name} reached sparsity {measured:.4f}, below its target "
                             f"{target:.4f} (allowed rounding {1 / w.shape[1]:.4f})")


def check_reloadable(stage: str, model: Any, task: str) -> None:
    """The pruned model's parameter shapes equal those of a model built from its (rewritten) config,
    which is what `from_pretrained` will build before loading the weights."""
    from compress.bundle import auto_class

    with torch.device("meta"):
        fresh = auto_class(task).from_config(model.config)
    built = {n: tuple(p.shape) for n, p in fresh.named_parameters()}
    for name, param in model.named_parameters():
        if name not in built:
            raise StageError(f"{stage}: parameter {name} {tuple(param.shape)} has no place in a model built "
                             f"from the pruned config, so from_pretrained would drop it")
        if built[name] != tuple(param.shape):
            raise StageError(f"{stage}: parameter {name} has shape {tuple(param.shape)} but the pruned config "
                             f"builds {built[name]}, so from_pretrained could not reload it")

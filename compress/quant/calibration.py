"""Calibration: run recipe data through the model and record what each target layer sees.

Examples come from the recipe's data section (`ctx.data.calibration(n, seed)`), tokenised like
training data, and run one at a time so no padding token pollutes the statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.errors import StageError


def calibration_inputs(bundle: Any, ctx: Any, samples: int | None,
                       seed: int) -> list[dict[str, torch.Tensor]]:
    """Up to `samples` tokenised examples (one per dict, batch 1) drawn with `seed`."""
    from compress.data import tokenize

    data = ctx.require_data("quantize")
    rows = data.calibration(samples, seed)
    encoded = tokenize(rows, bundle.tokenizer, data.spec, bundle.task)
    limit = samples or data.spec.calibration_samples
    out = []
    for row in encoded.select(range(min(limit, len(encoded)))):
        ids = torch.tensor([row["input_ids"]])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    if not out:
        raise StageError("quantize.calibration_samples: the calibration set is empty; "
                         "add training data or lower data.max_length")
    return out


class LayerStats:
    """Per input channel absolute maximum and (optionally) the GPTQ Hessian 2/n * X^T X."""

    def __init__(self, in_features: int, hessian: bool):
        self.absmax = torch.zeros(in_features)
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        if self.hessian is not None:
            x64 = x.double()
            self.hessian += 2 * x64.T @ x64
        self.rows += x.shape[0]

    def mean_hessian(self) -> torch.Tensor:
        assert self.hessian is not None
        return (self.hessian / max(self.rows, 1)).float()


@torch.no_grad()
def collect_stats(model: nn.Module, names: list[str], inputs: list[dict[str, torch.Tensor]], device: str,
                  hessian: bool = False) -> dict[str, LayerStats]:
    """Run `inputs` through `model` with hooks on the named linear layers; return their statistics."""
    from compress.quant.select import in_out

    modules = dict(model.named_modules())
    stats = {n: LayerStats(in_out(modules[n])[0], hessian) for n in names}
    handles = [modules[n].register_forward_pre_hook(lambda _m, args, n=n: stats[n].add(args[0]))
               for n in names]
    was_training = model.training
    model.eval()
    try:
        for batch in inputs:
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats

"""Running calibration batches through a model, and the hooks that measure what layers see.

Padding tokens would dilute every statistic, so each batch's attention mask is published to the hooks
(`Tokens`) and only real tokens are counted. Wanda (`input_norms`), SparseGPT (`hessian_hooks`,
`input_hessians`), GPTQ and SmoothQuant (`input_stats`) and structured importance all measure through
`forward_all` and `forward_hooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from compress.hessian import HessianSum


def to_device(batch: dict[str, torch.Tensor], device: Any, labels: bool) -> dict[str, torch.Tensor]:
    """The batch on `device`; `labels` dropped unless asked for (a loss is not needed to measure)."""
    return {k: v.to(device) for k, v in batch.items() if labels or k != "labels"}


class Tokens:
    """The current batch's attention mask, so hooks keep only real tokens."""

    mask: torch.Tensor | None = None

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten `x` (batch, seq, features) to (real tokens, features)."""
        if self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape:
            return x[self.mask]
        return x.reshape(-1, x.shape[-1])


@contextmanager
def forward_hooks(modules: dict[str, torch.nn.Module], hook_fn: Callable[[str], Callable]) -> Iterator[None]:
    """Register `hook_fn(name)` as a forward hook on each module for the duration of the block."""
    handles = [m.register_forward_hook(hook_fn(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def forward_all(model: Any, batches: list[dict[str, torch.Tensor]], tokens: Tokens) -> None:
    """Run every batch through `model` (eval mode, no gradients), publishing each mask to `tokens`."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for batch in batches:
            inputs = to_device(batch, device, labels=False)
            tokens.mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
            model(**inputs)


def input_norms(model: Any, modules: dict[str, torch.nn.Module],
                batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per module, the L2 norm of each input channel over all calibration tokens (Wanda's ||X_j||)."""
    sums: dict[str, torch.Tensor | None] = dict.fromkeys(modules)
    tokens = Tokens()

    def make(name: str):
        def hook(_module, args, _output):
            x = tokens.real(args[0].detach()).float()
            sq = (x * x).sum(0)
            sums[name] = sq if sums[name] is None else sums[name] + sq
        return hook

    with forward_hooks(modules, make):
        forward_all(model, batches, tokens)
    return {name: s.sqrt().cpu() for name, s in sums.items() if s is not None}


def hessian_hooks(modules: dict[str, torch.nn.Module], tokens: Tokens, diagonal: bool = False
                  ) -> tuple[Any, Callable[[], dict[str, torch.Tensor]]]:
    """(hooks context, result): while the context is open, each module's real-token inputs are summed
    into XᵀX; `result()` gives H = XᵀX / n per module that was called (`diagonal`: only its diagonal)."""
    sums: dict[str, HessianSum] = {}

    def make(name: str):
        def hook(_module, args, _output):
            x = tokens.real(args[0].detach())
            if name not in sums:
                sums[name] = HessianSum(x.shape[-1], x.device, diagonal)
            sums[name].add(x)
        return hook

    def result() -> dict[str, torch.Tensor]:
        return {name: s.mean() for name, s in sums.items()}

    return forward_hooks(modules, make), result


def input_hessians(model: Any, modules: dict[str, torch.nn.Module],
                   batches: list[dict[str, torch.Tensor]], diagonal: bool = False) -> dict[str, torch.Tensor]:
    """Per module, XᵀX / n (or its diagonal) over the real tokens of its inputs, from full forward passes."""
    tokens = Tokens()
    hooks, result = hessian_hooks(modules, tokens, diagonal)
    with hooks:
        forward_all(model, batches, tokens)
    return result()


class InputStats:
    """Per input channel absolute maximum (SmoothQuant) and mean absolute value (AWQ), and optionally
    the Hessian XᵀX / n (GPTQ, AWQ)."""

    def __init__(self, in_features: int, hessian: bool):
        self.absmax = torch.zeros(in_features)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.rows = 0
        self.hessian = HessianSum(in_features) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        """Add real-token inputs `x` (tokens, features)."""
        magnitude = x.detach().float().abs()
        self.absmax = torch.maximum(self.absmax, magnitude.amax(dim=0).cpu())
        self.abs_sum += magnitude.sum(dim=0).cpu().double()
        self.rows += magnitude.shape[0]
        if self.hessian is not None:
            self.hessian.add(x)

    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per input channel over the real tokens seen (zeros when none was)."""
        return (self.abs_sum / max(self.rows, 1)).float()

    def mean_hessian(self) -> torch.Tensor:
        """H = XᵀX / n (zeros for a layer that never ran: GPTQ then treats every input as dead)."""
        if self.hessian is None:
            raise ValueError("these statistics were collected without the Hessian (hessian=False)")
        return self.hessian.mean()


def _in_features(module: torch.nn.Module) -> int:
    # nn.Linear and its subclasses name it; transformers' Conv1D stores its weight as (in, out).
    return getattr(module, "in_features", None) or module.weight.shape[0]


def input_stats(model: Any, modules: dict[str, torch.nn.Module], batches: list[dict[str, torch.Tensor]],
                hessian: bool = False) -> dict[str, InputStats]:
    """Run the calibration batches through `model`; per module, what its inputs were (real tokens)."""
    stats = {name: InputStats(_in_features(m), hessian) for name, m in modules.items()}
    tokens = Tokens()

    def make(name: str):
        def hook(_module, args, _output):
            stats[name].add(tokens.real(args[0]))
        return hook

    was_training = model.training
    try:
        with forward_hooks(modules, make):
            forward_all(model, batches, tokens)
    finally:
        model.train(was_training)
    return stats

"""Calibration batches and the forward hooks that measure activations on them.

Padding tokens would dilute every statistic, so each batch's attention mask is published to the
hooks (`_Tokens`) and only real tokens are counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from compress.errors import StageError


def calibration_batches(bundle: Any, data: Any, n: int | None, seed: int, batch_size: int = 8,
                        field: str = "calibration_samples") -> list[dict[str, torch.Tensor]]:
    """`n` tokenised training examples (LM blocks or labelled texts) in padded batches."""
    from compress.data import pad_collate

    if data is None:
        raise StageError(f"{field}: this stage needs calibration data, but the recipe has no data section; "
                         f"add a data section (a few hundred training examples are enough)")
    rows = data.tokenized("train", bundle.tokenizer)
    n = min(n or data.spec.calibration_samples, len(rows))
    rows = rows.shuffle(seed=seed).select(range(n))
    collate = pad_collate(bundle.tokenizer)
    return [collate([rows[j] for j in range(i, min(i + batch_size, n))]) for i in range(0, n, batch_size)]


def _to(batch: dict[str, torch.Tensor], device: Any, labels: bool) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if labels or k != "labels"}


class _Tokens:
    """The current batch's attention mask, so hooks keep only real tokens."""

    mask: torch.Tensor | None = None

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten `x` (batch, seq, features) to (real tokens, features)."""
        if self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape:
            return x[self.mask]
        return x.reshape(-1, x.shape[-1])


@contextmanager
def _hooks(modules: dict[str, torch.nn.Module], hook_fn) -> Iterator[None]:
    handles = [m.register_forward_hook(hook_fn(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward_all(model: Any, batches: list[dict[str, torch.Tensor]], tokens: _Tokens) -> None:
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for batch in batches:
            inputs = _to(batch, device, labels=False)
            tokens.mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
            model(**inputs)


def input_norms(model: Any, modules: dict[str, torch.nn.Module],
                batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per module, the L2 norm of each input channel over all calibration tokens (Wanda's ||X_j||)."""
    sums = {name: None for name in modules}
    tokens = _Tokens()

    def make(name: str):
        def hook(_module, args, _output):
            x = tokens.real(args[0].detach()).float()
            sq = (x * x).sum(0)
            sums[name] = sq if sums[name] is None else sums[name] + sq
        return hook

    with _hooks(modules, make):
        _forward_all(model, batches, tokens)
    return {name: s.sqrt().cpu() for name, s in sums.items() if s is not None}


def block_influence(model: Any, layers: list[torch.nn.Module],
                    batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Per layer, mean (1 - cosine(input, output)) over real tokens: how much the block changes the
    hidden state (ShortGPT's Block Influence). Low means the layer is close to the identity."""
    totals = torch.zeros(len(layers))
    counts = torch.zeros(len(layers))
    tokens = _Tokens()

    def make(index: int):
        def hook(_module, args, kwargs, output):
            h_in = args[0] if args else kwargs.get("hidden_states")
            h_out = output[0] if isinstance(output, tuple) else output
            if h_in is None or h_out.shape != h_in.shape:
                return
            a, b = tokens.real(h_in.detach()).float(), tokens.real(h_out.detach()).float()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            totals[index] += (1 - cos).sum().cpu()
            counts[index] += cos.numel()
        return hook

    handles = [layer.register_forward_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _forward_all(model, batches, tokens)
    finally:
        for h in handles:
            h.remove()
    if (counts == 0).any():
        raise StageError("importance: could not observe every layer's input and output; "
                         "use importance: taylor for this architecture")
    return totals / counts


def accumulate_gradients(model: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Gradients of the model's own loss summed over the calibration batches (for Taylor scores)."""
    device = next(model.parameters()).device
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model.eval()  # no dropout: the score should describe the model as it will be used
    try:
        for batch in batches:
            if "labels" not in batch:
                raise StageError("importance: taylor needs labelled calibration data (the model's loss)")
            model(**_to(batch, device, labels=True)).loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return grads

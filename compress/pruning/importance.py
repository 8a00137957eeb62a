"""How much each head group, FFN channel or layer matters, by a stated criterion.

- weight:     L2 norms of the weights that read from and write to the unit (data-free).
- activation: norm of the unit's output activations on calibration data times the norm of the
              weights that carry it onward (the structured analogue of Wanda); for layers, how much
              the block changes the hidden state (1 - cosine, ShortGPT's Block Influence).
- taylor:     |sum of weight * gradient| over the unit's weights: the first-order estimate of the
              loss change when the unit is removed (Molchanov et al. 2019).
Higher is more important; the lowest-scoring units are removed.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.calibration import Tokens, forward_all, input_norms, to_device
from compress.errors import StageError
from compress.pruning.structured import Arch


def block_influence(model: Any, layers: list[torch.nn.Module],
                    batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Per layer, mean (1 - cosine(input, output)) over real tokens: how much the block changes the
    hidden state (ShortGPT's Block Influence). Low means the layer is close to the identity."""
    totals = torch.zeros(len(layers))
    counts = torch.zeros(len(layers))
    tokens = Tokens()

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
        forward_all(model, batches, tokens)
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
            model(**to_device(batch, device, labels=True)).loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return grads


def _names(model: Any) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _taylor(weight: torch.Tensor, grads: dict[str, torch.Tensor], names: dict[int, str]) -> torch.Tensor:
    grad = grads.get(names[id(weight)])
    if grad is None:
        return torch.zeros_like(weight, dtype=torch.float32)
    return (weight.detach().float() * grad.float())


def ffn_scores(model: Any, arch: Arch, importance: str, batches: list | None) -> list[torch.Tensor]:
    """Per layer, one score per intermediate channel."""
    if importance == "activation":
        norms = input_norms(model, {str(i): b.ffn_out for i, b in enumerate(arch.blocks)}, batches)
        return [norms[str(i)] * b.ffn_out.weight.detach().float().norm(dim=0).cpu()
                for i, b in enumerate(arch.blocks)]
    if importance == "taylor":
        grads, names = accumulate_gradients(model, batches), _names(model)
        out = []
        for b in arch.blocks:
            total = _taylor(b.ffn_out.weight, grads, names).sum(0)
            for lin in b.ffn_in:
                total = total + _taylor(lin.weight, grads, names).sum(1)
            out.append(total.abs().cpu())
        return out
    out = []
    for b in arch.blocks:
        reads = sum(lin.weight.detach().float().norm(dim=1) for lin in b.ffn_in)
        out.append((reads * b.ffn_out.weight.detach().float().norm(dim=0)).cpu())
    return out


def _per_group(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a per-row (or per-column) vector over equal, consecutive groups."""
    return values.reshape(groups, -1).sum(1)


def head_group_scores(model: Any, arch: Arch, importance: str, batches: list | None) -> list[torch.Tensor]:
    """Per layer, one score per key/value head group (a KV head with the query heads sharing it)."""
    g = arch.num_kv_heads
    if importance == "activation":
        norms = input_norms(model, {str(i): b.o for i, b in enumerate(arch.blocks)}, batches)
        return [_per_group(norms[str(i)] * b.o.weight.detach().float().norm(dim=0).cpu(), g)
                for i, b in enumerate(arch.blocks)]
    if importance == "taylor":
        grads, names = accumulate_gradients(model, batches), _names(model)
        out = []
        for b in arch.blocks:
            total = (_per_group(_taylor(b.q.weight, grads, names).sum(1), g)
                     + _per_group(_taylor(b.k.weight, grads, names).sum(1), g)
                     + _per_group(_taylor(b.v.weight, grads, names).sum(1), g)
                     + _per_group(_taylor(b.o.weight, grads, names).sum(0), g))
            out.append(total.abs().cpu())
        return out
    out = []
    for b in arch.blocks:
        def rows(lin: torch.nn.Linear) -> torch.Tensor:
            return _per_group(lin.weight.detach().float().pow(2).sum(1), g)
        cols = _per_group(b.o.weight.detach().float().pow(2).sum(0), g)
        out.append((rows(b.q) + rows(b.k) + rows(b.v) + cols).sqrt().cpu())
    return out


def layer_scores(model: Any, arch: Arch, importance: str, batches: list | None) -> torch.Tensor:
    """One score per layer."""
    if importance == "taylor":
        grads, names = accumulate_gradients(model, batches), _names(model)
        return torch.tensor([float(sum(_taylor(p, grads, names).sum() for p in b.layer.parameters()).abs())
                             for b in arch.blocks])
    return block_influence(model, [b.layer for b in arch.blocks], batches)

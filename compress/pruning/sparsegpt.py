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

import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from compress.calibration import Tokens, hessian_hooks, input_hessians, to_device
from compress.errors import StageError
from compress.hessian import HessianError, damped_inverse_factor

_BLOCK = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")


class _StopForward(Exception):
    """Raised by a hook once the block being calibrated has its inputs: later blocks are not needed."""


def sequential_groups(linears: dict[str, torch.nn.Linear]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """Target layers grouped by transformer block (`model.layers.3`), in model order; layers outside
    any block form a last group (None)."""
    groups: dict[str | None, dict[str, Any]] = {}
    for name, lin in linears.items():
        m = _BLOCK.match(name)
        groups.setdefault(m[1] if m else None, {})[name] = lin
    outside = groups.pop(None, None)
    yield from groups.items()
    if outside:
        yield None, outside


def _follows(block: str, previous: str | None) -> bool:
    """True when `block` is the next entry of the same layer list (model.layers.4 after model.layers.3)."""
    if previous is None:
        return False
    a, _, i = block.rpartition(".")
    b, _, j = previous.rpartition(".")
    return a == b and int(i) == int(j) + 1


# One captured call of a block: its positional and keyword arguments, and the batch's attention mask.
_Call = tuple[tuple, dict, "torch.Tensor | None"]


def capture_block_inputs(model: Any, blocks: list[torch.nn.Module],
                         batches: list[dict[str, torch.Tensor]]) -> list[list[_Call]]:
    """Per block of `blocks` (consecutive entries of one layer list), its call on every batch, from one
    forward pass that stops after the last of them.

    Every block keeps its *own* arguments, because they differ between layers: Gemma2/3 and ModernBERT
    alternate sliding-window and global attention masks, and Gemma3 even rotary tables. Only the first
    block's hidden state is kept (later ones are None, filled in by `replay_block` from the pruned
    block before), so memory holds one layer's activations, not all of them.

    The KV cache is dropped, found by its type rather than its keyword: transformers 5.24 renamed the
    layers' `past_key_values` argument to `cache`, and a cache left in place grows on every replay
    (the attention then sees 2x the keys its mask was built for)."""
    from transformers.cache_utils import Cache

    calls: list[list[_Call]] = [[] for _ in blocks]

    def make(index: int):
        def pre(_module, args, kwargs):
            args = tuple(None if isinstance(a, Cache) else a for a in args)
            kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            if index and args:
                args = (None, *args[1:])
            elif index:
                kwargs["hidden_states"] = None
            calls[index].append((args, kwargs, None))
            if index == len(blocks) - 1:
                raise _StopForward
        return pre

    device = next(model.parameters()).device
    handles = [b.register_forward_pre_hook(make(i), with_kwargs=True) for i, b in enumerate(blocks)]
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = to_device(batch, device, labels=False)
                try:
                    model(**inputs)
                except _StopForward:
                    pass
                mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
                for block_calls in calls:
                    if len(block_calls) != len(calls[0]):
                        raise StageError("method: sparsegpt could not capture every block's inputs (a block "
                                         "was skipped in the forward pass); use method: wanda")
                    block_calls[-1] = (*block_calls[-1][:2], mask)
    finally:
        for h in handles:
            h.remove()
    return calls


def replay_block(block: torch.nn.Module, calls: list[_Call], tokens: Tokens | None = None,
                 next_calls: list[_Call] | None = None) -> list[_Call]:
    """Run `block` on captured calls; return the calls the next block receives: its output as the
    hidden state, in `next_calls` (the next block's own captured arguments) or else in `calls`."""
    out = []
    with torch.no_grad():
        for i, (args, kwargs, mask) in enumerate(calls):
            if tokens is not None:
                tokens.mask = mask
            result = block(*args, **kwargs)
            hidden = result[0] if isinstance(result, tuple) else result
            n_args, n_kwargs, _ = next_calls[i] if next_calls is not None else (args, kwargs, mask)
            if n_args:
                out.append(((hidden, *n_args[1:]), n_kwargs, mask))
            else:
                out.append(((), {**n_kwargs, "hidden_states": hidden}, mask))
    return out


# Full-pass Hessians, under the name callers of this module know.
hessians = input_hessians


def prune_sequentially(model: Any, linears: dict[str, torch.nn.Linear], batches: list[dict[str, torch.Tensor]],
                       prune_layer: Callable[[str, torch.nn.Linear, torch.Tensor], torch.Tensor]
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Prune block after block, each measured on the outputs of the already-pruned blocks before it.

    A block's inputs are captured once; consecutive blocks then replay only themselves, so the whole
    pass costs about two forward passes of the model instead of one per block.
    `prune_layer(name, linear, hessian)` prunes one layer in place and returns its keep-mask.
    """
    modules = dict(model.named_modules())
    groups = list(sequential_groups(linears))
    frames: dict[str, list[_Call]] = {}
    calls: list[_Call] | None = None
    for index, (block, group) in enumerate(groups):
        if block is None:  # layers outside the blocks: measure on full passes
            found = hessians(model, group, batches)
        else:
            if calls is None:
                run = [block]  # this block and the consecutive ones after it: one capture serves them all
                for later, _ in groups[index + 1:]:
                    if later is None or not _follows(later, run[-1]):
                        break
                    run.append(later)
                frames = dict(zip(run, capture_block_inputs(model, [modules[n] for n in run], batches),
                                  strict=True))
                calls = frames[block]
            tokens = Tokens()
            hooks, result = hessian_hooks(group, tokens)
            with hooks:
                replay_block(modules[block], calls, tokens)
            found = result()
        for name, lin in group.items():
            if name not in found:
                raise StageError(f"targets: {name} is never called on the calibration data, so SparseGPT has no inputs to fit it on; exclude it")
            try:
                mask = prune_layer(name, lin, found.pop(name))
            except HessianError as exc:
                raise StageError(f"method: sparsegpt: layer {name}: {exc}; calibrate on more data "
                                 f"(calibration_samples) or use method: wanda") from None
            yield name, mask
        if block is not None:
            following = groups[index + 1][0] if index + 1 < len(groups) else None
            calls = (replay_block(modules[block], calls, next_calls=frames[following])
                     if following in frames else None)


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

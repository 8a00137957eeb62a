"""Fitting layers block by block, each on inputs that already pass through the fitted layers before it.

SparseGPT and GPTQ's reference code both work this way: a transformer block's inputs are captured once,
its layers are fitted (pruned, quantized) on Hessians measured by replaying the block, and the fitted
block's outputs become the next block's inputs. With `split_blocks`, layers inside a block are fitted in
the order data reaches them as well (GPTQ's `true_sequential`): q/k/v, then o on the attention output of
the already-quantized q/k/v, then gate/up, then down, each sub-group's Hessian from a fresh replay.

Sub-groups are found, not named: layers called one after another on the very same input tensor (q, k
and v read one normed hidden state; gate and up another) form one sub-group, in call order. That holds
for every architecture's naming (GPT-2's c_attn, Falcon's fused query_key_value, BERT's query/key/value)
without a table of layer names.

SparseGPT (`compress.pruning.sparsegpt`) and GPTQ (`compress.quant.schemes.gptq`) both fit through
`fit_sequentially`; only the per-layer fit differs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from compress.calibration.forward import Tokens, forward_hooks, hessian_hooks, input_hessians, to_device
from compress.errors import StageError

# fit(name, module, hessian) fits one layer (in place, or by swapping it in the model) and returns
# whatever the caller wants back for it (SparseGPT: the keep-mask).
Fit = Callable[[str, torch.nn.Module, torch.Tensor], Any]


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
                        raise StageError("calibration could not capture every block's inputs (a block was "
                                         "skipped in the forward pass); use a method that needs no block "
                                         "replay (prune: wanda; quantize: int4-weight)")
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


def next_in_list(block: str, previous: str | None) -> bool:
    """True when `block` is the next entry of the same layer list (model.layers.4 after model.layers.3)."""
    if previous is None:
        return False
    a, _, i = block.rpartition(".")
    b, _, j = previous.rpartition(".")
    return a == b and i.isdigit() and j.isdigit() and int(i) == int(j) + 1


def input_groups(order: list[str], inputs: dict[str, torch.Tensor]) -> list[list[str]]:
    """Layers in call order, those called one after another on the same input tensor grouped together."""
    groups: list[list[str]] = []
    for name in order:
        if groups and inputs[name] is inputs[groups[-1][-1]]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _replay_hessians(model: Any, block: torch.nn.Module, names: list[str], calls: list, replay: Callable,
                     record: bool = False, diagonal: bool = False) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Hessians (or their diagonals) of `names` (the modules the model holds now) from one replay of
    `block`; with `record`, also the layers' sub-groups (see `input_groups`)."""
    modules = {n: model.get_submodule(n) for n in names}
    tokens = Tokens()
    hooks, result = hessian_hooks(modules, tokens, diagonal)
    order: list[str] = []
    inputs: dict[str, torch.Tensor] = {}  # first call's input, kept alive so identity means something

    def make(name: str):
        def hook(_module, args, _output):
            if name not in inputs:
                inputs[name] = args[0]
                order.append(name)
        return hook

    with hooks, forward_hooks(modules if record else {}, make):
        replay(block, calls, tokens)
    return result(), input_groups(order, inputs) if record else [names]


def fit_sequentially(model: Any, linears: dict[str, torch.nn.Module], batches: list[dict[str, torch.Tensor]],
                     fit: Fit, split_blocks: bool = False, field: str = "include",
                     diagonal: bool = False) -> Iterator[tuple[str, Any]]:
    """Fit every layer of `linears` block after block; yields (name, fit's result) as each is fitted.
    `diagonal`: fit receives only the Hessian's diagonal (per input channel, XⱼᵀXⱼ / n), for a fit that
    needs no more (Wanda's input norms).

    A run of consecutive blocks is captured once and then each block replays only itself, so the pass
    costs about two forward passes of the model (plus one replay per sub-group with `split_blocks`).
    Layers outside any block are measured on full passes of the (already fitted) model.
    """
    modules = dict(model.named_modules())
    groups = list(sequential_groups(linears))
    frames: dict[str, list] = {}
    calls: list | None = None
    for index, (block, group) in enumerate(groups):
        if block is None:
            order = [list(group)]
            found = input_hessians(model, {n: model.get_submodule(n) for n in group}, batches, diagonal)
        else:
            if calls is None:
                run = [block]  # this block and the consecutive ones after it: one capture serves them all
                for later, _ in groups[index + 1:]:
                    if later is None or not next_in_list(later, run[-1]):
                        break
                    run.append(later)
                frames = dict(zip(run, capture_block_inputs(model, [modules[n] for n in run], batches),
                                  strict=True))
                calls = frames[block]
            found, order = _replay_hessians(model, modules[block], list(group), calls, replay_block,
                                            record=split_blocks, diagonal=diagonal)
            missing = [n for n in group if n not in found]
            order = [[n for n in sub if n in found] for sub in order] + ([missing] if missing else [])
        for position, sub in enumerate(order):
            if position and block is not None:  # inputs now pass through the sub-groups fitted before
                found, _ = _replay_hessians(model, modules[block], sub, calls, replay_block, diagonal=diagonal)
            for name in sub:
                if name not in found:
                    raise StageError(f"{field}: layer {name} is never called on the calibration data, so "
                                     f"there are no inputs to fit it on; exclude it")
                yield name, fit(name, model.get_submodule(name), found.pop(name))
        if block is not None:
            following = groups[index + 1][0] if index + 1 < len(groups) else None
            calls = (replay_block(modules[block], calls, next_calls=frames[following])
                     if following in frames else None)

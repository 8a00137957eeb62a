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

The capture and replay of blocks are SparseGPT's (`compress.pruning.sparsegpt`), imported when called so
the calibration package does not depend on pruning at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from compress.calibration.forward import Tokens, forward_hooks, hessian_hooks, input_hessians
from compress.errors import StageError

# fit(name, module, hessian) fits one layer (in place, or by swapping it in the model) and returns
# whatever the caller wants back for it (SparseGPT: the keep-mask).
Fit = Callable[[str, torch.nn.Module, torch.Tensor], Any]


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
                     record: bool = False) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Hessians of `names` (the modules the model holds now) from one replay of `block`; with `record`,
    also the layers' sub-groups (see `input_groups`)."""
    modules = {n: model.get_submodule(n) for n in names}
    tokens = Tokens()
    hooks, result = hessian_hooks(modules, tokens)
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
                     fit: Fit, split_blocks: bool = False) -> Iterator[tuple[str, Any]]:
    """Fit every layer of `linears` block after block; yields (name, fit's result) as each is fitted.

    A run of consecutive blocks is captured once and then each block replays only itself, so the pass
    costs about two forward passes of the model (plus one replay per sub-group with `split_blocks`).
    Layers outside any block are measured on full passes of the (already fitted) model.
    """
    from compress.pruning.sparsegpt import capture_block_inputs, replay_block, sequential_groups

    modules = dict(model.named_modules())
    groups = list(sequential_groups(linears))
    frames: dict[str, list] = {}
    calls: list | None = None
    for index, (block, group) in enumerate(groups):
        if block is None:
            order = [list(group)]
            found = input_hessians(model, {n: model.get_submodule(n) for n in group}, batches)
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
                                            record=split_blocks)
            missing = [n for n in group if n not in found]
            order = [[n for n in sub if n in found] for sub in order] + ([missing] if missing else [])
        for position, sub in enumerate(order):
            if position and block is not None:  # inputs now pass through the sub-groups fitted before
                found, _ = _replay_hessians(model, modules[block], sub, calls, replay_block)
            for name in sub:
                if name not in found:
                    raise StageError(f"include: layer {name} is never called on the calibration data, so "
                                     f"there are no inputs to fit it on; exclude it")
                yield name, fit(name, model.get_submodule(name), found.pop(name))
        if block is not None:
            following = groups[index + 1][0] if index + 1 < len(groups) else None
            calls = (replay_block(modules[block], calls, next_calls=frames[following])
                     if following in frames else None)

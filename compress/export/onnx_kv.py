"""A causal LM's ONNX graph with its KV cache as inputs and outputs, so ONNX Runtime decodes token by token.

Inputs: `input_ids` (batch, seq), `attention_mask` (batch, past + seq), and per layer
`past.<i>.key` / `past.<i>.value` (batch, kv_heads, past, head_dim); outputs: `logits` and
`present.<i>.key` / `present.<i>.value` (the cache after this call). A prompt is run with an empty
cache (past length 0), then each new token with the cache the previous call returned. The wrapper
rebuilds transformers' `DynamicCache` from the tensors, which torch.onnx's dynamo exporter traces.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def cache_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv, head_dim


def past_names(layers: int) -> list[str]:
    return [f"past.{i}.{part}" for i in range(layers) for part in ("key", "value")]


class _WithCache(nn.Module):
    """The model as a function of (input_ids, attention_mask, *past tensors) -> (logits, *present)."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def export_kv_graph(model: nn.Module, path: Path) -> None:
    """fp32 graph with dynamic batch, sequence and past lengths (torch.onnx's dynamo exporter)."""
    from torch.export import Dim

    layers, kv, head_dim = cache_shape(model.config)
    batch, seq = Dim("batch", min=1, max=256), Dim("sequence", min=1, max=8192)
    past, total = Dim("past", min=1, max=8192), Dim("total", min=2, max=16384)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (2, 3), generator=gen)
    cache = [torch.zeros(2, kv, 5, head_dim) for _ in range(2 * layers)]
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past} for _ in cache))
    program = torch.onnx.export(
        _WithCache(model.eval(), layers), (ids, torch.ones(2, 8, dtype=torch.long), *cache), dynamo=True,
        input_names=["input_ids", "attention_mask", *past_names(layers)],
        output_names=["logits", *[n.replace("past.", "present.") for n in past_names(layers)]],
        dynamic_shapes=shapes, optimize=True, verbose=False)
    program.save(str(path))


def empty_cache(config: Any, batch: int) -> dict[str, np.ndarray]:
    layers, kv, head_dim = cache_shape(config)
    return {name: np.zeros((batch, kv, 0, head_dim), np.float32) for name in past_names(layers)}


def run_cached(sess: Any, config: Any, ids: np.ndarray, cache: dict[str, np.ndarray] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One call: logits of `ids` given `cache` (empty: a prompt), and the cache after it."""
    cache = cache if cache is not None else empty_cache(config, ids.shape[0])
    done = next(iter(cache.values())).shape[2]
    mask = np.ones((ids.shape[0], done + ids.shape[1]), np.int64)
    out = sess.run(None, {"input_ids": ids, "attention_mask": mask, **cache})
    layers = cache_shape(config)[0]
    return out[0], dict(zip(past_names(layers), out[1:], strict=True))


def decode_parity(sess: Any, config: Any, ids: np.ndarray, prompt: int) -> float:
    """Largest difference, relative to the largest logit, between the graph's logits for tokens
    prompt..end fed one at a time through its cache and its own for the whole sequence at once (the
    cache must not change what the graph computes, whatever its weights)."""
    full, _ = run_cached(sess, config, ids)
    logits, cache = run_cached(sess, config, ids[:, :prompt])
    got = [logits[:, -1]]
    for t in range(prompt, ids.shape[1] - 1):
        logits, cache = run_cached(sess, config, ids[:, t:t + 1], cache)
        got.append(logits[:, -1])
    expected = full[:, prompt - 1:ids.shape[1] - 1]
    return float(np.abs(np.stack(got, 1) - expected).max() / (np.abs(expected).max() or 1.0))


def ort_decode_speed(sess: Any, config: Any, vocab: int, decode: int) -> float:
    """Greedy tokens/s through the graph's cache after a 1-token context (as the PyTorch side does)."""
    ids = np.random.default_rng(0).integers(0, vocab, (1, 1))
    logits, cache = run_cached(sess, config, ids)
    start = time.perf_counter()
    for _ in range(decode):
        logits, cache = run_cached(sess, config, logits[:, -1:].argmax(-1), cache)
    return decode / (time.perf_counter() - start)

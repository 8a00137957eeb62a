"""Held-out batches, parity numbers and side-by-side timing shared by the exporters.

Each export is judged against the PyTorch model it came from on the same held-out rows and the
same padded batches, so the only difference measured is the runtime's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from compress.data import pad_collate


def heldout_batches(data: Any, tokenizer: Any, limit: int | None, batch_size: int = 32) -> list[dict[str, Any]]:
    """The eval split (at most `limit` rows) tokenised and padded into batches, labels included."""
    dataset = data.tokenized("eval", tokenizer)
    if limit is not None and len(dataset) > limit:
        dataset = dataset.select(range(limit))
    collate = pad_collate(tokenizer)
    rows = [dataset[i] for i in range(len(dataset))]
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def parity(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """How far `got` logits are from `reference`: largest difference (absolute and relative to the
    largest reference logit) and top-1 agreement."""
    scale = float(reference.abs().max()) or 1.0
    diff = float((got - reference).abs().max())
    agree = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    return {"max_abs_logit_diff": diff, "max_rel_logit_diff": diff / scale, "top1_agreement": agree}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def side_by_side(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds so that a change
    in machine load hits every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: round(1000 * statistics.median(values), 3) for name, values in times.items()}

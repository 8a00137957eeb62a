"""Drawing calibration blocks: `calibration_samples` tokenised blocks of up to `max_length` tokens.

Documents are drawn from the training split in a seeded random order and only the drawn ones are
tokenised, so the cost follows the number of blocks, not the size of the corpus. For language
modelling on plain text the drawn documents are joined (EOS between them) and cut into full blocks of
`max_length` tokens, as training data is; for classification and prompt/completion data one example
(truncated to `max_length`) is one block.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from compress.errors import DataError, StageError

# The first draw tokenises this many documents at most; later draws are sized from the tokens per
# document seen so far, with this much to spare, so a draw rarely needs a third round.
_FIRST_DRAW = 32
_SPARE = 1.2


def draw_order(rows: int, seed: int) -> np.ndarray:
    """Row indices in the seeded random order calibration draws them (datasets' `shuffle(seed)`)."""
    # The same generator and call as datasets.Dataset.shuffle(seed=...), so classification data draws
    # exactly the examples it drew before this pipeline existed.
    return np.random.default_rng(seed).permutation(rows)


def calibration_blocks(data: Any, tokenizer: Any, n: int | None, seed: int) -> list[dict[str, list[int]]]:
    """`n` blocks (default: data.calibration_samples) from `data.train`, tokenising only what is drawn.

    Each block is a dict of token lists (input_ids, attention_mask, labels). Fewer than `n` come back
    only when the whole split holds fewer.
    """
    n = n or data.spec.calibration_samples
    order = draw_order(len(data.train), seed)
    spec = data.spec
    if data.task == "sequence-classification" or spec.prompt_column:
        from compress.data import tokenize

        encoded = tokenize(data.train.select(order[:n].tolist()), tokenizer, spec, data.task)
        return [encoded[i] for i in range(len(encoded))]
    return _packed_blocks(data.train, spec.text_column, tokenizer, spec.max_length, n, order)


def _packed_blocks(train: Any, column: str, tokenizer: Any, block: int, n: int,
                   order: np.ndarray) -> list[dict[str, list[int]]]:
    """Draw documents in `order`, tokenise them a batch at a time and cut full blocks until `n`."""
    # The same encoding as training's LM blocks (compress.data.tokenize): no special tokens, EOS after
    # each document; the last partial block is dropped.
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    blocks: list[list[int]] = []
    taken = tokens_seen = 0
    size = min(n, _FIRST_DRAW)
    while len(blocks) < n and taken < len(order):
        picked = order[taken: taken + size].tolist()
        taken += len(picked)
        texts = list(train.select(picked)[column])
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream += ids + eos
            tokens_seen += len(ids) + len(eos)
        full = min(len(stream) // block, n - len(blocks))
        blocks += [stream[i * block: (i + 1) * block] for i in range(full)]
        stream = stream[full * block:]
        missing = (n - len(blocks)) * block - len(stream)
        size = max(1, math.ceil(missing / max(tokens_seen / taken, 1) * _SPARE))
    if not blocks:
        raise DataError(f"data.max_length: the text yields no full block of {block} tokens; "
                        f"lower data.max_length or add text")
    return [{"input_ids": b, "attention_mask": [1] * block, "labels": list(b)} for b in blocks]


def calibration_batches(bundle: Any, data: Any, n: int | None, seed: int, batch_size: int = 8,
                        field: str = "calibration_samples") -> list[dict[str, torch.Tensor]]:
    """`n` calibration blocks (see `calibration_blocks`) in padded batches of `batch_size`.

    `field` names the recipe field in the error raised when the recipe has no data section.
    """
    from compress.data import pad_collate

    if data is None:
        raise StageError(f"{field}: this stage needs calibration data, but the recipe has no data section; "
                         f"add a data section (a few hundred training examples are enough)")
    rows = calibration_blocks(data, bundle.tokenizer, n, seed)
    if not rows:
        raise StageError(f"{field}: the calibration set is empty; add training data")
    collate = pad_collate(bundle.tokenizer)
    return [collate(rows[i: i + batch_size]) for i in range(0, len(rows), batch_size)]


def batch_rows(batches: list[dict[str, torch.Tensor]]) -> int:
    """How many blocks the batches hold (the `calibration_samples` a stage reports)."""
    return sum(int(b["input_ids"].shape[0]) for b in batches)


def batch_tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    """How many real (unpadded) tokens the batches hold."""
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["input_ids"].numel())
               for b in batches)

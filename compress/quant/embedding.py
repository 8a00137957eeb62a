"""Quantized embeddings: int8 or int4 rows, dequantized only for the looked-up tokens.

Embeddings are about half of a small encoder like MiniLM (30k x 384 word embeddings), and a
lookup touches only a few rows, so dequantizing gathered rows costs almost nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.quant.weight_only import QuantizedWeight


class QuantEmbedding(QuantizedWeight):
    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, bits: int,
                 group_size: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.group_size = group_size
        self._setup_quant(num_embeddings, embedding_dim, bits, group_size)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int) -> QuantEmbedding:
        if emb.max_norm is not None:
            # max_norm renormalises rows in place on lookup, which a frozen quantized table cannot do.
            raise ValueError("embeddings with max_norm cannot be quantized")
        layer = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, bits, group_size)
        layer.set_from_float(emb.weight)
        return layer.to(emb.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (for code that inspects `.weight`; not stored)."""
        return self.rows()

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "bits": self.bits, "group_size": self.group_size}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows(input_ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group}"

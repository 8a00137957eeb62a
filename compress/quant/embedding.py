"""Quantized embeddings: int8 or int4 rows, dequantized only for the looked-up tokens.

Embeddings are about half of a small encoder like MiniLM (30k x 384 word embeddings), and a
lookup touches only a few rows, so dequantizing gathered rows costs almost nothing.

A replacement must keep the forward of what it replaces: Gemma's scaled word embedding multiplies
the rows by sqrt(hidden) (kept as `scale`), and a table tied to the output head is quantized once
and read by the head through `TiedQuantHead` (storing a float copy for the head would make the
model larger than before). Embeddings with a forward of their own (OPT's learned positions, which
add an offset to positions computed from the attention mask) are not replaced.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.quant.kinds import register_layer_kind
from compress.quant.weight_only import QuantizedWeight, group_limit_bits


def _scale_of(emb: nn.Embedding) -> float | None:
    """The constant a scaled word embedding (Gemma*ScaledWordEmbedding) multiplies its rows by."""
    scale = getattr(emb, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        # The module multiplies by embed_scale cast to the weight's dtype; keep that rounding.
        return float(scale.to(emb.weight.dtype))
    if isinstance(scale, int | float):
        return float(scale)
    return None


def embedding_problem(emb: nn.Embedding) -> str | None:
    """Why a QuantEmbedding cannot reproduce this embedding's forward, or None when it can."""
    if emb.max_norm is not None:
        return "max_norm embeddings renormalise rows on lookup, which a frozen quantized table cannot do"
    if type(emb) is nn.Embedding:
        return None
    params = list(inspect.signature(type(emb).forward).parameters)[1:]
    if _scale_of(emb) is not None and len(params) == 1:
        return None
    return (f"{type(emb).__name__} has a forward of its own ({type(emb).__name__}.forward"
            f"({', '.join(params)})), which a quantized lookup table would not reproduce; kept in float")


@register_layer_kind
class QuantEmbedding(QuantizedWeight):
    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, bits: int,
                 group_size: int, scale: float | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.group_size = group_size
        self.scale = scale
        self._setup_quant(num_embeddings, embedding_dim, bits, group_size)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int) -> QuantEmbedding:
        why = embedding_problem(emb)
        if why is not None:
            raise ValueError(why)
        layer = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, bits, group_size, _scale_of(emb))
        layer.set_from_float(emb.weight)
        return layer.to(emb.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table, unscaled, as the module's `weight` was (for code that inspects it)."""
        return self.rows()

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "bits": self.bits, "group_size": self.group_size,
                "scale": self.scale}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> QuantEmbedding:
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["padding_idx"], spec["bits"],
                   spec["group_size"], spec.get("scale"))

    def size_facts(self) -> tuple[int, int, str, float]:
        label = f"{self.kind}-int{self.bits}"
        return self.q_rows, self.q_cols, label, group_limit_bits(self.bits, self.group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(input_ids)
        return rows if self.scale is None else rows * self.scale

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.scale is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group}{scale}"


class TiedQuantHead(nn.Module):
    """An output head tied to a quantized embedding: logits = x @ table^T (+ bias), table read from
    the embedding. The embedding is held outside the module tree, so the table is saved, moved and
    counted once, under the embedding's name."""

    kind = "tied-head"

    def __init__(self, source: QuantEmbedding, source_name: str, bias: bool = False):
        super().__init__()
        object.__setattr__(self, "source", source)  # not a submodule: see the class docstring
        self.source_name = source_name
        self.in_features, self.out_features = source.embedding_dim, source.num_embeddings
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized shared table (unscaled: a scaled embedding scales its lookups, not the head)."""
        return self.source.rows()

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source_name, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.source.rows().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"tied to {self.source_name}, in={self.in_features}, out={self.out_features}"

"""Which layers a quantize stage touches: name patterns, module types, the output head, embeddings.

A pattern matches a module name when it matches, as a regular expression, a whole trailing run of
dotted components: `query` matches `bert.encoder.layer.0.attention.self.query`, `layer\\.0\\..*`
matches everything in layer 0, `output.dense` matches both `attention.output.dense` and
`layer.0.output.dense`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def matches(name: str, pattern: str) -> bool:
    return re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None


def class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): the output embeddings and the usual classifier names."""
    heads = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if out is not None and mod is out:
            heads.add(name)
        elif name.rsplit(".", 1)[-1] in HEAD_NAMES or name.endswith(("classifier.out_proj",
                                                                       "classifier.dense")):
            heads.add(name)
    return {h for h in heads if isinstance(model.get_submodule(h), nn.Linear)}


@dataclass
class Selection:
    linear: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)


def select_layers(model: nn.Module, include: list[str] | None, exclude: list[str], module_types: list[str],
                  quantize_head: bool, embeddings: bool, skip_types: tuple[type, ...] = ()) -> Selection:
    """Linear layers (and embeddings, if asked) to quantize, in model order."""
    heads = head_names(model)
    sel = Selection()
    for name, mod in model.named_modules():
        if not name or isinstance(mod, skip_types):
            continue
        if any(matches(name, p) for p in exclude):
            continue
        if isinstance(mod, nn.Embedding):
            if embeddings and (include is None or any(matches(name, p) for p in include)):
                sel.embeddings.append(name)
            continue
        if not isinstance(mod, nn.Linear) or not (class_names(mod) & set(module_types)):
            continue
        if include is not None and not any(matches(name, p) for p in include):
            continue
        if name in heads and not quantize_head:
            sel.skipped_head.append(name)
            continue
        sel.linear.append(name)
    return sel


def unmatched_patterns(model: nn.Module, patterns: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    return [p for p in patterns if not any(matches(n, p) for n in names)]


def bad_patterns(patterns: list[str] | None) -> list[str]:
    out = []
    for p in patterns or []:
        try:
            re.compile(p)
        except re.error as exc:
            out.append(f"{p!r} ({exc})")
    return out


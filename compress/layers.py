"""One layer selector for every stage: `targets` / `ignore` name patterns and one list of output heads.

A pattern matches a module name when it matches, as a regular expression, a whole trailing run of
dotted components:

- `q_proj` matches `model.layers.0.self_attn.q_proj` (a plain name means what it means in peft's
  `target_modules`: the module or a dotted suffix), but not `model.layers.0.self_attn.q_proj_extra`;
- `layers\\.0\\..*` matches everything in block 0, and not block 10;
- `mlp\\..*` matches every layer inside an `mlp`; `output.dense` matches `attention.output.dense` and
  `layer.0.output.dense`.

Anchoring is what makes a pattern safe: an unanchored search for `layer.1` also hits `layer.10`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import AliasChoices, Field

# Heads peft trains in full for a classification task (never adapter targets).
CLASSIFIER_HEADS = ("classifier", "score", "qa_outputs")
# Every output head: the most sensitive layers, left alone by pruning, factorisation and quantization
# unless asked for.
HEAD_NAMES = ("lm_head", *CLASSIFIER_HEADS)
# Embedding-side projections (ALBERT's embedding mapping, OPT's project_in) stay out of a default
# selection with the embeddings they belong to.
EMBEDDING_PATTERN = r".*embed.*"


def matches(name: str, pattern: str) -> bool:
    """Whether `pattern` matches a whole trailing run of `name`'s dotted components."""
    return re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None


def matches_any(name: str, patterns: list[str] | tuple[str, ...] | None) -> bool:
    return any(matches(name, p) for p in patterns or ())


def first_match(name: str, values: dict[str, Any] | None, default: Any) -> Any:
    """The value of the first pattern in `values` that matches `name` (per-layer settings), else `default`."""
    for pattern, value in (values or {}).items():
        if matches(name, pattern):
            return value
    return default


def bad_patterns(patterns: list[str] | None) -> list[str]:
    """Patterns that are not valid regular expressions, each with the reason."""
    out = []
    for p in patterns or []:
        try:
            re.compile(p)
        except re.error as exc:
            out.append(f"{p!r} ({exc})")
    return out


def unmatched_patterns(names: list[str], patterns: list[str] | None) -> list[str]:
    """Patterns that match none of `names` (a typo, or a pattern written for another model)."""
    return [p for p in patterns or [] if not any(matches(n, p) for n in names)]


def output_heads(model: Any) -> set[str]:
    """Names of the model's output head modules: its output embeddings (tied or not) and the usual
    classifier heads (RoBERTa-style `classifier.dense` / `classifier.out_proj` included)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = set()
    for name, module in model.named_modules():
        if not name:
            continue
        named = name.rsplit(".", 1)[-1] in HEAD_NAMES or name.endswith(("classifier.out_proj",
                                                                          "classifier.dense"))
        if named or (out is not None and module is out):
            heads.add(name)
    return heads


def is_default_ignored(name: str, heads: set[str]) -> bool:
    """Left out of a default (no `ignore` given) prune / low-rank selection: heads and embeddings."""
    return name in heads or matches(name, EMBEDDING_PATTERN)


def pattern_problems(model: Any, fields: dict[str, list[str] | None]) -> list[str]:
    """`field: ...` for each pattern that names no module of `model` (checked before any work)."""
    names = [n for n, _ in model.named_modules() if n]
    return [f"{field}: {p!r} matches no layer of this model (patterns match whole trailing name parts, "
            f"e.g. 'q_proj', 'mlp\\..*' or 'layers\\.0\\..*')"
            for field, patterns in fields.items() for p in unmatched_patterns(names, patterns)]


def targets_field(verb: str) -> Any:
    """The `targets` field of a stage that picks linear layers by name (one wording everywhere)."""
    return Field(None, description=(
        f"Patterns of linear-layer names to {verb}, each matching whole trailing name parts ('q_proj', "
        f"'mlp\\..*', 'layers\\.0\\..*'); default: every linear layer but the heads and embeddings."))


def ignore_field(participle: str) -> Any:
    """The `ignore` field (also accepted as its older name `exclude`)."""
    return Field(None, validation_alias=AliasChoices("ignore", "exclude"), description=(
        f"Patterns of layers never {participle} (also accepted as `exclude`). Output heads and embeddings "
        f"are left alone anyway unless `targets` names them."))

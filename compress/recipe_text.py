"""Recipe text and command-line overrides to plain data, before any validation: bounded safe YAML,
`${ENV}` references, refusal of inline tokens, and `a.b.c=value` overrides."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from compress.errors import RecipeError

MAX_RECIPE_BYTES = 1 << 20
MAX_ALIASES = 100
MAX_DEPTH = 32
MAX_NODES = 100_000
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader (no python tags) that also bounds nesting and alias use.

    Aliases are shared references, so an alias "bomb" is small in memory but explodes for anyone
    who walks the structure (as overrides, ${ENV} expansion and validation do).
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name); write the values out", self.peek_event().start_mark)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.constructor.ConstructorError(
                None, None, f"nesting deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Values in the document once every alias is written out. The alias count alone does not bound
    this: 14 levels of 7 aliases each (98 aliases) expand to 7**14 values."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once instead of looping
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def _load_limited(text: str, source: str | None) -> Any:
    """One YAML document through the bounded loader; tags and limits give a RecipeError naming `source`."""
    if len(text.encode("utf-8", "replace")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the recipe is larger than {MAX_RECIPE_BYTES // 1024} KiB; recipes are small files", source)
    try:
        loader = _LimitedLoader(text)  # a SafeLoader: python tags are refused
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_NODES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the aliases (*name) expand to more than {MAX_NODES:,} values; write the values out",
                    node.start_mark)
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(
            f"{where}{exc.problem}; recipes are plain YAML (mappings, lists, strings, numbers): "
            f"tags such as !!python/... are refused, nesting and aliases are bounded",
            source,
        ) from None


def parse_yaml(text: str, source: str = "<recipe>") -> dict[str, Any]:
    try:
        data = _load_limited(text, source)
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {exc}", source) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise RecipeError(
            f"the recipe must be a YAML mapping with keys like name, model, data, stages; got {kind}", source
        )
    return data


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, path: str = "") -> tuple[Any, list[str]]:
    """Replace ${VAR} and ${VAR:-default} in strings. Returns the new data and the problems found."""
    problems: list[str] = []

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str):
            def sub(match: re.Match[str]) -> str:
                value = os.environ.get(match.group(1), match.group(2))
                if value is None:
                    problems.append(f"{where}: environment variable {match.group(1)} is not set "
                                    f"(set it, or write ${{{match.group(1)}:-default}})")
                    return match.group(0)
                return value
            return _ENV_REF.sub(sub, node)
        return node

    return walk(data, path), problems


def find_secrets(data: Any, where: str = "") -> list[str]:
    """Paths of strings that look like Hugging Face tokens (the value itself is never echoed)."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in find_secrets(v, f"{where}.{k}" if where else str(k))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in find_secrets(v, f"{where}[{i}]")]
    if isinstance(data, str) and _TOKEN.search(data):
        return [(f"{where}: looks like a Hugging Face token; recipes are saved with every run and published "
                 f"with the model, so pass tokens through the HF_TOKEN environment variable instead")]
    return []


_KEY_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
# A whole key: a name, then `.name`, `.3` or `[3]` parts. Anything else (`.`, `a..b`, `[0]` first,
# spaces) is refused rather than guessed at, since a guessed path silently sets the wrong field.
_KEY = re.compile(r"[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*")


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Apply `a.b.c=value` (or `stages[1].lr=...`, `stages.1.lr=...`) overrides; values are YAML scalars."""
    if not overrides:
        return data
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    problems: list[str] = []
    for key, value in items:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            problems.append(f"override {key!r}: not a field path; write it like seed, data.max_length, "
                            f"stages[0].lr or stages.0.lr")
            continue
        if isinstance(value, str) and not isinstance(overrides, dict):
            try:
                value = _parse_scalar(value)
            except RecipeError as exc:
                problems += [f"override {key}: {p}" for p in exc.problems]
                continue
        parts = [m.group(1) if m.group(1) is not None else int(m.group(2)) for m in _KEY_PART.finditer(key)]
        parts = [int(p) if isinstance(p, str) and p.isdigit() else p for p in parts]
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    problems.append(f"override {key}: index {part} is out of range ({size} items)")
                    break
                node = node[part]
            else:
                if not isinstance(node, dict):
                    problems.append(f"override {key}: {part!r} is not inside a mapping")
                    break
                node = node.setdefault(part, [] if isinstance(nxt, int) else {})
        else:
            last = parts[-1]
            if isinstance(last, int):
                if not isinstance(node, list) or last >= len(node):
                    problems.append(f"override {key}: index {last} is out of range")
                    continue
            elif not isinstance(node, dict):
                problems.append(f"override {key}: {last!r} is not inside a mapping")
                continue
            node[last] = value
    if problems:
        raise RecipeError(problems)
    return data


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} must look like key.path=value, e.g. stages[0].lr=1e-4")
    return key.strip(), value


def _parse_scalar(value: str) -> Any:
    """An override's value through the same bounded loader as recipe files (no tags, aliases and
    nesting bounded), so `key=value` cannot smuggle in what a recipe file may not hold."""
    if not value.strip():
        return ""
    try:
        return _load_limited(value, None)
    except yaml.YAMLError:
        return value  # not YAML (e.g. `a: b: c`): the text itself, as a string

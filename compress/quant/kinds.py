"""Open registry of compress's own quantized layer kinds.

A kind is a module class with a `kind` name, `spec()` (the constructor arguments, saved in the
`quantized` format's layer map), a classmethod `from_spec(spec)` that builds the empty layer for
loading, and `size_facts()` -> (rows, cols, label, limit bits per weight) for size accounting.
Saving, loading, accounting and the stage's checks all ask this registry, so a new scheme's layer
(AWQ, GPTQ act-order, ...) is one module that calls `register_layer_kind` — no list to extend.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compress.errors import ModelError

_KINDS: dict[str, type[nn.Module]] = {}


def register_layer_kind(cls: type[nn.Module]) -> type[nn.Module]:
    """Register a quantized layer class (usable as a class decorator). Duplicate names are refused."""
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not hasattr(cls, "spec") or not hasattr(cls, "size_facts") \
            or not hasattr(cls, "from_spec"):
        raise TypeError(f"{cls.__name__} needs a `kind` name, spec(), from_spec() and size_facts() to be a "
                        f"quantized layer kind")
    if name in _KINDS and _KINDS[name] is not cls:
        raise ValueError(f"quantized layer kind {name!r} is already registered by {_KINDS[name].__name__}")
    _KINDS[name] = cls
    return cls


def layer_class(kind: str) -> type[nn.Module]:
    """The class of a saved layer kind; a name this version does not know is a clear error."""
    if kind not in _KINDS:
        raise ModelError(f"unknown quantized layer kind {kind!r} (known: {', '.join(sorted(_KINDS))}); the "
                         f"folder was written by a newer compress or a plugin that is not imported")
    return _KINDS[kind]


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """An empty layer of `spec['kind']`, ready for its saved tensors."""
    return layer_class(spec["kind"]).from_spec(spec)  # type: ignore[attr-defined]


def is_own_layer(module: nn.Module) -> bool:
    return type(module) in _KINDS.values()


def own_layer_types() -> tuple[type[nn.Module], ...]:
    return tuple(_KINDS.values())

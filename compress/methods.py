"""Method families: the methods inside one stage type (quantize schemes, prune methods, PEFT methods).

Each method is a small config, a subclass of its stage's config that narrows the family's key
(`scheme`, `method`) to its own name and adds only its own fields, plus a handler:

    class Gptq(Quantize):
        scheme: Literal["gptq"] = "gptq"
        damp: float = 0.01

    QUANTIZE_SCHEMES.register(Gptq, quantize_gptq)

The recipe validates a stage as a discriminated union over its family (so a field that belongs to
another method is an unknown key, named with the valid ones), recipes stay flat YAML
(`type: quantize, scheme: gptq, damp: 0.02`), and the Python API is unchanged: `Quantize(scheme="gptq")`
builds a `Gptq`. A new method is one module and one `register` call; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import Discriminator, Tag, model_validator

from compress.registry import StageConfig, note_registry_change


@dataclass(frozen=True)
class Method:
    """One registered method: its name (the key's value), config class, handler and one-line summary."""

    name: str
    config_cls: type[StageConfig]
    handler: Callable[..., Any] | None
    summary: str


class MethodFamily:
    """The methods of one stage type, told apart by the value of `key` (default: `default`)."""

    def __init__(self, base: type[StageConfig], key: str, default: str | None = None) -> None:
        if key not in base.model_fields:
            raise TypeError(f"{base.__name__} needs a field {key!r} naming its method")
        self.base, self.key, self.default = base, key, default
        self._methods: dict[str, Method] = {}
        # `Quantize(scheme="gptq")` builds the method's class (see _dispatching_new).
        base.__new__ = _dispatching_new  # type: ignore[method-assign]
        base._method_family = self  # type: ignore[attr-defined]

    def register(self, config_cls: type[StageConfig], handler: Callable[..., Any] | None = None,
                 summary: str | None = None) -> Method:
        """Add a method; its name is the value of the class's `key` Literal. Duplicates are refused."""
        if not issubclass(config_cls, self.base):
            raise TypeError(f"{config_cls.__name__} must subclass {self.base.__name__}")
        annotation = config_cls.model_fields[self.key].annotation
        names = get_args(annotation) if get_origin(annotation) is Literal else ()
        if len(names) != 1:
            raise TypeError(f"{config_cls.__name__} needs `{self.key}: Literal['name']`")
        name = names[0]
        known = self._methods.get(name)
        if known is not None and known.config_cls is not config_cls:
            raise ValueError(f"{self.key} {name!r} is already registered by {known.config_cls.__name__}")
        doc = (summary or config_cls.__doc__ or "").strip().splitlines()
        method = Method(name, config_cls, handler, doc[0] if doc else "")
        self._methods[name] = method
        note_registry_change()  # the recipe rebuilds its union with the new method
        return method

    def names(self) -> list[str]:
        return list(self._methods)

    def methods(self) -> list[Method]:
        return list(self._methods.values())

    def get(self, name: str) -> Method:
        if name not in self._methods:
            raise KeyError(f"unknown {self.key} {name!r} (available: {', '.join(self._methods)})")
        return self._methods[name]

    def of(self, config: StageConfig) -> Method:
        """The method a config belongs to."""
        return self.get(getattr(config, self.key))

    def handler(self, config: StageConfig) -> Callable[..., Any]:
        method = self.of(config)
        if method.handler is None:
            raise TypeError(f"{self.key} {method.name!r} has no handler")
        return method.handler

    def name_in(self, node: Any) -> str | None:
        """The method named by a raw recipe node or a config object (None: not named, no default)."""
        if isinstance(node, dict):
            return node.get(self.key, self.default)
        return getattr(node, self.key, self.default)

    def config_for(self, node: Any) -> type[StageConfig]:
        """The config class that validates a raw recipe node (the base when the method is unknown)."""
        method = self._methods.get(self.name_in(node) or "")
        return method.config_cls if method else self.base

    def foreign_fields(self, config_cls: type[StageConfig], data: dict[str, Any]) -> list[str]:
        """For each key of `data` that `config_cls` does not take but another method does: a problem
        naming whose field it is (for a config's before-validator; plain "unknown key" gives no fix)."""
        name = self.name_in(data)
        problems = []
        for key in data:
            if key in accepted_keys(config_cls):
                continue
            owners = [m.name for m in self.methods() if key in accepted_keys(m.config_cls)]
            if owners:
                problems.append(f"{key}: applies to {self.key} {' / '.join(owners)} only (this stage's "
                                f"{self.key} is {name}); remove it")
        return problems

    def union(self) -> Any:
        """The annotation the recipe validates this stage with: one member per method."""
        if not self._methods:
            return self.base
        members = tuple(Annotated[m.config_cls, Tag(m.name)] for m in self._methods.values())
        return Annotated[Union[members], Discriminator(self.name_in)]  # noqa: UP007


class FamilyConfig(StageConfig):
    """Base of a stage config that heads a method family: a field of another method of the family is
    named with its owners instead of being reported as an unknown key."""

    @model_validator(mode="before")
    @classmethod
    def _other_methods_fields(cls, data: Any) -> Any:
        family = getattr(cls, "_method_family", None)
        if isinstance(data, dict) and family is not None and (problems := family.foreign_fields(cls, data)):
            raise ValueError("; ".join(problems + cls.problems_beside_foreign_fields(data)))
        return data

    @classmethod
    def problems_beside_foreign_fields(cls, data: dict[str, Any]) -> list[str]:
        """Other mistakes in the raw node to report with a foreign field (pydantic stops at the first
        failing before-validator, and a recipe's errors are all reported at once)."""
        return []


def accepted_keys(config_cls: type[StageConfig]) -> set[str]:
    """The keys a config takes: its field names and their validation aliases."""
    keys = set(config_cls.model_fields)
    for field in config_cls.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        keys.update(c for c in (choices or [alias]) if isinstance(c, str))
    return keys


def family_of(config_cls: type[StageConfig]) -> MethodFamily | None:
    """The method family a stage config class heads (or belongs to), if any."""
    return getattr(config_cls, "_method_family", None)


def _dispatching_new(cls: type[StageConfig], *args: Any, **kwargs: Any) -> Any:
    # Called for the family's base and every method class. Building the base by keyword returns the
    # named method's class, whose __init__ then validates the keywords (Python calls __init__ on the
    # returned object because it is an instance of the base). Copies and model_construct pass no
    # keywords and get the class they asked for.
    family: MethodFamily = cls._method_family  # type: ignore[attr-defined]
    if cls is family.base and kwargs and family.names():
        name = family.name_in(kwargs)
        if name not in family.names():
            raise ValueError(f"{family.key}: {'is required' if name is None else f'unknown {name!r}'} "
                             f"(available: {', '.join(family.names())})")
        cls = family.config_for(kwargs)
    return object.__new__(cls)

"""Stage registry: stage `type` name -> (config class, run function).

Stages register explicitly (see `compress/stages/__init__.py`); nothing is discovered by scanning
modules, so an import error in a stage module fails loudly instead of silently hiding the stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from compress.bundle import ModelBundle
    from compress.context import RunContext


class StageConfig(BaseModel):
    """Base of every stage's config. Subclasses declare `type: Literal["name"] = "name"`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str | None = Field(None, description="Optional label for this stage in reports and folder names.")
    evaluate: bool = Field(True, description="Evaluate the model after this stage.")

    @classmethod
    def stage_type(cls) -> str:
        annotation = cls.model_fields["type"].annotation
        (value,) = get_args(annotation)
        return value

    def label(self) -> str:
        return self.name or self.stage_type()


@dataclass
class StageResult:
    """What a stage returns: the new bundle, the facts it found (they go into its stage record and
    eval point: layer counts, errors, loss curves) and any files it wrote outside the bundle (an
    adapter folder). The runner, not the stage, saves the bundle and records the facts."""

    bundle: ModelBundle
    facts: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)


# A stage may also return a bare ModelBundle (no facts): stages written against the first contract work.
StageFn = Callable[["ModelBundle", StageConfig, "RunContext"], "StageResult | ModelBundle"]
# A check sees the loaded bundle before any stage runs and returns problems ("field: what and fix").
CheckFn = Callable[["ModelBundle", StageConfig, "RunContext"], list[str]]


@dataclass(frozen=True)
class StageEntry:
    type: str
    config_cls: type[StageConfig]
    run: StageFn
    summary: str
    check: CheckFn | None = None
    # Runs on every process of a distributed launch (training, sharded by accelerate); otherwise the
    # stage is one-shot (prune, quantize, ...): rank 0 runs it and the others read its saved output.
    distributed: bool = False
    # How the base model should load when this is the first stage, e.g. QLoRA's NF4 settings, so the
    # model is read from its checkpoint in the form the stage trains (compress.loading.load_model).
    load_plan: Callable[[StageConfig], dict[str, Any] | None] | None = None
    # Ends a recipe: only other terminal stages may follow it (exports write artefacts, not models).
    terminal: bool = False

    def validation_type(self) -> Any:
        """What the recipe validates this stage with: its method family's union, or its config class."""
        from compress.methods import family_of

        family = family_of(self.config_cls)
        return family.union() if family is not None else self.config_cls

    def config_for(self, node: Any) -> type[StageConfig]:
        """The config class for a raw recipe node of this type (a method's class in a family)."""
        from compress.methods import family_of

        family = family_of(self.config_cls)
        return family.config_for(node) if family is not None else self.config_cls


_STAGES: dict[str, StageEntry] = {}
_version = 0


def register_stage(config_cls: type[StageConfig], run: StageFn, summary: str | None = None,
                   check: CheckFn | None = None, distributed: bool = False,
                   load_plan: Callable[[StageConfig], dict[str, Any] | None] | None = None,
                   terminal: bool = False) -> StageEntry:
    """Register a stage. Its `type` comes from the config's `type` Literal; duplicates are refused.

    `check(bundle, config, ctx) -> problems` runs for every stage right after the model loads and
    before the baseline is measured, so model-dependent mistakes (a layer that does not exist, a
    rank too large) are reported together before any work. `distributed=True` marks a stage that
    trains on every process of a `torchrun` / `accelerate launch` run.
    """
    if "type" not in config_cls.model_fields:
        raise TypeError(f"{config_cls.__name__} needs a field `type: Literal['name']`")
    stage_type = config_cls.stage_type()
    if stage_type in _STAGES and _STAGES[stage_type].config_cls is not config_cls:
        raise ValueError(f"stage type {stage_type!r} is already registered by {_STAGES[stage_type].config_cls}")
    doc = (summary or config_cls.__doc__ or "").strip().splitlines()
    entry = StageEntry(stage_type, config_cls, run, doc[0] if doc else "", check, distributed, load_plan, terminal)
    _STAGES[stage_type] = entry
    note_registry_change()
    return entry


def note_registry_change() -> None:
    """A stage type or a method was registered: the recipe rebuilds its stage union when it next validates."""
    global _version
    _version += 1


def registry_version() -> int:
    """Changes whenever a stage type or method is registered, so the recipe knows its stage union is stale."""
    return _version


def base_load_plan(stages: list[StageConfig]) -> dict[str, Any] | None:
    """How the recipe's base model should load: as its first stage asks (QLoRA: NF4), else None."""
    if not stages:
        return None
    entry = _STAGES[stages[0].stage_type()]
    return entry.load_plan(stages[0]) if entry.load_plan else None


def _with_builtin_stages() -> dict[str, StageEntry]:
    # The built-in stages register when compress.stages is imported; `compress` itself imports
    # lazily, so whoever asks the registry first (e.g. `compress stages`) must not find it empty.
    import compress.stages  # noqa: F401

    return _STAGES


def get_stage(stage_type: str) -> StageEntry:
    return _with_builtin_stages()[stage_type]


def stage_entries() -> list[StageEntry]:
    return list(_with_builtin_stages().values())

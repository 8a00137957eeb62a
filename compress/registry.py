"""Stage registry: stage `type` name -> (config class, run function).

Stages register explicitly (see `compress/stages/__init__.py`); nothing is discovered by scanning
modules, so an import error in a stage module fails loudly instead of silently hiding the stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

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


StageFn = Callable[["ModelBundle", StageConfig, "RunContext"], "ModelBundle"]
# A check sees the loaded bundle before any stage runs and returns problems ("field: what and fix").
CheckFn = Callable[["ModelBundle", StageConfig, "RunContext"], list[str]]


@dataclass(frozen=True)
class StageEntry:
    type: str
    config_cls: type[StageConfig]
    run: StageFn
    summary: str
    check: CheckFn | None = None


_STAGES: dict[str, StageEntry] = {}


def register_stage(config_cls: type[StageConfig], run: StageFn, summary: str | None = None,
                   check: CheckFn | None = None) -> StageEntry:
    """Register a stage. Its `type` comes from the config's `type` Literal; duplicates are refused.

    `check(bundle, config, ctx) -> problems` runs for every stage right after the model loads and
    before the baseline is measured, so model-dependent mistakes (a layer that does not exist, a
    rank too large) are reported together before any work.
    """
    if "type" not in config_cls.model_fields:
        raise TypeError(f"{config_cls.__name__} needs a field `type: Literal['name']`")
    stage_type = config_cls.stage_type()
    if stage_type in _STAGES and _STAGES[stage_type].config_cls is not config_cls:
        raise ValueError(f"stage type {stage_type!r} is already registered by {_STAGES[stage_type].config_cls}")
    doc = (summary or config_cls.__doc__ or "").strip().splitlines()
    entry = StageEntry(stage_type, config_cls, run, doc[0] if doc else "", check)
    _STAGES[stage_type] = entry
    # The recipe's discriminated union is built from this registry; rebuild it for late registrations.
    from compress import recipe

    recipe.rebuild_stage_union()
    return entry


def get_stage(stage_type: str) -> StageEntry:
    return _STAGES[stage_type]


def stage_entries() -> list[StageEntry]:
    return list(_STAGES.values())

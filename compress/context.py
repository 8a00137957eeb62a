"""RunContext: what a stage may use besides the bundle. No global state lives anywhere else.

The runner builds one per stage and names every folder in it; a stage asks the context for its
scratch folder, for a folder to keep extra artefacts in, and for earlier stages' outputs, and never
works out the run folder's layout itself.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress.data import DataBundle


@dataclass(frozen=True)
class StageOutput:
    """A finished earlier stage of this run: where its saved model lies, and how the recipe named it."""

    index: int  # 0-based position in the recipe
    type: str
    name: str | None
    folder: Path

    def label(self) -> str:
        return self.name or self.type


@dataclass
class RunContext:
    output_dir: Path
    seed: int
    device: str
    data: DataBundle | None = None
    # Scratch folder for mid-stage checkpoints (resume inside a stage) and temporary files; the runner
    # removes it once the stage's output is saved. Default: a `.work-<stage>` folder in output_dir.
    work_dir: Path | None = None
    # This stage's name in the run folder (e.g. "02-finetune"), and the stages before it.
    stage_name: str = "stage"
    earlier: list[StageOutput] = field(default_factory=list)
    resume: bool = False
    show_progress: bool = True
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("compress"))
    stop: threading.Event = field(default_factory=threading.Event)
    # Position among the processes of a distributed launch (torchrun / accelerate launch).
    rank: int = 0
    world_size: int = 1
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir else self.output_dir / f".work-{self.stage_name}"

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def artifact_dir(self, kind: str, name: str | None = None) -> Path:
        """Where this stage keeps files besides its saved model: `<run>/<kind>/<name>`, the name
        defaulting to the stage's folder name (e.g. `<run>/adapters/02-finetune`)."""
        return self.output_dir / kind / (name or self.stage_name)

    def find_earlier(self, ref: str) -> tuple[StageOutput | None, str | None]:
        """An earlier stage by 1-based number, name or type (the first such one), or why `ref` names none."""
        if ref.isdigit():
            found = [s for s in self.earlier if s.index == int(ref) - 1]
        else:
            found = [s for s in self.earlier if ref in (s.name, s.type)][:1]
        if found:
            return found[0], None
        listed = ", ".join(f"{s.index + 1} ({s.label()})" for s in self.earlier) or "none"
        return None, f"is not an earlier stage of this run (earlier stages: {listed})"

    def require_data(self, stage: str) -> DataBundle:
        from compress.errors import StageError

        if self.data is None:
            raise StageError(f"stage {stage!r} needs data, but the recipe has no data section")
        return self.data

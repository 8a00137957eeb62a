"""RunContext: what a stage may use besides the bundle. No global state lives anywhere else."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress.data import DataBundle
    from compress.recipe import Recipe


@dataclass
class RunContext:
    output_dir: Path
    seed: int
    device: str
    recipe: Recipe | None = None
    data: DataBundle | None = None
    # Folder a stage may use for its own mid-stage checkpoints (resume inside a stage).
    work_dir: Path | None = None
    resume: bool = False
    show_progress: bool = True
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("compress"))
    stop: threading.Event = field(default_factory=threading.Event)
    extras: dict[str, Any] = field(default_factory=dict)

    def require_data(self, stage: str) -> DataBundle:
        from compress.errors import StageError

        if self.data is None:
            raise StageError(f"stage {stage!r} needs data, but the recipe has no data section")
        return self.data

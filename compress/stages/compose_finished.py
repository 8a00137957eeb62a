"""A compose task that finished training is kept in the stage's work folder, so a resumed run reuses it.

The training loop's checkpoints cover a task interrupted mid-way; once a task's loop has returned there
is no checkpoint left to resume from, and a run stopped during a later task would train the finished
ones again from the start. So each finished task leaves its trained weights (the adapter and the task
head: every parameter that trained) and its row of the task table, with the settings that made them;
a resume reuses them only when those settings are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress.io import atomic_dir

WEIGHTS, ROW = "trained.safetensors", "row.json"


def settings_key(config: Any, task: str, seed: int) -> str:
    """What a finished task's weights depend on: the stage's settings, the task and the run's seed."""
    return json.dumps([config.model_dump(mode="json"), task, seed], sort_keys=True, default=str)


def save_finished(model: torch.nn.Module, row: dict[str, Any], key: str, folder: Path) -> None:
    """Write the trained parameters and the task's row (main process only; atomic)."""
    trained = {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_dir(folder) as tmp:
        save_file(trained, str(tmp / WEIGHTS))
        (tmp / ROW).write_text(json.dumps({"settings": key, "row": row}, default=str))


def load_finished(model: torch.nn.Module, key: str, folder: Path) -> dict[str, Any] | None:
    """Put a finished task's trained parameters into `model` and return its row; None when there is no
    finished task there, or it was made with other settings (then it is trained again)."""
    if not (folder / ROW).exists():
        return None
    saved = json.loads((folder / ROW).read_text())
    if saved.get("settings") != key:
        return None
    weights = load_file(str(folder / WEIGHTS))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params) or any(weights[n].shape != p.shape for n, p in params.items()):
        return None
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    return saved["row"]

"""Task adapters in a published folder: a `compose` stage's adapters (one per task, and each task's
composed adapter) travel with the final model, as plain PEFT folders, with the card saying how to load
each one with peft alone.

The adapters apply to the model the compose stage started from. That model is published only when it is
the recipe's own base (compose as the first stage) and that base is a Hub model; otherwise the card says
which model they need instead of naming a local path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ADAPTERS_DIR = "adapters"
COMPOSE_FILE = "compose.json"


def task_adapter_folders(run_dir: Path) -> list[Path]:
    """The run's compose stages' adapter folders (`adapters/<stage>/` holding compose.json), in order."""
    root = run_dir / ADAPTERS_DIR
    return sorted(p for p in root.iterdir() if (p / COMPOSE_FILE).is_file()) if root.is_dir() else []


def _base_for(stage_folder: str, recipe: dict[str, Any]) -> str | None:
    """The Hub id the adapters of stage folder `NN-compose` apply to, when that is the recipe's base."""
    from compress.hub import hub_id

    index = int(stage_folder.split("-", 1)[0]) - 1 if stage_folder[:2].isdigit() else -1
    return hub_id(recipe.get("model", {}).get("path", "")) if index == 0 else None


def copy_task_adapters(run_dir: Path, target: Path, recipe: dict[str, Any], repo: str) -> str:
    """Copy every compose stage's adapters into `target/adapters/<stage>/` (compose.json rewritten without
    local paths) and return the card's section on loading them ("" when the run has none)."""
    sections = []
    for folder in task_adapter_folders(run_dir):
        index = json.loads((folder / COMPOSE_FILE).read_text())
        base = _base_for(folder.name, recipe)
        index["base_model"] = base
        shutil.copytree(folder, target / ADAPTERS_DIR / folder.name)
        (target / ADAPTERS_DIR / folder.name / COMPOSE_FILE).write_text(json.dumps(index, indent=1) + "\n")
        sections.append(_card_section(folder.name, index, base, repo))
    return "\n".join(sections)


def _card_section(stage: str, index: dict[str, Any], base: str | None, repo: str) -> str:
    classifier = index.get("task_type") == "sequence-classification"
    load = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    rows = []
    for task, entry in index["tasks"].items():
        kinds = [("own", entry["adapter"])] + ([("composed", entry["composed_adapter"])]
                                              if entry.get("composed_adapter") else [])
        rows += [f"| {task} | {kind} | `{ADAPTERS_DIR}/{stage}/{path}` | {entry.get('num_labels') or '–'} |"
                 for kind, path in kinds]
    base_text = (f"the base model `{base}`" if base else
                 "the model the compose stage started from (not this folder's model, and not published here: "
                 "put the compose stage first in the recipe to publish adapters for a Hub base)")
    first = next(iter(index["tasks"].items()))
    subfolder = f"{ADAPTERS_DIR}/{stage}/{first[1].get('composed_adapter') or first[1]['adapter']}"
    labels = f", num_labels={first[1]['num_labels']}" if classifier and first[1].get("num_labels") else ""
    return f"""
### Task adapters ({stage}: {index.get('combine')})

Plain PEFT adapters for {base_text}. "own" is the task's adapter alone; "composed" is the combined body
with that task's head. This folder's model weights are the recipe's own task with its adapter merged.

| task | adapter | subfolder | labels |
|---|---|---|---|
{chr(10).join(rows)}

```python
from peft import PeftModel
from transformers import {load}
base = {load}.from_pretrained("{base or 'BASE_MODEL'}"{labels})
model = PeftModel.from_pretrained(base, "{repo}", subfolder="{subfolder}")
```
"""

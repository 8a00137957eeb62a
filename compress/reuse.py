"""What a rerun may reuse: stage fingerprints, finished stage folders, and the shared stage cache.

A stage's fingerprint hashes everything that produced its output (model, data, seed and the stages
up to it, minus report-only fields): `--resume` compares it to decide what is still valid, and
runs whose stages share a prefix (autotune candidates) reuse those outputs through the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from compress.errors import RunFolderError
from compress.recipe import Recipe
from compress.runrecords import RUN_FILE, STAGE_FILE, quiet_json, stage_record, verify_files

log = logging.getLogger("compress")


def stage_dir_name(index: int, stage_type: str) -> str:
    """The folder of stage `index` (0-based) in the run folder: 01-finetune, 02-prune, ..."""
    return f"{index + 1:02d}-{stage_type}"


def stage_fingerprints(recipe: Recipe) -> list[str]:
    """Fingerprint of stage i = hash(model, data, seed, stages[0..i] minus report-only fields)."""
    base = {"model": recipe.model.model_dump(mode="json"), "data": recipe.data.model_dump(mode="json"),
            "seed": recipe.seed}
    prints, chain = [], []
    for stage in recipe.stages:
        chain.append(stage.model_dump(mode="json", exclude={"evaluate", "name"}))
        blob = json.dumps({**base, "stages": chain}, sort_keys=True)
        prints.append(hashlib.sha256(blob.encode()).hexdigest()[:16])
    return prints


def describe_change(old: dict[str, Any], new: dict[str, Any], index: int) -> str:
    """What differs between two recipes (as plain data) up to stage `index`, for a refused resume."""
    diffs = []
    old = old if isinstance(old, dict) else {}  # from a run.json that may be damaged
    for key in ("model", "data", "seed"):
        if old.get(key) != new.get(key):
            diffs.append(key)
    old_stages, new_stages = old.get("stages", []), new.get("stages", [])
    old_stages = old_stages if isinstance(old_stages, list) else []
    for i in range(index + 1):
        a = old_stages[i] if i < len(old_stages) and isinstance(old_stages[i], dict) else {}
        b = new_stages[i] if i < len(new_stages) else {}
        for field in sorted(set(a) | set(b)):
            if field not in ("evaluate", "name") and a.get(field) != b.get(field):
                diffs.append(f"stages[{i}].{field}: {a.get(field)!r} -> {b.get(field)!r}")
    return "; ".join(diffs) or "fingerprint differs"


def stage_done(fingerprints: list[str], folder: Path, index: int, verify: bool = False) -> bool:
    """Finished with the same fingerprint; with `verify`, every output file is intact too."""
    record_path = folder / STAGE_FILE
    if not record_path.exists():
        return False
    if folder.is_symlink():
        raise RunFolderError(f"{folder} is a symbolic link; stage folders must be real folders")
    record = stage_record(record_path, f"stage {index + 1} runs again" if verify else None)
    if record is None or record["fingerprint"] != fingerprints[index]:
        return False
    if verify:
        problem = verify_files(folder, record["files"])
        if problem:
            log.warning("%s: %s; stage %d runs again", folder.name, problem, index + 1)
            return False
    return True


def check_resume_points(out: Path, recipe: Recipe, fingerprints: list[str]) -> None:
    """Refuse to resume when a completed stage's config or inputs changed since it ran."""
    for index, stage in enumerate(recipe.stages):
        folder = out / stage_dir_name(index, stage.stage_type())
        record = stage_record(folder / STAGE_FILE)
        if record is None:  # not finished, or damaged (said, and re-run, when the stage is reached)
            break
        if record["fingerprint"] != fingerprints[index]:
            old = (quiet_json(out / RUN_FILE) or {}).get("recipe", {})
            changed = describe_change(old, recipe.to_dict(), index)
            raise RunFolderError(
                f"cannot resume: stage {index + 1} ({stage.stage_type()}) or its inputs changed since "
                f"{folder.name} was written ({changed}); pass --overwrite to start again, "
                f"or restore the recipe"
            )


class StageCache:
    """Finished stage folders (and the baseline's eval point) stored by fingerprint under `root`."""

    def __init__(self, root: Path, recipe: Recipe, fingerprints: list[str]):
        self.root, self.recipe, self.fingerprints = Path(root), recipe, fingerprints
        self.hits = 0

    def key(self, index: int | None) -> str:
        if index is not None:
            return self.fingerprints[index]
        blob = json.dumps({"model": self.recipe.model.model_dump(mode="json"), "seed": self.recipe.seed,
                           "data": self.recipe.data.model_dump(mode="json"),
                           "eval": self.recipe.eval.model_dump(mode="json")}, sort_keys=True)
        return "baseline-" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def restore(self, folder: Path, index: int | None) -> bool:
        """Put the cached output of stage `index` (None: the baseline) at `folder`, if there is one."""
        if folder.exists():
            return False
        cached = self.root / self.key(index)
        if not (cached / ("eval.json" if index is None else STAGE_FILE)).exists():
            return False
        # Hard links: no copy of the weights, and the cache entry stays intact if this folder is removed.
        shutil.copytree(cached, folder, copy_function=_link_or_copy)
        self.hits += index is not None
        return True

    def store(self, folder: Path, index: int | None) -> None:
        target = self.root / self.key(index)
        if not target.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(folder, tmp, copy_function=_link_or_copy)
            tmp.rename(target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

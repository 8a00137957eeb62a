"""Reading a run folder's records back on --resume, when a kill or a user may have damaged them.

A damaged record (unparsable, wrong shape, checksum mismatch) is never a traceback: it is named in a
warning and treated as missing, so the runner re-runs (or re-measures) what it described.
Temporary files left by a kill are removed before a run continues in the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

log = logging.getLogger("compress")
M = TypeVar("M", bound=BaseModel)

# Names the crash-safe writers use while writing (compress/io.py, the stage cache, predictions).
_TEMPORARY = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$|^\..+\.tmp$")


def read_json(path: Path, consequence: str) -> dict[str, Any] | None:
    """The JSON object in `path`; None when it is missing, or damaged (then a warning says so)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s is damaged (%s); %s", path, _short(exc), consequence)
        return None
    if not isinstance(data, dict):
        log.warning("%s is damaged (not a JSON object); %s", path, consequence)
        return None
    return data


def read_model(path: Path, model: type[M], consequence: str) -> M | None:
    """`path` parsed as the pydantic `model`; None when missing or damaged (with a warning)."""
    data = read_json(path, consequence)
    if data is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        log.warning("%s is damaged (%d invalid fields, first: %s); %s", path, exc.error_count(),
                    ".".join(map(str, exc.errors()[0]["loc"])) or "top level", consequence)
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def clean_temporaries(folder: Path, finished_stages: set[str]) -> list[str]:
    """Remove what a killed run left half-written: temporary files and folders anywhere in the run,
    and the work folders of stages that finished (a kill between saving and cleaning up). Work
    folders of unfinished stages stay: they hold the checkpoints a resumed stage continues from."""
    removed = []
    for path in sorted(folder.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        stale_work = path.parent == folder and path.name.startswith(".work-") and \
            path.name.removeprefix(".work-") in finished_stages
        if (_TEMPORARY.match(path.name) or stale_work) and (path.exists() or path.is_symlink()):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(folder)))
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run: %s", len(removed),
                 ", ".join(removed[:5]) + (" …" if len(removed) > 5 else ""))
    return removed


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 120 else text[:117] + "…"

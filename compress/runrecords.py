"""A run folder's records: written as a stage finishes, and read back on --resume, when a kill or a user
may have damaged them.

A damaged record (unparsable, wrong shape, checksum mismatch) is never a traceback: it is named in a
warning and treated as missing, so the runner re-runs (or re-measures) what it described.
Temporary files left by a kill are removed before a run continues in the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compress.io import write_json_atomic
from compress.report.schema import EvalPoint

log = logging.getLogger("compress")
M = TypeVar("M", bound=BaseModel)

RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
PREDICTIONS_FILE = "predictions.safetensors"

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


def stage_record(path: Path, consequence: str | None = None) -> dict[str, Any] | None:
    """stage.json when whole (a fingerprint and the list of files with their checksums); None when
    missing or damaged, with a warning naming it when `consequence` says what happens instead."""
    record = read_json(path, consequence) if consequence else quiet_json(path)
    files = record.get("files") if record else None
    if record is not None and not (isinstance(record.get("fingerprint"), str) and isinstance(files, dict) and all(
            isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
            for m in files.values())):
        if consequence:
            log.warning("%s is damaged (fields missing or of the wrong type); %s", path, consequence)
        return None
    return record


def quiet_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when missing or damaged, without a warning (said where it is acted on)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every output file, so a truncated or corrupted one is caught on resume."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (STAGE_FILE, "eval.json")}


def verify_files(folder: Path, expected: dict[str, dict[str, Any]]) -> str | None:
    for name, meta in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} is truncated or changed ({path.stat().st_size} bytes, expected {meta['bytes']})"
        if sha256_file(path) != meta["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def save_eval(folder: Path, point: EvalPoint, preds: torch.Tensor | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    if preds is not None:
        tmp = folder / f".{PREDICTIONS_FILE}.tmp"
        save_file({"preds": preds.contiguous()}, str(tmp))
        tmp.replace(folder / PREDICTIONS_FILE)
        files[PREDICTIONS_FILE] = {"bytes": (folder / PREDICTIONS_FILE).stat().st_size,
                                   "sha256": sha256_file(folder / PREDICTIONS_FILE)}
    # eval.json comes last and carries the predictions' checksum: the baseline counts as measured
    # only when both are whole.
    write_json_atomic(folder / "eval.json", {**point.model_dump(mode="json"), "files": files})


def recorded_baseline(folder: Path) -> tuple[EvalPoint, torch.Tensor | None] | None:
    """The baseline's point and predictions from disk; None (measure again) when missing or damaged."""
    again = "the baseline is measured again"
    data = read_json(folder / "eval.json", again)
    if data is None:
        return None
    files = data.pop("files", None)
    try:
        point = EvalPoint.model_validate(data)
    except ValueError:
        log.warning("%s is damaged (not an eval point); %s", folder / "eval.json", again)
        return None
    if not files and not (folder / PREDICTIONS_FILE).exists():
        return point, None
    # Checked against the checksum in eval.json (runs from before it had one: only parsed).
    problem = verify_files(folder, files) if isinstance(files, dict) and files else None
    if problem is None:
        try:
            return point, load_file(str(folder / PREDICTIONS_FILE))["preds"]
        except (OSError, KeyError, SafetensorError) as exc:
            problem = f"{PREDICTIONS_FILE} cannot be read ({type(exc).__name__})"
    log.warning("%s: %s; %s", folder.name, problem, again)
    return None


def now() -> str:
    """The time a record is written, in UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_stage_record(*, index: int, stage_type: str, folder: Path, seconds: float, fingerprint: str,
                     world_size: int, artifacts: list[Any], facts: dict[str, Any]) -> dict[str, Any]:
    """What `stage.json` holds for a finished stage: what produced it (fingerprint, world size), when, its
    files' digests (so --resume notices a damaged output) and the stage's facts."""
    return {"index": index, "type": stage_type, "dir": folder.name, "seconds": seconds, "fingerprint": fingerprint,
            "finished": now(), "files": file_digests(folder), "world_size": world_size,
            "artifacts": [str(a) for a in artifacts], "facts": jsonable(facts)}


def jsonable(facts: dict[str, Any]) -> dict[str, Any]:
    """The facts as stage.json can hold them (numbers, text, lists; anything else as its text)."""
    return json.loads(json.dumps(facts, default=str))


def fault(point: str) -> None:
    """Fault injection for the kill-timing tests (tests/test_nothing_lost.py): COMPRESS_FAULT=<point>
    kills this process with SIGKILL (nothing runs after it) at that point of the first stage that
    reaches it: after_stage_save (output saved, no stage.json), after_stage_json (no eval.json yet),
    after_eval_json (eval.json written, report.json not yet updated)."""
    if os.environ.get("COMPRESS_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)

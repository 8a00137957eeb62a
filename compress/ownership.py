"""Which folders compress created, so no command ever deletes or replaces anything else.

Every output folder compress creates (a run, a comparison, a publish folder, an autotune search)
carries a small `compress-owned.json` file naming what created it. A command may replace or clear
a folder only when that marker is there, of its own kind, and the folder holds nothing but the
entries that kind writes; anything else is refused with the reason and what to do instead.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.errors import CompressError, RunFolderError
from compress.io import write_json_atomic
from compress.runrecords import RUN_FILE, read_json

log = logging.getLogger("compress")
MARKER = "compress-owned.json"  # visible: a hidden name would read as a leftover temporary
LOCK_FILE = ".compress.lock"
KINDS = ("run", "compare", "publish", "autotune")

# Top-level entries each kind writes; anything else in the folder was put there by someone else.
# (A publish folder lists its own entries in the marker: the model's file names vary.)
_RUN_ENTRIES = re.compile(r"^(run\.json|report\.(json|md|html)|plots|adapters|publish|exports|\d\d-[\w.-]+"
                          r"|\.work-.+|\..+\.(tmp|old)-[0-9a-f]{8}|\..+\.tmp)$")
_FIXED_ENTRIES = {
    "compare": {"compare.md", "compare.json", "compare.png"},
    "autotune": {"candidates", "cache", "autotune.json", "autotune.md", "winner.yaml", "frontier.png"},
}


class OutputFolderError(CompressError):
    """An output path compress must not write to (someone else's files, an input, a run)."""

    exit_code = 2


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's ownership marker, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("created_by") == "compress" else None


def run_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker; for a run written before compress marked its folders, a stand-in when its
    run.json has compress's manifest fields and the folder holds nothing but run files."""
    marker = read_marker(folder)
    if marker is not None or not folder.is_dir():
        return marker
    try:
        manifest = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return None
    legacy = {"created_by": "compress", "kind": "run", "legacy": True}
    looks_like_ours = isinstance(manifest, dict) and manifest.get("schema") == 1 and all(
        isinstance(manifest.get(k), t) for k, t in (("name", str), ("recipe", dict), ("environment", dict)))
    return legacy if looks_like_ours and not foreign_entries(folder, legacy) else None


def write_marker(folder: Path, kind: str, entries: list[str] | None = None) -> None:
    assert kind in KINDS, kind
    data: dict[str, Any] = {"created_by": "compress", "kind": kind,
                            "created": datetime.now(UTC).isoformat(timespec="seconds")}
    if entries is not None:
        data["entries"] = sorted(entries)
    write_json_atomic(folder / MARKER, data)


def foreign_entries(folder: Path, marker: dict[str, Any]) -> list[str]:
    """Top-level entries of `folder` that its kind does not write (the user's, or another tool's)."""
    kind = marker.get("kind")
    own = set(marker.get("entries") or ()) | _FIXED_ENTRIES.get(kind, set()) | {MARKER, LOCK_FILE}
    names = sorted(p.name for p in folder.iterdir())
    if kind == "run":
        return [n for n in names if n not in own and not _RUN_ENTRIES.match(n)]
    return [n for n in names if n not in own and not re.match(r"^\..+\.(tmp|old)-[0-9a-f]{8}$", n)]


def is_empty(folder: Path) -> bool:
    """No entries besides what an interrupted start of compress may leave (marker, lock)."""
    return all(p.name in (MARKER, LOCK_FILE) for p in folder.iterdir())


def enclosing_run(path: Path) -> Path | None:
    """The compress run folder that `path` is inside of (or is), if any. Known by its marker only: a
    `run.json` of another tool higher up (a project root) must not make every path below it a run."""
    for parent in [path, *path.parents]:
        marker = read_marker(parent) if parent.is_dir() else None
        if marker and marker.get("kind") == "run":
            return parent
    return None


def check_output(path: str | Path, kind: str, *, inputs: list[str | Path] = (), allowed_inside: Path | None = None,
                 flag: str = "--output") -> Path:
    """Refuse an output folder compress would have to replace without owning it.

    Refused: an existing file; a symbolic link; a non-empty folder without compress's marker of
    this kind, or holding entries that kind does not write; a path equal to, inside or around one
    of the inputs; a path inside a run folder (except `allowed_inside`, e.g. a run's own publish/).
    """
    out = Path(path)
    shown = str(out)
    if out.is_symlink():
        raise OutputFolderError(f"{flag} {shown!r} is a symbolic link; give a real folder (nothing was touched)")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{flag} {shown!r} is an existing file, not a folder; compress never replaces "
                                f"files it did not write — choose a new folder name (nothing was touched)")
    resolved = out.resolve()
    allowed = allowed_inside is not None and resolved == allowed_inside.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if resolved == src or resolved in src.parents or (src in resolved.parents and not allowed):
            raise OutputFolderError(f"{flag} {shown!r} is or contains or lies inside the input {str(source)!r}; "
                                    f"writing there would replace it — choose a separate folder (nothing was touched)")
    run = enclosing_run(resolved)
    if run is not None and not allowed:
        raise OutputFolderError(f"{flag} {shown!r} lies inside the compress run folder {str(run)!r}; a run's "
                                f"folder holds only what the run writes — choose a folder outside it "
                                f"(nothing was touched)")
    if out.is_dir() and any(out.iterdir()):
        marker = read_marker(out)
        if marker is None:
            raise OutputFolderError(f"{flag} {shown!r} is a non-empty folder that compress did not create (no "
                                    f"{MARKER} marker); compress never replaces it — choose a new or empty folder "
                                    f"(nothing was touched)")
        if marker.get("kind") != kind:
            raise OutputFolderError(f"{flag} {shown!r} holds a compress {marker.get('kind')} folder, not a {kind} "
                                    f"folder; choose a new or empty folder (nothing was touched)")
        foreign = foreign_entries(out, marker)
        if foreign:
            raise OutputFolderError(f"{flag} {shown!r} holds files compress did not write ({', '.join(foreign[:5])}); "
                                    f"move them out or choose a new folder (nothing was touched)")
    return out


def clear_run_folder(folder: Path) -> None:
    """Empty a compress run folder for --overwrite, keeping its marker and the held lock file.

    Only reached after check_output_folder has seen the run marker and no foreign entries."""
    import shutil

    marker = run_marker(folder) if folder.is_dir() else None
    if marker is None:
        return  # new or empty folder: nothing to clear
    if marker.get("kind") != "run" or foreign_entries(folder, marker):  # checked before; re-checked at the delete
        raise OutputFolderError(f"{str(folder)!r} is not a compress run holding only its own files; not cleared")
    for path in folder.iterdir():
        if path.name in (MARKER, LOCK_FILE):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_output_folder(out: Path, recipe: Any, resume: bool, overwrite: bool) -> None:
    """Refuse a folder compress did not create, another run's, or a finished one unless told otherwise.

    Only a folder carrying compress's run marker is ever written into or cleared, and --overwrite is
    suggested only where it would be allowed.
    """
    where = f"output folder {str(out)!r}"
    if out.is_symlink():
        raise RunFolderError(f"{where} is a symbolic link (to {str(out.resolve())!r}); "
                             f"give a real folder so outputs cannot land somewhere unexpected")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{where} is an existing file, not a folder; compress never replaces files it did "
                             f"not write — set output_dir to a new folder (nothing was touched)")
    if not out.exists() or is_empty(out):
        return
    marker = run_marker(out)  # runs from before the marker are recognised by their manifest
    if marker is None or marker.get("kind") != "run":
        what = (f"holds a {RUN_FILE} that compress did not write (no {MARKER} marker, and not a compress run "
                f"holding only its own files)" if (out / RUN_FILE).exists() else "holds no compress run")
        raise RunFolderError(f"{where} is not empty and {what}; compress never writes into or replaces a folder "
                             f"it did not create — set output_dir to a new folder (nothing there was touched)")
    foreign = foreign_entries(out, marker)
    keep_out = (f"; it also holds files compress did not write ({', '.join(foreign[:5])}), so move them out "
                f"before --overwrite" if foreign else "")
    if overwrite:
        if foreign:
            raise RunFolderError(f"{where} holds files compress did not write ({', '.join(foreign[:5])}); "
                                 f"--overwrite would delete them — move them out, or set output_dir to a new "
                                 f"folder (nothing there was touched)")
        return
    previous = read_json(out / RUN_FILE, "the run is rebuilt from its stage folders")
    if previous is not None and not isinstance(previous.get("name"), str):
        log.warning("%s is damaged (no run name); the run is rebuilt from its stage folders", out / RUN_FILE)
        previous = None
    if previous is None:
        if resume:
            return
        raise RunFolderError(f"{where} holds a compress run whose {RUN_FILE} is missing or damaged; pass --resume "
                             f"to continue it" + (keep_out or " or --overwrite to start again"))
    if previous.get("name") != recipe.name:
        raise RunFolderError(f"{where} belongs to run {previous.get('name')!r}; " + (
            f"set output_dir{keep_out}" if foreign else "pass --overwrite to replace it, or set output_dir"))
    if not resume:
        raise RunFolderError(f"{where} already holds a run of {recipe.name!r}; pass --resume to continue it"
                             + (keep_out or " or --overwrite to start again"))

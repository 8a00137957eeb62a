"""How a run's failures reach the user: every failure becomes a CompressError with its exit code and
the place it happened (a stage's recipe path, or the run folder), never a bare traceback."""

from __future__ import annotations

import errno
from pathlib import Path

from compress.errors import CompressError, StageError


class FolderVanished(CompressError):
    """The run folder disappeared while the run was writing into it."""

    exit_code = 1


def explain_failure(exc: BaseException, out: Path, where: str | None) -> CompressError | None:
    """A CompressError for a failure that is not one (disk full, folder gone, no permission), naming the
    run folder and the fix; a stage's own error gains `where`, the recipe path of the stage that raised
    it (None outside a stage). None when the failure needs no explaining (already a CompressError, Ctrl-C)
    or is not one of these."""
    if isinstance(exc, StageError) and where and not str(exc).startswith("stages["):
        return StageError(f"{where}: {exc}")
    if isinstance(exc, (CompressError, KeyboardInterrupt)) or not isinstance(exc, Exception):
        return None
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return CompressError(f"disk full while writing into {str(out)!r} ({exc}); finished stages "
                             f"are intact; free some space and rerun with --resume")
    if isinstance(exc, OSError) and not out.is_dir():
        return CompressError(f"the output folder {str(out)!r} vanished during the run ({exc}); "
                             f"nothing can be resumed from it — run again")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CompressError(f"cannot write into {str(out)!r} ({exc}); make it writable and rerun with "
                             f"--resume (finished stages are intact)")
    return None

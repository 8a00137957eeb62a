"""One run per folder: an OS file lock (flock) on `<run folder>/.compress.lock`.

The kernel releases a flock when its holder dies, however it dies, so a lock is never left held by
a dead process. The file also carries the holder's pid and start time: a second run on the folder
is refused naming them, and a file left by a killed run (its lock already released) is taken
over and said.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.errors import RunFolderError
from compress.ownership import LOCK_FILE

log = logging.getLogger("compress")


class RunLock:
    """Holds the folder's lock from `acquire()` until `release()` (or the process ends)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        if self.fd is not None:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
            except OSError as exc:
                raise RunFolderError(f"cannot lock the output folder {str(self.path.parent)!r} ({exc.strerror}); "
                                     f"make it writable or set output_dir to another folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunFolderError(
                    f"output folder {str(self.path.parent)!r} is in use by another compress run "
                    f"(pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
                    f"{', on ' + holder['host'] if holder.get('host') else ''}); wait for it to finish, "
                    f"stop it, or choose another output_dir (nothing was touched)") from None
            # A releasing holder unlinks the file before unlocking; if we locked such an unlinked
            # file, another process may already hold a new one at the same path: try again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read(fd)
        if stale.get("pid"):
            log.warning("%s: took over the lock left by pid %s (started %s), which is no longer running",
                        self.path.parent, stale["pid"], stale.get("started", "?"))
        record = {"pid": os.getpid(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
                  "host": socket.gethostname(), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # the folder may be gone (read-only, removed by the user)
            self.path.unlink()
        os.close(self.fd)  # closing releases the flock
        self.fd = None


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

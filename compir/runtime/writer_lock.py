"""One writer per index: an exclusive ``fcntl.flock`` on ``.compir.lock`` in a usearch index folder.

Why flock: the kernel releases it when the holder's last descriptor closes, which a process
killed by SIGKILL does too, so a crash never leaves a stale lock (the file stays, unlocked; the
pid written in it only names the holder to the next writer). Locks from two opens conflict even
within one process, so two writable galleries of one folder in one process conflict as well.

Who takes it: every process that may write the folder: ``compir serve`` (and its Ray gallery
owner), the demo, ``compir index build --overwrite`` of an existing folder, and a
:class:`~compir.runtime.gallery.Gallery` / Retriever opened with ``writable=True`` or at its first
write. Readers take nothing: a usearch save writes a new generation of files and then renames
``index.json``, so a reader never sees a half-written index. A Milvus Lite file has its own lock
(one process per file, :func:`lite_lock_holder` names the holder); a Milvus server is meant to be
shared by many writers, so a folder naming one is not locked.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import IO

from compir.errors import ContractError

LOCK_FILE = ".compir.lock"
_LITE_LOCK = "LOCK"  # Milvus Lite's own flock file inside its *.db folder


class WriterLock:
    """A held flock on ``path``; :meth:`release` (or the process ending, however) frees it."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path = path
        self._handle: IO[str] | None = handle

    @classmethod
    def acquire(cls, folder: Path) -> WriterLock:
        """The writer lock of index folder ``folder``, or a ContractError naming the holder's pid."""
        path = folder / LOCK_FILE
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115  (held open: the descriptor is the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            handle.close()
            raise ContractError(f"index {folder} is open for writing by another process ({holder}); one writer per index: "
                                "stop that one first (reading while it writes is fine)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {' '.join(sys.argv)[:300]}\n")  # names this holder to the next writer
        handle.flush()
        return cls(path, handle)

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None


def lite_lock_holder(db: Path) -> str | None:
    """Who holds Milvus Lite file ``db`` ("pid N", or "pid unknown"), or None if no other process does."""
    path = db / _LITE_LOCK
    if not path.is_file():
        return None
    with open(path, "a", encoding="utf-8") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(path)
        fcntl.flock(probe, fcntl.LOCK_UN)
    return None


def _holder(path: Path) -> str:
    """``pid N (command)`` of the process holding a flock on ``path``: from /proc/locks (Linux),
    else from the pid a WriterLock wrote into the file."""
    pid = _pid_from_proc_locks(path)
    text = ""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        pass
    written, _, command = text.partition(" ")
    if pid is None and written.isdigit():
        pid = int(written)
    if pid is None:
        return "pid unknown"
    return f"pid {pid}: {command}" if command and str(pid) == written else f"pid {pid}"


def _pid_from_proc_locks(path: Path) -> int | None:
    try:
        stat = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == inode and parts[4].isdigit():
            return int(parts[4])
    return None

"""One writer per folder: an OS lock on `FOLDER/.lock` that names the process holding it.

The lock is flock(2) on that file, so the kernel lets go of it when its process ends, however it ends (a
kill -9 included): a lock file left behind by a killed process holds no flock and is stale, and the next
writer takes it. The file's text, `{"pid": ..., "host": ...}`, is only there to say who holds a live lock.
Where the filesystem refuses flock (some network mounts), the text decides instead: a holder on this host
whose process is gone is stale; a holder on another host is taken at its word.

In a run over several processes (torchrun, mlx.launch) rank 0 alone writes the run folder, so it alone locks;
the other ranks' locks do nothing. A process may take the lock of a folder it already holds (a run folder that is also its one stage's folder):
the inner lock then only counts, and the outer one lets go.

Readers (eval, generate, export) take no lock: every file they read is written whole and renamed into place.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from tinylm.errors import UserError
from tinylm.files import fsync_dir, process_alive

LOCK_FILE = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)
_RANK_VARIABLES = ("RANK", "MLX_RANK", "OMPI_COMM_WORLD_RANK")
"""Where the launchers tinylm's backends support put a process's rank (read before a backend is made)."""
_HELD: dict[str, "FolderLock"] = {}
"""The locks this process holds, by the folder's real path."""


def launched_rank() -> int:
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _holder_of(path: Path) -> dict:
    # The holder writes its name just after it locks; give it a moment before calling it unknown.
    for _ in range(20):
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(found, dict):
                return found
        except (OSError, ValueError):
            pass
        time.sleep(0.025)
    return {}


class FolderLock:
    """`with FolderLock(folder, "run folder"):` makes this process the folder's only writer, or raises a
    `UserError` naming the folder and the process that holds it. The folder is created if needed, and removed
    again on release when it was created here and is still empty."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self._fd: int | None = None
        self._created = False
        self._outer: FolderLock | None = None

    def _busy(self, holder: dict) -> UserError:
        pid, host = holder.get("pid", "unknown"), holder.get("host", "an unknown host")
        return UserError(f"{self.what} {self.folder} is in use by another tinylm process (pid {pid} on {host}); "
                         f"wait for it to end or choose another folder")

    def _open_locked(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(_holder_of(self.path)) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                self._check_recorded_holder()
                return fd
            # The holder before us may have unlinked the file between our open and our flock: the lock we got
            # is then on a file nobody else can find, so start again on the one at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _check_recorded_holder(self) -> None:
        holder = _holder_of(self.path) if self.path.stat().st_size else {}
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int) or pid == os.getpid():
            return
        if host != socket.gethostname() or process_alive(pid):
            raise self._busy(holder)

    def acquire(self) -> "FolderLock":
        if launched_rank() != 0:
            return self
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.folder)
        if key in _HELD:
            self._outer = _HELD[key]
            return self
        fd = self._open_locked()
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n")
        os.fsync(fd)
        fsync_dir(self.folder)
        self._fd = fd
        _HELD[key] = self
        return self

    def release(self) -> None:
        if self._outer is not None:
            self._outer = None
            return
        if self._fd is None:
            return
        _HELD.pop(os.path.realpath(self.folder), None)
        # Unlinked while still locked, so a writer waiting on this file sees the inode change and retries.
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""The promotion lock: `flock` on a file shared by the engines of a device.

The active engine holds it for its whole life. Shadows block in flock(LOCK_EX)
(a kernel wait, not a polling loop); when the holder dies, however it dies,
the kernel releases its lock and wakes the next waiter at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from understudy.fds import lift


HOLDER_WIDTH = 11  # bytes of the lock file: a right-aligned pid (at most 10 digits) and a newline


class LockHeld(RuntimeError):
    """Another live process holds the lock."""


class FailoverLock:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    @classmethod
    def for_device(cls, directory: str | os.PathLike, identity: str) -> "FailoverLock":
        Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(Path(directory) / f"failover-{identity}.lock")

    def _open(self) -> int:
        # Lifted: when we die the lock goes to the next shadow before the driver tears our GPU down.
        return lift(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def try_acquire(self) -> None:
        """Take the lock now or raise LockHeld (the primary's way in)."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(f"the failover lock {self.path} is held by pid {self.holder()}") from None
        self._took(fd)

    def acquire(self) -> None:
        """Block until the lock is ours (a shadow parks here)."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._took(fd)

    def _took(self, fd: int) -> None:
        # The holder's pid, always HOLDER_WIDTH bytes: parked shadows keep this file open, and CRIU will
        # not restore an open file whose size changed since the dump (pids of 2 and 3 digits, say).
        os.pwrite(fd, f"{os.getpid():>{HOLDER_WIDTH - 1}}\n".encode(), 0)
        os.ftruncate(fd, HOLDER_WIDTH)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

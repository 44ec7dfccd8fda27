"""The `host` backend: shared CPU memory with the same semantics as CUDA VMM.

memfd_create gives an anonymous file whose fd can be passed to other
processes; clients reserve a PROT_NONE range and mmap the file into it with
MAP_FIXED. Read-only sessions receive an fd reopened O_RDONLY, so the kernel
itself refuses a writable mapping of shared weights.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import TYPE_CHECKING

from understudy.memory.backends.base import Backend, BackendError, OutOfMemory

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value

if TYPE_CHECKING:
    import torch

# Same as the CUDA minimum granularity, so sizes and offsets round the same way on both.
HOST_GRANULARITY = 2 << 20

# BUGFIX (tests/memory/test_security.py::test_a_reader_cannot_reopen_its_fd_writable_on_host):
# an O_RDONLY fd alone did not stop a reader: open("/proc/self/fd/N", O_RDWR) gave it a
# writable fd of the same memfd (whose inode is mode 0777), and then a writable mapping
# or a truncation (SIGBUS for every other reader). Seals are on the inode, so they hold
# however the file is reopened: sizes never change, and before the first read-only export
# (the layout is committed by then) no new writable mapping or write() is allowed either.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # Linux >= 5.1


def _mmap(va: int | None, size: int, prot: int, flags: int, fd: int, offset: int) -> int:
    addr = _libc.mmap(va, size, prot, flags, fd, offset)
    if addr == MAP_FAILED or addr is None:
        err = ctypes.get_errno()
        raise BackendError(f"mmap failed: {os.strerror(err)} (errno {err})")
    return addr


class HostBackend(Backend):
    name = "host"

    def identity(self) -> str:
        return f"host-{self.device}"

    def granularity(self) -> int:
        return HOST_GRANULARITY

    def create(self, size: int) -> tuple[object, int]:
        try:
            fd = os.memfd_create(f"understudy-{self.device}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, size)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)  # BUGFIX, see above
            except BaseException:
                # BUGFIX (tests/memory/test_protocol.py::test_host_create_leaks_no_fd_on_failure):
                # a size the kernel refuses (e.g. >= 2**63), or ENOMEM retried every 50 ms, leaked this fd.
                os.close(fd)
                raise
        except OSError as e:
            if e.errno in (errno.ENOMEM, errno.ENOSPC, errno.EMFILE):
                raise OutOfMemory(str(e)) from e
            raise
        return fd, fd

    def adopt(self, fd: int, size: int) -> tuple[object, int]:
        # Only a memfd of ours can come back: sealed against resizing (a client that could
        # truncate shared weights would SIGBUS every reader), and of the size it claims.
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if target.startswith("/memfd:") else 0
            actual = os.fstat(fd).st_size
        except OSError as e:
            raise BackendError(f"cannot inspect the file descriptor: {e}") from e
        if not target.startswith("/memfd:"):
            raise BackendError(f"not a shared-memory allocation (fd points at {target!r})")
        if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
            raise BackendError("the allocation is not sealed against resizing")
        if actual != size:
            raise BackendError(f"the allocation holds {actual} bytes, the layout says {size}")
        return fd, fd

    def release(self, handle: object, fd: int) -> None:
        os.close(fd)

    def export_fd(self, handle: object, fd: int, readonly: bool) -> int:
        # An fd a restarted server took back from a reader is O_RDONLY (F_ADD_SEALS would fail with
        # EPERM); it was sealed by the export that gave it to that reader.
        if readonly and not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & F_SEAL_FUTURE_WRITE:
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)  # BUGFIX, see F_SEAL_FUTURE_WRITE
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: a kernel older than 5.1; O_RDONLY must do
                    raise
        if readonly:
            # A fresh open file description with read-only access: mmap(PROT_WRITE,
            # MAP_SHARED) on it fails with EACCES whatever the client asks for.
            return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        return os.dup(fd)

    def reserve(self, size: int) -> int:
        return _mmap(None, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)

    def free_reservation(self, va: int, size: int) -> None:
        if _libc.munmap(va, size) != 0:
            raise BackendError(f"munmap failed: {os.strerror(ctypes.get_errno())}")

    def map(self, va: int, size: int, fd: int, offset: int, readonly: bool) -> None:
        prot = PROT_READ if readonly else PROT_READ | PROT_WRITE
        _mmap(va, size, prot, MAP_SHARED | MAP_FIXED, fd, offset)

    def unmap(self, va: int, size: int) -> None:
        # Replace the mapping by a fresh PROT_NONE one: the range stays ours.
        _mmap(va, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0)

    def set_access(self, va: int, size: int, readonly: bool) -> None:
        prot = PROT_READ if readonly else PROT_READ | PROT_WRITE
        if _libc.mprotect(va, size, prot) != 0:
            err = ctypes.get_errno()
            raise BackendError(f"mprotect failed: {os.strerror(err)} (errno {err})")

    def tensor(self, va: int, nbytes: int) -> "torch.Tensor":
        import torch

        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        buf = (ctypes.c_uint8 * nbytes).from_address(va)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)

"""Where the bytes live: one interface, two implementations (`host`, `cuda`).

The server side only creates, exports and releases physical allocations.
The client side imports them, reserves virtual address ranges and maps,
unmaps and remaps allocations inside those ranges. Both backends share the
same life-cycle rule: a mapping keeps its memory alive on its own, so a
client can drop its imported handle right after mapping, and memory is
returned once the server has released it and the last mapping is gone.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class BackendError(RuntimeError):
    """A backend call failed."""


class OutOfMemory(BackendError):
    """The device has no room for the allocation right now (maybe later)."""


class Backend(abc.ABC):
    """Physical allocations shared between processes as file descriptors."""

    name: str

    def __init__(self, device: int = 0):
        self.device = device

    # -- identity -------------------------------------------------------
    @abc.abstractmethod
    def identity(self) -> str:
        """A stable name for the device (GPU UUID on CUDA), used in socket names."""

    @abc.abstractmethod
    def granularity(self) -> int:
        """Allocation sizes and mapping addresses are multiples of this."""

    def round_up(self, size: int) -> int:
        g = self.granularity()
        return max(g, (size + g - 1) // g * g)

    # -- server side: physical memory ----------------------------------
    @abc.abstractmethod
    def create(self, size: int) -> tuple[object, int]:
        """Allocate `size` bytes; return (handle, exportable fd). Raises OutOfMemory."""

    @abc.abstractmethod
    def adopt(self, fd: int, size: int) -> tuple[object, int]:
        """Take over an allocation a client still maps (a restarted server's Restore).

        Returns (handle, fd) like create(); the fd is the server's from now on. Raises
        BackendError if `fd` is not an allocation of this backend of `size` bytes."""

    @abc.abstractmethod
    def release(self, handle: object, fd: int) -> None:
        """Drop the server's reference; memory lives on while anyone maps it."""

    def export_fd(self, handle: object, fd: int, readonly: bool) -> int:
        """A new fd to send to a client (the caller closes it after sending)."""
        import os

        return os.dup(fd)

    # -- client side: address space -------------------------------------
    @abc.abstractmethod
    def reserve(self, size: int) -> int:
        """Reserve a virtual address range that maps nothing yet; return its base."""

    @abc.abstractmethod
    def free_reservation(self, va: int, size: int) -> None:
        """Give a reserved range back (it must be unmapped)."""

    @abc.abstractmethod
    def map(self, va: int, size: int, fd: int, offset: int, readonly: bool) -> None:
        """Map `size` bytes of the allocation behind `fd` at `va` (inside a reservation).

        The fd stays owned by the caller, who may close it right after."""

    @abc.abstractmethod
    def unmap(self, va: int, size: int) -> None:
        """Unmap, keeping the range reserved so the same addresses can be mapped again."""

    @abc.abstractmethod
    def set_access(self, va: int, size: int, readonly: bool) -> None:
        """Change a mapped range between read-only and read-write."""

    @abc.abstractmethod
    def tensor(self, va: int, nbytes: int) -> "torch.Tensor":
        """A uint8 tensor of `nbytes` over mapped memory at `va`, without a copy."""

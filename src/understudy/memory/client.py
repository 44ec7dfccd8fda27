"""A synchronous client of the memory service, with address-stable mappings.

One client is one session on one pool (the connection is the lock). It keeps a
table of mappings: each allocation of the layout has a reserved virtual
address range in this process. `unmap_all()` gives the memory back but keeps
the ranges; `remap_all()` maps the same allocations at the same addresses, so
tensors (and CUDA graphs) that point there stay valid, after checking that the
layout did not change in between.

    with MemoryClient(path, pool="weights", mode="ro") as c:
        c.map_all()
        w = c.tensor("model.embed_tokens.weight")
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from understudy.fds import lift_socket
from understudy.memory import protocol as p
from understudy.memory.backends.base import Backend
from understudy.memory.backends import get_backend

if TYPE_CHECKING:  # torch only where tensors are made: the memory service itself never imports it
    import torch


class MemoryServiceError(RuntimeError):
    """The server refused a request; `code` says why (timeout, bad_state, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code


class LayoutChanged(MemoryServiceError):
    """remap_all found a layout other than the one these addresses were mapped for."""


@dataclass
class Mapping:
    """One allocation's place in this process."""

    index: int
    size: int
    va: int
    readonly: bool
    mapped: bool = True
    owns_range: bool = True  # False when mapped into a range the caller reserved
    # The allocation's fd, kept open while mapped: a restarted server takes the memory back from it
    # (restore()); CUDA cannot export an imported allocation again, so the fd it came as is kept.
    # Closed on unmap, so it never keeps memory alive on its own.
    fd: int = -1

    def unmap(self, backend: Backend) -> None:
        if self.mapped:
            backend.unmap(self.va, self.size)
            self.mapped = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Extra seconds beyond a request's own wait before the client gives up on the server.
REPLY_GRACE = 30.0


class MemoryClient:
    def __init__(self, socket_path: str | os.PathLike, pool: str = "weights", mode: str = "ro", *,
                 timeout: float = 30.0, name: str = "", backend: Backend | None = None):
        self.socket_path = str(socket_path)
        self.pool, self.mode, self.name = pool, mode, name
        self.timeout = timeout
        self._backend = backend
        self._sock: socket.socket | None = None
        self.session: int | None = None
        self.layout: p.Layout = p.Layout()
        self.mapped_hash: str | None = None  # layout hash the mapping table was built for
        self.mappings: dict[int, Mapping] = {}
        self.connect()

    # -- connection ----------------------------------------------------------
    def connect(self, timeout: float | None = None) -> None:
        """Open the connection and wait (up to `timeout`, default the client's) for the lock."""
        if self._sock is not None:
            return
        wait = self.timeout if timeout is None else timeout
        self._open(p.Hello(self.pool, self.mode, wait, self.name), [], wait)

    def restore(self, timeout: float | None = None) -> bool:
        """After the memory service restarted: hand it the memory we map, on a new connection.

        The pool takes our allocations if it is empty (True), or we read the same layout that
        another client gave back first (False). A pool holding another layout is refused
        (MemoryServiceError bad_state). Needs the whole layout mapped (not asleep)."""
        ours = [self.mappings.get(i) for i in range(len(self.layout.sizes))]
        if not ours or len(ours) != len(self.mappings) or any(m is None or m.fd < 0 for m in ours):
            raise MemoryServiceError("bad_state", "only a client that maps its whole layout can restore it")
        self.disconnect()
        layout = p.Layout(self.layout.sizes, self.layout.tensors, self.layout.extra, self.mapped_hash or "")
        wait = self.timeout if timeout is None else timeout
        granted = self._open(p.Restore(self.pool, layout, self.name), [m.fd for m in ours], wait)
        return granted.restored

    def _open(self, first: p.Hello | p.Restore, fds: list[int], wait: float) -> p.Granted:
        """A new connection whose first request (Hello or Restore) gets a session."""
        # Lifted: when we die, the service (and whoever waits to adopt our pool) hears of it at once.
        sock = lift_socket(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.settimeout(wait + REPLY_GRACE)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise ConnectionError(f"cannot reach the memory service at {self.socket_path}: {e}") from e
        self._sock = sock
        try:
            granted, _ = self._call(first, p.Granted, wait=wait, fds=fds)
        except BaseException:
            self.disconnect()
            raise
        self.session = granted.session
        self.mode = granted.mode
        self.layout = granted.layout
        if self._backend is None:
            self._backend = get_backend(granted.backend, _device_from_env(granted))
        elif self._backend.name != granted.backend:
            raise MemoryServiceError("bad_backend", f"server uses {granted.backend}, client {self._backend.name}")
        self.granularity = granted.granularity
        self.identity = granted.identity
        return granted

    def disconnect(self) -> None:
        """Close the connection, which releases the lock. Mappings stay as they are."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.session = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def backend(self) -> Backend:
        return self._backend

    def _call(self, request: p.Request, expect: type, wait: float = 0.0, fds: list[int] = ()) -> tuple[Any, list[int]]:
        if self._sock is None:
            raise MemoryServiceError("bad_state", "not connected")
        self._sock.settimeout(wait + REPLY_GRACE if wait else self.timeout + REPLY_GRACE)
        p.send_frame(self._sock, request, fds)
        reply, fds = p.recv_frame(self._sock)
        if isinstance(reply, p.Error):
            for fd in fds:
                os.close(fd)
            raise MemoryServiceError(reply.code, reply.message)
        if not isinstance(reply, expect):
            for fd in fds:
                os.close(fd)
            raise p.ProtocolError(f"expected {expect.__name__}, got {type(reply).__name__}")
        return reply, fds

    # -- requests ------------------------------------------------------------
    def allocate(self, size: int, timeout: float = 30.0, at: int | None = None) -> Mapping:
        """A new allocation (rw sessions), mapped read-write in a range of its own,
        or at `at`, inside a range the caller reserved."""
        reply, fds = self._call(p.Allocate(size, timeout), p.Allocated, wait=timeout)
        try:
            va = self._backend.reserve(reply.size) if at is None else at
            try:
                self._backend.map(va, reply.size, fds[0], 0, readonly=False)
            except BaseException:
                if at is None:
                    self._backend.free_reservation(va, reply.size)
                raise
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds[1:]:
            os.close(fd)
        m = Mapping(reply.index, reply.size, va, readonly=False, owns_range=at is None, fd=fds[0])
        self.mappings[reply.index] = m
        self.layout = self.get_layout()
        self.mapped_hash = self.layout.hash
        return m

    def get_layout(self) -> p.Layout:
        reply, _ = self._call(p.GetLayout(), p.LayoutReply)
        return reply.layout

    def set_metadata(self, tensors: dict[str, p.TensorMeta] | None = None, extra: dict[str, Any] | None = None,
                     replace: bool = False) -> str:
        reply, _ = self._call(p.SetMetadata(tensors or {}, extra or {}, replace), p.Ok)
        self.layout = self.get_layout()
        self.mapped_hash = self.layout.hash
        return reply.layout_hash

    def commit(self) -> str:
        """Publish the weights layout. The session becomes a reader and so do our mappings."""
        reply, _ = self._call(p.Commit(), p.Ok)
        self.mode = "ro"
        for m in self.mappings.values():
            if m.mapped and not m.readonly:
                self._backend.set_access(m.va, m.size, readonly=True)
                m.readonly = True
        self.layout = self.get_layout()
        self.mapped_hash = reply.layout_hash
        return reply.layout_hash

    def reset(self) -> None:
        """Clear the pool's layout (rw sessions). Our own mappings of it are dropped."""
        self._call(p.Reset(), p.Ok)
        self.release_all()
        self.layout = self.get_layout()
        self.mapped_hash = self.layout.hash

    def status(self) -> dict[str, Any]:
        reply, _ = self._call(p.Status(), p.StatusReply)
        return reply.status

    def _export(self, indices: list[int]) -> list[int]:
        fds: list[int] = []
        for start in range(0, len(indices), p.MAX_FDS_PER_FRAME):
            batch = indices[start:start + p.MAX_FDS_PER_FRAME]
            reply, got = self._call(p.Export(batch), p.Exported)
            fds += got
            if len(got) != len(batch):
                for fd in fds:
                    os.close(fd)
                raise p.ProtocolError(f"asked for {len(batch)} fds, got {len(got)}")
        return fds

    # -- the mapping table -----------------------------------------------------
    def map_all(self, base: int | None = None) -> dict[int, Mapping]:
        """Import and map every allocation of the layout not mapped yet.

        With `base`, allocations go one after another into a range the caller
        reserved (e.g. an engine's KV range); otherwise each gets its own."""
        self.layout = self.get_layout()
        todo = [i for i in range(len(self.layout.sizes)) if i not in self.mappings]
        if not todo:
            self.mapped_hash = self.layout.hash
            return self.mappings
        readonly = self.mode == "ro"
        offsets = _offsets(self.layout.sizes)
        fds = self._export(todo)
        try:
            for i in todo:
                size = self.layout.sizes[i]
                va = base + offsets[i] if base is not None else self._backend.reserve(size)
                try:
                    self._backend.map(va, size, fds[0], 0, readonly)
                except BaseException:
                    if base is None:
                        self._backend.free_reservation(va, size)
                    raise
                self.mappings[i] = Mapping(i, size, va, readonly, owns_range=base is None, fd=fds.pop(0))
        finally:
            for fd in fds:
                os.close(fd)
        self.mapped_hash = self.layout.hash
        return self.mappings

    def unmap_all(self) -> None:
        """Unmap everything, keeping the address ranges reserved (memory goes back)."""
        for m in self.mappings.values():
            m.unmap(self._backend)

    def remap_all(self) -> None:
        """Map the same allocations at the same addresses again.

        Raises LayoutChanged, and maps nothing, if the pool's layout is not the
        one the table was built for."""
        layout = self.get_layout()
        if layout.hash != self.mapped_hash or len(layout.sizes) < len(self.mappings):
            raise LayoutChanged("layout_changed", f"layout is now {layout.hash}, our addresses were mapped for "
                                                  f"{self.mapped_hash}: refusing to remap")
        self.layout = layout
        todo = [m for m in self.mappings.values() if not m.mapped]
        readonly = self.mode == "ro"
        fds = self._export([m.index for m in todo]) if todo else []
        try:
            for m in todo:
                if m.size != layout.sizes[m.index]:
                    raise LayoutChanged("layout_changed", f"allocation {m.index} changed size")
                self._backend.map(m.va, m.size, fds[0], 0, readonly)
                m.mapped, m.readonly, m.fd = True, readonly, fds.pop(0)
        finally:
            for fd in fds:
                os.close(fd)

    def release_all(self) -> None:
        """Unmap and give back every address range (tensors over them become invalid)."""
        self.unmap_all()
        for m in self.mappings.values():
            if m.owns_range:
                self._backend.free_reservation(m.va, m.size)
        self.mappings.clear()

    def close(self) -> None:
        """Release the mappings and the lock."""
        self.release_all()
        self.disconnect()

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tensors ---------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy tensor over the mapped bytes of tensor `name` of the layout."""
        from understudy.memory.tensors import view

        meta = self.layout.tensors.get(name)
        if meta is None:
            raise KeyError(f"no tensor {name!r} in the {self.pool} layout")
        m = self.mappings.get(meta.alloc)
        if m is None or not m.mapped:
            raise MemoryServiceError("bad_state", f"allocation {meta.alloc} holding {name!r} is not mapped")
        return view(self._backend, m.va, meta)

    def tensors(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {n: self.tensor(n) for n in (self.layout.tensors if names is None else names)}


def _offsets(sizes: list[int]) -> list[int]:
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return out


def _device_from_env(granted: p.Granted) -> int:
    """Our device ordinal for the server's device identity (CUDA_VISIBLE_DEVICES may differ)."""
    if granted.backend == "host":
        return int(granted.identity.rsplit("-", 1)[-1])
    from understudy.memory.backends.cuda import CudaBackend

    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    for i in range(n):
        if CudaBackend(i).identity() == granted.identity:
            return i
    raise MemoryServiceError("bad_device", f"this process cannot see device {granted.identity}")


def read_status(socket_path: str | os.PathLike, timeout: float = 10.0) -> dict[str, Any]:
    """The server's status, without taking any lock."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
        p.send_frame(sock, p.Status())
        reply, fds = p.recv_frame(sock)
        for fd in fds:
            os.close(fd)
    finally:
        sock.close()
    if isinstance(reply, p.Error):
        raise MemoryServiceError(reply.code, reply.message)
    return reply.status

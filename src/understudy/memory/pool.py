"""The state machines of the `weights` and `kv` pools (no I/O in here).

weights: publish once, read by many.
    EMPTY --writer--> RW --commit--> RO (the writer stays on as a reader)
    RO --last reader leaves--> COMMITTED --writer--> RW (stages a new layout)
    RW --writer dies or disconnects--> back to what was committed before (abort)
    A waiting writer blocks new readers, so a republish cannot starve.
kv: one exclusive owner at a time.
    EMPTY --owner--> RW --owner leaves or dies--> COMMITTED --next owner--> RW
    The layout and its physical memory survive the owner and are adopted by
    the next one; only an explicit reset clears them.
restore (a restarted server): a client hands back the allocations it maps.
    weights EMPTY --restore--> RO (the client is a reader; same layout again: it just reads)
    kv      EMPTY --restore--> RW (the client owns it)

A session is one client connection; the server calls `release` when it closes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from understudy.memory.backends.base import Backend, OutOfMemory
from understudy.memory.protocol import Layout, TensorMeta

# dtype names accepted in tensor metadata (torch's names without the prefix)
DTYPES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}


MAX_ALLOCATION = 1 << 62  # bytes; far beyond any device (and within the kernel's off_t)


class PoolError(Exception):
    """A request refused by the state machine; `code` goes on the wire."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Session:
    id: int
    pid: int
    uid: int
    gid: int
    name: str = ""
    pool: str | None = None
    mode: str | None = None
    connected_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "uid": self.uid, "name": self.name,
                "pool": self.pool, "mode": self.mode, "connected_at": self.connected_at}


@dataclass(eq=False)
class Allocation:
    size: int
    handle: object
    fd: int


@dataclass
class Content:
    """What a layout holds on the server: allocations and their metadata."""

    allocations: list[Allocation] = field(default_factory=list)
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.size for a in self.allocations)

    def layout(self) -> Layout:
        sizes = [a.size for a in self.allocations]
        return Layout(sizes=sizes, tensors=dict(self.tensors), extra=dict(self.extra),
                      hash=layout_hash(sizes, self.tensors, self.extra))


_hash_encoder = msgspec.msgpack.Encoder(order="sorted")


def layout_hash(sizes: list[int], tensors: dict[str, TensorMeta], extra: dict[str, Any]) -> str:
    """A structural hash: equal for equal layouts, whoever published them and when."""
    blob = _hash_encoder.encode([sizes, tensors, extra])
    return hashlib.sha256(blob).hexdigest()[:16]


class Events:
    """A bounded history that clients can read through the status request."""

    def __init__(self, maxlen: int = 1000):
        self._items: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self.subscribers: list[Callable[[dict[str, Any]], None]] = []  # e.g. the log, the metrics

    def add(self, pool: str | None, kind: str, session: Session | None = None, **detail: Any) -> None:
        event = {"t": time.time(), "pool": pool, "event": kind,
                 "session": session.id if session else None, "pid": session.pid if session else None, **detail}
        self._items.append(event)
        for subscriber in self.subscribers:
            subscriber(event)

    def recent(self, n: int = 100) -> list[dict[str, Any]]:
        return list(self._items)[-n:]


class _Waiters:
    """Wake-ups for coroutines waiting on a predicate over pool state."""

    def __init__(self) -> None:
        self._futures: list[asyncio.Future] = []

    def notify(self) -> None:
        for f in self._futures:
            if not f.done():
                f.set_result(None)
        self._futures.clear()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, poll: float | None = None) -> bool:
        """Wait until predicate() holds; False on timeout. `poll` re-checks without a notify."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            fut = asyncio.get_running_loop().create_future()
            self._futures.append(fut)
            try:
                await asyncio.wait_for(fut, min(remaining, poll) if poll else remaining)
            except asyncio.TimeoutError:
                pass
        return True


class Allocator:
    """Creates and frees physical memory for every pool of one device, within a budget."""

    RETRY_INTERVAL = 0.05  # seconds between tries while a dead process's memory is reclaimed

    def __init__(self, backend: Backend, events: Events, limit: int | None = None):
        self.backend = backend
        self.events = events
        self.limit = limit
        self.used = 0
        self._freed = _Waiters()

    def _try_create(self, size: int) -> Allocation:
        if self.limit is not None and self.used + size > self.limit:
            raise OutOfMemory(f"budget of {self.limit} bytes exceeded ({self.used} in use)")
        handle, fd = self.backend.create(size)
        self.used += size
        return Allocation(size, handle, fd)

    async def create(self, pool: str, session: Session, size: int, timeout: float) -> Allocation:
        """Allocate, retrying while out of memory until `timeout`.

        Cancelled (and so abandoned) when the requester disconnects."""
        result: list[Allocation] = []
        error: list[OutOfMemory] = []

        def attempt() -> bool:
            try:
                result.append(self._try_create(size))
                return True
            except OutOfMemory as e:
                if not error:
                    self.events.add(pool, "oom_retry", session, size=size, reason=str(e))
                error[:] = [e]
                return False

        if await self._freed.wait_for(attempt, timeout, poll=self.RETRY_INTERVAL):
            return result[0]
        raise PoolError("out_of_memory", f"no memory for {size} bytes after {timeout:.1f}s: {error[0]}")

    def adopt(self, pool: str, session: Session, sizes: list[int], fds: list[int]) -> list[Allocation]:
        """Allocations a client hands back to a restarted server (the fds become ours).

        They exist already, so the budget does not refuse them; going over it is logged."""
        taken: list[Allocation] = []
        try:
            for size, fd in zip(sizes, fds):
                handle, fd = self.backend.adopt(fd, size)
                taken.append(Allocation(size, handle, fd))
        except BaseException:
            for a in taken:
                self.backend.release(a.handle, a.fd)
            raise
        self.used += sum(sizes)
        if self.limit is not None and self.used > self.limit:
            self.events.add(pool, "over_budget", session, used=self.used, limit=self.limit)
        return taken

    def free(self, allocations: list[Allocation]) -> None:
        for a in allocations:
            self.backend.release(a.handle, a.fd)
            self.used -= a.size
        if allocations:
            self._freed.notify()


class Pool:
    """One pool of one device: `weights` (publish once, read many) or `kv` (exclusive owner)."""

    def __init__(self, name: str, allocator: Allocator, events: Events):
        assert name in ("weights", "kv")
        self.name = name
        self.allocator = allocator
        self.events = events
        self.committed: Content | None = None
        self.staged: Content | None = None  # weights only: the writer's work before commit
        self.writer: Session | None = None
        self.readers: set[Session] = set()
        self.writer_queue: deque[Session] = deque()  # waiting writers, served first come first served
        self.waiting_readers = 0
        self._changed = _Waiters()

    # -- derived state ----------------------------------------------------
    @property
    def waiting_writers(self) -> int:
        return len(self.writer_queue)

    @property
    def state(self) -> str:
        if self.writer is not None:
            return "RW"
        if self.committed is None:
            return "EMPTY"
        return "RO" if self.readers else "COMMITTED"

    def content_for(self, session: Session) -> Content:
        """What this session sees: the writer's working copy, or the committed layout."""
        if session is self.writer:
            return self.staged if self.name == "weights" else self.committed
        if session in self.readers and self.committed is not None:
            return self.committed
        raise PoolError("bad_state", f"session {session.id} holds no lock on the {self.name} pool")

    def _require_writer(self, session: Session, what: str) -> None:
        if session is not self.writer:
            raise PoolError("bad_state", f"{what} needs the {self.name} pool in rw mode (pool is {self.state})")

    # -- locking ------------------------------------------------------------
    async def acquire(self, session: Session, mode: str, timeout: float) -> None:
        if mode == "ro" and self.name == "kv":
            raise PoolError("bad_request", "the kv pool has one exclusive owner: connect in rw mode")
        if mode == "rw":
            if self.writer is not None or self.readers or self.writer_queue:
                self.events.add(self.name, "waiting", session, mode=mode, state=self.state)
            self.writer_queue.append(session)
            try:
                # In queue order: a writer arriving as the lock frees cannot overtake one already waiting.
                ok = await self._changed.wait_for(
                    lambda: self.writer is None and not self.readers and self.writer_queue[0] is session, timeout)
            finally:
                self.writer_queue.remove(session)
                self._changed.notify()  # the next writer, or readers held back by this one, may go on
            if not ok:
                raise PoolError("timeout", f"{self.name} pool still {self.state} after {timeout:.1f}s "
                                           f"({len(self.readers)} readers, writer {self._who(self.writer)})")
            self.writer = session
            if self.name == "weights":
                self.staged = Content()
            elif self.committed is None:
                self.committed = Content()
        else:
            if self.writer is not None or self.waiting_writers or self.committed is None:
                self.events.add(self.name, "waiting", session, mode=mode, state=self.state)
            self.waiting_readers += 1
            try:
                ok = await self._changed.wait_for(
                    lambda: self.writer is None and self.waiting_writers == 0 and self.committed is not None,
                    timeout)
            finally:
                self.waiting_readers -= 1
            if not ok:
                raise PoolError("timeout", f"no committed {self.name} layout to read after {timeout:.1f}s "
                                           f"(pool is {self.state}, {self.waiting_writers} writers waiting)")
            self.readers.add(session)
        session.pool, session.mode = self.name, mode
        self.events.add(self.name, "granted", session, mode=mode)

    def restore(self, session: Session, content: Content) -> bool:
        """Take `content` back from a client that maps it; the session gets the lock as after Hello.

        Returns False when the weights pool already holds the same layout: the session reads
        it, and `content` is not needed (the caller frees it). Anything else is refused."""
        if self.name == "weights":
            digest = content.layout().hash
            if self.writer is None and not self.writer_queue and self.committed is None:
                self.committed, taken = content, True
            elif self.committed is not None and self.committed.layout().hash == digest and not self.writer_queue:
                taken = False
            else:
                raise PoolError("bad_state", f"the weights pool is {self.state} with layout "
                                             f"{self.committed.layout().hash if self.committed else None}, "
                                             f"not {digest}: nothing to restore into")
            self.readers.add(session)
            mode = "ro"
        else:
            if self.writer is not None or self.writer_queue or (self.committed and self.committed.allocations):
                raise PoolError("bad_state", f"the kv pool is {self.state} with "
                                             f"{len(self.committed.allocations) if self.committed else 0} "
                                             f"allocations: nothing to restore into")
            self.committed, self.writer, taken, mode = content, session, True, "rw"
        session.pool, session.mode = self.name, mode
        self.events.add(self.name, "restored" if taken else "granted", session, mode=mode,
                        allocations=len(content.allocations), bytes=content.nbytes,
                        layout_hash=content.layout().hash)
        self._changed.notify()
        return taken

    def release(self, session: Session) -> None:
        """The session's connection closed, cleanly or because its process died."""
        if session is self.writer:
            self.writer = None
            if self.name == "weights" and self.staged is not None:
                self.allocator.free(self.staged.allocations)
                self.events.add(self.name, "aborted", session, allocations=len(self.staged.allocations))
                self.staged = None
            else:
                if self.committed is not None and not self.committed.allocations:
                    self.committed = None  # nothing to adopt
                self.events.add(self.name, "released", session)
        elif session in self.readers:
            self.readers.discard(session)
            self.events.add(self.name, "released", session)
        self._changed.notify()

    @staticmethod
    def _who(session: Session | None) -> str:
        return f"pid {session.pid}" if session else "none"

    # -- requests of the lock holder ----------------------------------------
    async def allocate(self, session: Session, size: int, timeout: float) -> tuple[int, Allocation]:
        self._require_writer(session, "allocate")
        if size <= 0:
            raise PoolError("bad_request", f"allocation size must be positive, got {size}")
        if size > MAX_ALLOCATION:
            # BUGFIX (tests/memory/test_protocol.py::test_absurd_allocation_size_is_a_bad_request):
            # sizes past what the kernel's off_t holds used to fail as an `internal` error.
            raise PoolError("bad_request", f"allocation size {size} exceeds {MAX_ALLOCATION} bytes")
        size = self.allocator.backend.round_up(size)
        alloc = await self.allocator.create(self.name, session, size, timeout)
        content = self.content_for(session)
        content.allocations.append(alloc)
        self.events.add(self.name, "allocated", session, index=len(content.allocations) - 1, size=size)
        return len(content.allocations) - 1, alloc

    def set_metadata(self, session: Session, tensors: dict[str, TensorMeta], extra: dict[str, Any],
                     replace: bool) -> str:
        self._require_writer(session, "set metadata")
        content = self.content_for(session)
        for name, meta in tensors.items():
            validate_tensor(name, meta, content)
        # BUGFIX (tests/memory/test_protocol.py::test_unhashable_extra_is_refused_and_harms_nobody):
        # `extra` used to be merged before the layout was hashed, so a non-str map key or a
        # deep nesting made every later hash (status, granted, commit) fail for every client.
        # Check it first, and merge into copies that replace the old ones only on success.
        validate_extra(extra)
        new_tensors = {} if replace else dict(content.tensors)
        new_extra = {} if replace else dict(content.extra)
        new_tensors.update(tensors)
        new_extra.update(extra)
        digest = layout_hash([a.size for a in content.allocations], new_tensors, new_extra)
        content.tensors, content.extra = new_tensors, new_extra
        return digest

    def commit(self, session: Session) -> str:
        if self.name != "weights":
            raise PoolError("bad_request", "only the weights pool is committed; kv layouts persist as they are")
        self._require_writer(session, "commit")
        if self.committed is not None:
            self.allocator.free(self.committed.allocations)
            self.events.add(self.name, "cleared", session, reason="replaced by a new commit")
        self.committed, self.staged = self.staged, None
        digest = self.committed.layout().hash
        # The writer stays on as a reader, so nobody can take the layout from under it.
        self.writer = None
        self.readers.add(session)
        session.mode = "ro"
        self.events.add(self.name, "committed", session, layout_hash=digest,
                        allocations=len(self.committed.allocations), bytes=self.committed.nbytes)
        self._changed.notify()
        return digest

    def reset(self, session: Session) -> None:
        """Clear the layout (kv: the adopted blocks; weights: the committed and the staged one)."""
        self._require_writer(session, "reset")
        freed = []
        for content in (self.committed, self.staged):
            if content is not None:
                freed += content.allocations
        self.allocator.free(freed)
        if self.name == "weights":
            self.committed, self.staged = None, Content()
        else:
            self.committed = Content()
        self.events.add(self.name, "cleared", session, allocations=len(freed))

    def describe(self) -> dict[str, Any]:
        content = self.committed if self.writer is None or self.name == "kv" else self.staged
        layout = content.layout() if content is not None else None
        return {
            "state": self.state,
            "writer": self.writer.describe() if self.writer else None,
            "readers": sorted(s.id for s in self.readers),
            "waiting_writers": self.waiting_writers,
            "waiting_readers": self.waiting_readers,
            "allocations": len(layout.sizes) if layout else 0,
            "bytes": sum(layout.sizes) if layout else 0,
            "tensors": len(layout.tensors) if layout else 0,
            "layout_hash": layout.hash if layout else None,
            "extra": layout.extra if layout else {},
            "committed_hash": self.committed.layout().hash if self.committed and self.name == "weights" else None,
        }


MAX_EXTRA_DEPTH = 32  # nesting of `extra` values; far deeper ones cannot be re-encoded reliably


def validate_extra(extra: dict[str, Any]) -> None:
    """`extra` must hash (str map keys only) and stay shallow (see MAX_EXTRA_DEPTH)."""
    todo = [(extra, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_EXTRA_DEPTH:
            raise PoolError("bad_request", f"extra metadata nests deeper than {MAX_EXTRA_DEPTH} levels")
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise PoolError("bad_request", "extra metadata maps must have str keys")
            todo += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, (list, tuple)):
            todo += [(v, depth + 1) for v in value]


def validate_tensor(name: str, meta: TensorMeta, content: Content) -> None:
    if meta.dtype not in DTYPES:
        raise PoolError("bad_request", f"tensor {name!r}: unknown dtype {meta.dtype!r} (known: {sorted(DTYPES)})")
    if not 0 <= meta.alloc < len(content.allocations):
        raise PoolError("bad_request", f"tensor {name!r}: no allocation {meta.alloc} "
                                       f"(layout has {len(content.allocations)})")
    if len(meta.shape) != len(meta.stride) or any(d < 0 for d in meta.shape) or any(s < 0 for s in meta.stride):
        raise PoolError("bad_request", f"tensor {name!r}: bad shape {meta.shape} / stride {meta.stride}")
    itemsize = DTYPES[meta.dtype]
    span = 0 if 0 in meta.shape else (1 + sum((d - 1) * s for d, s in zip(meta.shape, meta.stride))) * itemsize
    if meta.offset < 0 or meta.offset % itemsize or meta.offset + span > content.allocations[meta.alloc].size:
        raise PoolError("bad_request", f"tensor {name!r}: bytes [{meta.offset}, {meta.offset + span}) do not fit "
                                       f"allocation {meta.alloc} of {content.allocations[meta.alloc].size} bytes")

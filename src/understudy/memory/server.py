"""The memory service: one asyncio process per device that owns shared memory.

It never touches the bytes. It creates physical allocations, hands their fds
to clients over a Unix socket (SCM_RIGHTS), keeps the metadata that says what
the bytes are, and runs the pool state machines (pool.py). Each connection is
a session; a bad frame or request gets an error reply (or closes that one
connection) and every other client goes on being served.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import grp
import logging
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

from understudy.logs import log
from understudy.memory import protocol as p
from understudy.memory.backends.base import Backend, BackendError
from understudy.memory.pool import (MAX_ALLOCATION, Allocation, Allocator, Content, Events, Pool, PoolError, Session,
                   validate_tensor, validate_extra)

logger = logging.getLogger("understudy.memory.server")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# BUGFIX (tests/memory/test_protocol.py::test_pipelined_requests_of_a_dead_peer_are_released):
# the reader used to wait for room in a 16-frame queue, so while the worker waited on a lock
# it stopped reading and never saw the peer hang up: a dead client kept its lock (or its place
# among the waiting writers, blocking every new reader) forever. Now the reader never waits for
# the worker; read-ahead is bounded in bytes instead, and a peer beyond it is hung up on.
READ_AHEAD = p.MAX_FRAME  # bytes of requests read ahead of the one being handled
FRAME_OVERHEAD = 64  # what each queued frame counts beyond its body, so tiny frames cannot pile up


class _LastWord:
    """Queued after the frames already read: send this error, then close."""

    def __init__(self, reply: p.Error):
        self.reply = reply


class _Frame:
    """A request's body and the file descriptors that came with it."""

    def __init__(self, body: bytes, fds: list[int]):
        self.body, self.fds = body, fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


class ServerError(RuntimeError):
    pass


class MemoryServer:
    def __init__(self, backend: Backend, socket_path: str | os.PathLike, *, socket_mode: int = 0o600,
                 socket_group: str | None = None, limit_bytes: int | None = None, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1"):
        self.backend = backend
        self.path = Path(socket_path)
        self.socket_mode = socket_mode
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        self.group_id = _group_id(socket_group) if socket_group else None
        self.events = Events()
        self.events.subscribers.append(
            lambda e: log(logger, e["event"], **{k: v for k, v in e.items() if k not in ("event", "t")}))
        self.allocator = Allocator(backend, self.events, limit_bytes)
        self.pools = {name: Pool(name, self.allocator, self.events) for name in ("weights", "kv")}
        self.sessions: dict[int, Session] = {}
        self.started_at = time.time()
        self._next_session = 1
        self._lock_fd: int | None = None
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- socket life-cycle --------------------------------------------------
    def bind(self, standby: bool = False) -> None:
        """Take the path: refuse if a live server holds it (a standby waits for it to die), remove a
        stale socket."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = self._lock(self.path.with_suffix(".lock"), standby)
        self.started_at = time.time()  # a standby's life as the server starts now
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        if self.path.exists() or self.path.is_symlink():
            log(logger, "stale_socket_removed", path=str(self.path))
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # never visible with a looser mode, not even for a moment
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        if self.group_id is not None:
            os.chown(self.path, -1, self.group_id)
        os.chmod(self.path, self.socket_mode)
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock

    def _lock(self, lock_path: Path, standby: bool) -> int:
        """An fd of `lock_path` holding its flock; a standby blocks until the live server dies."""
        waited: tuple[str, float] | None = None  # (the pid we waited for, since when)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                # The lock is held for the server's life; the kernel drops it when we die,
                # so a socket file without a lock holder is stale whatever it looks like.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if not standby:
                    os.close(fd)
                    raise ServerError(f"a live memory server (pid {owner}) already serves {self.path}") from None
                log(logger, "standby_waiting", socket=str(self.path), pid=os.getpid(), active_pid=owner)
                waited = (owner, waited[1] if waited else time.monotonic())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel wakes us the moment the live server dies
                except BaseException:  # SIGINT while standing by
                    os.close(fd)
                    raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                if waited is not None:
                    log(logger, "standby_took_over", socket=str(self.path), pid=os.getpid(),
                        previous_pid=waited[0], waited_s=round(time.monotonic() - waited[1], 3))
                return fd
            # The lock file was removed or replaced while we waited: the lock we got guards
            # nothing, whoever locked the file now at the path is the live server.
            os.close(fd)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self.metrics_port is not None:
            from understudy.memory.metrics import serve_metrics

            serve_metrics(self, loop, self.metrics_port, self.metrics_host)
            log(logger, "metrics", url=f"http://{self.metrics_host}:{self.metrics_port}/metrics")
        log(logger, "listening", socket=str(self.path), backend=self.backend.name,
            identity=self.backend.identity(), pid=os.getpid(), mode=oct(self.socket_mode))
        accept = asyncio.create_task(self._accept_loop())
        await stop.wait()
        log(logger, "stopping", sessions=len(self.sessions))
        accept.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(accept, *self._tasks, return_exceptions=True)
        # Clients keep their mappings; the memory goes back when the last one unmaps.
        for pool in self.pools.values():
            for content in (pool.committed, pool.staged):
                if content is not None:
                    self.allocator.free(content.allocations)
        self.close()
        log(logger, "stopped")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as e:  # e.g. EMFILE: keep serving those connected, accept again soon
                log(logger, "accept_failed", level=logging.ERROR, error=str(e))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._serve_connection(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- one connection -------------------------------------------------------
    def _peer_allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, os.geteuid()):
            return True
        if self.group_id is None:
            return False
        return gid == self.group_id or self.group_id in _supplementary_groups(pid)

    async def _serve_connection(self, conn: socket.socket) -> None:
        pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if not self._peer_allowed(pid, uid, gid):
            self.events.add(None, "refused", None, peer_pid=pid, peer_uid=uid, reason="peer credentials")
            try:
                await self._send(conn, p.Error("permission", f"uid {uid} may not use this memory service"))
            finally:
                conn.close()
            return
        session = Session(self._next_session, pid, uid, gid)
        self._next_session += 1
        self.sessions[session.id] = session
        self.events.add(None, "connected", session, uid=uid)
        frames: asyncio.Queue[bytes] = asyncio.Queue()  # bounded by READ_AHEAD bytes (see below)
        backlog = [0]  # bytes read ahead, counted by the reader, discounted by the worker
        worker = asyncio.create_task(self._handle_frames(conn, session, frames, backlog))
        reader = asyncio.create_task(self._read_frames(conn, frames, backlog))
        try:
            # The session ends when the peer hangs up (the reader sees EOF) or when the
            # worker stops (last word sent, or the peer is gone), whichever comes first.
            await asyncio.wait({reader, worker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # However the peer went away, whatever it waited for is abandoned
            # and whatever it held is released (or aborted, for an uncommitted writer).
            reader.cancel()
            worker.cancel()
            await asyncio.gather(reader, worker, return_exceptions=True)
            if session.pool is not None:
                self.pools[session.pool].release(session)
            del self.sessions[session.id]
            conn.close()  # before the event: whoever awaits it finds the socket gone
            self.events.add(None, "disconnected", session)

    async def _read_frames(self, conn: socket.socket, frames: asyncio.Queue, backlog: list[int]) -> None:
        while True:
            fds: list[int] = []  # what came with this frame (only Restore brings any)
            try:
                header = await self._recv_exact(conn, p.HEADER.size, fds)
                if header is None:
                    return
                (length,) = p.HEADER.unpack(header)
                if length > p.MAX_FRAME:
                    # The stream cannot be trusted past a length like this: say why and hang up.
                    self.events.add(None, "bad_frame", None, reason=f"length {length}")
                    last = p.Error("frame_too_large", f"frame of {length} bytes exceeds {p.MAX_FRAME}; closing")
                elif backlog[0] and backlog[0] + FRAME_OVERHEAD + length > READ_AHEAD:
                    # A client waits for each reply: one this far ahead is not reading them.
                    self.events.add(None, "bad_frame", None, reason=f"read-ahead over {READ_AHEAD} bytes")
                    last = p.Error("too_many_requests", f"over {READ_AHEAD} bytes of requests wait for "
                                                        "their replies; closing")
                elif fds and backlog[0]:
                    # fds only come with Restore, the first request of a session: never queued behind
                    # others, so a peer cannot pile up file descriptors in the server.
                    self.events.add(None, "bad_frame", None, reason="file descriptors behind other requests")
                    last = p.Error("bad_request", "file descriptors may only come with Restore, the first "
                                                  "request of a connection; closing")
                else:
                    body = await self._recv_exact(conn, length, fds)
                    if body is None:
                        return
                    backlog[0] += FRAME_OVERHEAD + length
                    frames.put_nowait(_Frame(body, fds))
                    fds = []
                    continue
            finally:
                _close_all(fds)
            frames.put_nowait(_LastWord(last))
            # The worker sends it after the replies still due; meanwhile read and drop the
            # rest, only to notice the peer hanging up (which ends the session at once).
            while True:
                dropped: list[int] = []
                chunk = await self._recv_some(conn, 1 << 16, dropped)
                _close_all(dropped)
                if not chunk:
                    return

    async def _recv_some(self, conn: socket.socket, n: int, fds: list[int]) -> bytes:
        """Up to n bytes (b"" at EOF), collecting the fds that come with them."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, anc, flags, _ = conn.recvmsg(n, p.ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                ready = loop.create_future()
                loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_reader(conn.fileno())
                continue
            fds.extend(p.fds_of(anc))
            return data

    async def _recv_exact(self, conn: socket.socket, n: int, fds: list[int]) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = await self._recv_some(conn, n - len(buf), fds)
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    async def _handle_frames(self, conn: socket.socket, session: Session, frames: asyncio.Queue,
                             backlog: list[int]) -> None:
        try:
            while True:
                frame = await frames.get()
                if isinstance(frame, _LastWord):
                    await self._send(conn, frame.reply)
                    return
                backlog[0] -= FRAME_OVERHEAD + len(frame.body)
                fds: list[int] = []
                try:
                    request = p.decode_request(frame.body)
                    if isinstance(request, p.Restore):
                        reply = await self._restore(session, request, frame.fds)
                    elif frame.fds:
                        raise PoolError("bad_request", f"{type(request).__name__} takes no file descriptors")
                    else:
                        reply, fds = await self._dispatch(session, request)
                except p.ProtocolError as e:
                    self.events.add(None, "bad_frame", session, reason=str(e)[:200])
                    reply = p.Error("bad_frame", f"cannot decode request: {e}")
                except PoolError as e:
                    reply = p.Error(e.code, str(e))
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a bug of ours must not take the service down
                    logger.exception("request_failed", extra={"fields": {"session": session.id}})
                    reply = p.Error("internal", f"{type(e).__name__}: {e}")
                finally:
                    _close_all(frame.fds)  # those a Restore took are no longer in the list
                try:
                    await self._send(conn, reply, fds)
                finally:
                    _close_all(fds)
        finally:
            # Frames read ahead but never handled (the peer left) may still hold fds.
            while not frames.empty():
                frame = frames.get_nowait()
                if isinstance(frame, _Frame):
                    _close_all(frame.fds)

    # -- requests -------------------------------------------------------------
    async def _dispatch(self, session: Session, req: p.Request) -> tuple[p.Reply, list[int]]:
        if isinstance(req, p.Status):
            return p.StatusReply(self.status()), []
        if isinstance(req, p.Hello):
            if session.pool is not None:
                raise PoolError("bad_state", f"this connection already holds the {session.pool} pool; "
                                             "open another connection for another lock")
            if req.timeout < 0 or req.timeout != req.timeout:
                raise PoolError("bad_request", f"timeout must be >= 0, got {req.timeout}")
            session.name = req.name[:200]
            pool = self.pools[req.pool]
            await pool.acquire(session, req.mode, req.timeout)
            return p.Granted(session.id, pool.name, session.mode, self.backend.name, self.backend.identity(),
                             self.backend.granularity(), pool.content_for(session).layout()), []
        if session.pool is None:
            raise PoolError("bad_state", f"{type(req).__name__} needs a lock first: send Hello")
        pool = self.pools[session.pool]
        if isinstance(req, p.Allocate):
            if req.timeout < 0 or req.timeout != req.timeout:
                raise PoolError("bad_request", f"timeout must be >= 0, got {req.timeout}")
            index, alloc = await pool.allocate(session, req.size, req.timeout)
            return p.Allocated(index, alloc.size), [self.backend.export_fd(alloc.handle, alloc.fd, readonly=False)]
        if isinstance(req, p.Export):
            content = pool.content_for(session)
            count = len(content.allocations)
            indices = list(range(count)) if req.indices is None else req.indices
            if len(indices) > p.MAX_FDS_PER_FRAME:
                raise PoolError("bad_request", f"export at most {p.MAX_FDS_PER_FRAME} allocations per request")
            if any(not 0 <= i < count for i in indices):
                raise PoolError("bad_request", f"allocation index out of range (layout has {count})")
            readonly = session.mode == "ro"
            fds: list[int] = []
            try:
                for i in indices:
                    a = content.allocations[i]
                    fds.append(self.backend.export_fd(a.handle, a.fd, readonly))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            return p.Exported(indices, [content.allocations[i].size for i in indices]), fds
        if isinstance(req, p.GetLayout):
            return p.LayoutReply(pool.content_for(session).layout()), []
        if isinstance(req, p.SetMetadata):
            return p.Ok(pool.set_metadata(session, req.tensors, req.extra, req.replace)), []
        if isinstance(req, p.Commit):
            return p.Ok(pool.commit(session)), []
        if isinstance(req, p.Reset):
            pool.reset(session)
            return p.Ok(pool.content_for(session).layout().hash), []
        raise PoolError("bad_request", f"unknown request {type(req).__name__}")

    async def _restore(self, session: Session, req: p.Restore, fds: list[int]) -> p.Granted:
        """A restarted server takes back what a client maps (see Pool.restore); `fds` are taken
        out of the list as they become the server's."""
        if session.pool is not None:
            raise PoolError("bad_state", f"this connection already holds the {session.pool} pool")
        sizes, g = req.layout.sizes, self.backend.granularity()
        if len(fds) != len(sizes):
            raise PoolError("bad_request", f"Restore of {len(sizes)} allocations came with {len(fds)} fds")
        if not sizes or any(s <= 0 or s % g or s > MAX_ALLOCATION for s in sizes):
            raise PoolError("bad_request", f"Restore needs allocations of positive multiples of {g} bytes")
        validate_extra(req.layout.extra)
        staged = Content([Allocation(s, None, -1) for s in sizes], dict(req.layout.tensors),
                         dict(req.layout.extra))
        for name, meta in staged.tensors.items():
            validate_tensor(name, meta, staged)
        if staged.layout().hash != req.layout.hash:
            raise PoolError("bad_request", f"layout hash {req.layout.hash!r} is not the hash of the layout sent "
                                           f"({staged.layout().hash})")
        pool = self.pools[req.pool]
        session.name = req.name[:200]
        try:
            staged.allocations = self.allocator.adopt(pool.name, session, sizes, fds)
        except BackendError as e:
            raise PoolError("bad_request", f"cannot take the allocations back: {e}") from None
        fds.clear()  # the server's now (released with the content)
        try:
            taken = pool.restore(session, staged)
        except BaseException:
            self.allocator.free(staged.allocations)
            raise
        if not taken:
            self.allocator.free(staged.allocations)  # the pool had them already (another client restored)
        return p.Granted(session.id, pool.name, session.mode, self.backend.name, self.backend.identity(),
                         self.backend.granularity(), pool.content_for(session).layout(), restored=taken)

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "device": self.backend.device,
            "identity": self.backend.identity(),
            "pid": os.getpid(),
            "socket": str(self.path),
            "uptime_s": round(time.time() - self.started_at, 3),
            "granularity": self.backend.granularity(),
            "bytes_in_use": self.allocator.used,
            "bytes_limit": self.allocator.limit,
            "pools": {name: pool.describe() for name, pool in self.pools.items()},
            "sessions": [s.describe() for s in self.sessions.values()],
            "events": self.events.recent(),
        }

    # -- sending --------------------------------------------------------------
    async def _send(self, conn: socket.socket, msg: p.Reply, fds: list[int] = ()) -> None:
        data = p.encode(msg)
        if fds:
            loop = asyncio.get_running_loop()
            while True:
                try:
                    sent = conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    break
                except BlockingIOError:
                    ready = loop.create_future()
                    loop.add_writer(conn.fileno(), ready.set_result, None)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(conn.fileno())
            data = data[sent:]
        await self._send_raw(conn, data)

    async def _send_raw(self, conn: socket.socket, data: bytes) -> None:
        if data:
            await asyncio.get_running_loop().sock_sendall(conn, data)


def _group_id(group: str) -> int:
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ServerError(f"unknown group {group!r}") from None


def _supplementary_groups(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    return set()


def run_server(backend: Backend, socket_path: str | os.PathLike, standby: bool = False, **options: Any) -> None:
    """Bind (a standby: once the live server is gone), serve until SIGTERM/SIGINT, clean up."""
    server = MemoryServer(backend, socket_path, **options)
    if standby and server.metrics_port is not None:
        from understudy.memory import metrics  # noqa: F401  (loaded now, not after the takeover)
    server.bind(standby)
    try:
        asyncio.run(server.serve_forever())
    finally:
        server.close()

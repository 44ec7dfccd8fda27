"""Wire protocol of the memory service.

A frame is a 4-byte big-endian length followed by a msgpack body; the body is
one of the typed messages below, tagged by its `type` field. File descriptors
travel with a frame as SCM_RIGHTS ancillary data: server to client with
Allocated and Exported, client to server only with Restore.

One connection is one session: `Hello` asks for a pool in a mode and, once
granted, the open connection *is* the lock. The kernel closes it however the
client dies, and the server then releases (or aborts) what it held.
"""

from __future__ import annotations

import array
import socket
import struct
from typing import Any, Literal, Union

import msgspec

HEADER = struct.Struct(">I")
MAX_FRAME = 16 << 20  # metadata of the largest models is far below this
MAX_FDS_PER_FRAME = 250  # the kernel's SCM_MAX_FD is 253

Pool = Literal["weights", "kv"]
Mode = Literal["rw", "ro"]


class ProtocolError(RuntimeError):
    """A frame could not be read or did not make sense."""


# ---------------------------------------------------------------- layout --
class TensorMeta(msgspec.Struct, frozen=True, array_like=True):
    """Where one tensor lives: an allocation (its index in the layout) and a byte offset."""

    alloc: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


class Layout(msgspec.Struct, frozen=True):
    """Allocations (their sizes, in order) and what they hold."""

    sizes: list[int] = []
    tensors: dict[str, TensorMeta] = {}
    extra: dict[str, Any] = {}
    hash: str = ""


# -------------------------------------------------------------- requests --
class Hello(msgspec.Struct, tag=True):
    pool: Pool
    mode: Mode
    timeout: float = 30.0  # seconds to wait for the lock; 0 means try once
    name: str = ""


class Allocate(msgspec.Struct, tag=True):
    size: int
    timeout: float = 30.0  # seconds to retry while the device is out of memory


class Export(msgspec.Struct, tag=True):
    indices: list[int] | None = None  # None: every allocation of the layout


class GetLayout(msgspec.Struct, tag=True):
    pass


class SetMetadata(msgspec.Struct, tag=True):
    tensors: dict[str, TensorMeta] = {}
    extra: dict[str, Any] = {}
    replace: bool = False  # False: merge into what is there


class Commit(msgspec.Struct, tag=True):
    pass


class Reset(msgspec.Struct, tag=True):
    pass


class Status(msgspec.Struct, tag=True):
    pass


class Restore(msgspec.Struct, tag=True):
    """Hello with memory the client already maps: a restarted server takes it back into `pool`.

    One fd per allocation of `layout` comes with the frame, in order. The weights pool takes
    them when it is empty (the session becomes a reader) or attaches the session as a reader
    when it already holds the same layout; the kv pool takes them when it is empty (the
    session becomes its owner). `layout.hash` must be the hash of the rest of `layout`."""

    pool: Pool
    layout: Layout
    name: str = ""


Request = Union[Hello, Allocate, Export, GetLayout, SetMetadata, Commit, Reset, Status, Restore]


# --------------------------------------------------------------- replies --
class Granted(msgspec.Struct, tag=True):
    session: int
    pool: str
    mode: str
    backend: str
    identity: str
    granularity: int
    layout: Layout
    restored: bool = False  # Restore only: the pool took the client's allocations (else it had them)


class Allocated(msgspec.Struct, tag=True):
    index: int
    size: int  # rounded up to the granularity; the fd comes with the frame


class Exported(msgspec.Struct, tag=True):
    indices: list[int]
    sizes: list[int]  # one fd per index comes with the frame, in order


class LayoutReply(msgspec.Struct, tag=True):
    layout: Layout


class Ok(msgspec.Struct, tag=True):
    layout_hash: str = ""


class StatusReply(msgspec.Struct, tag=True):
    status: dict[str, Any]


class Error(msgspec.Struct, tag=True):
    code: str  # timeout, bad_frame, bad_request, bad_state, out_of_memory, permission, ...
    message: str


Reply = Union[Granted, Allocated, Exported, LayoutReply, Ok, StatusReply, Error]

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(msg: msgspec.Struct) -> bytes:
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


# BUGFIX (tests/memory/test_protocol.py::test_deeply_nested_body_is_a_bad_frame): msgspec raises
# RecursionError for deeply nested bodies; it is undecodable input too (bad_frame, not internal).
def decode_request(body: bytes) -> Request:
    try:
        return _request_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        raise ProtocolError(str(e)) from e


def decode_reply(body: bytes) -> Reply:
    try:
        return _reply_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        raise ProtocolError(str(e)) from e


# ------------------------------------------------- blocking socket helpers --
def send_frame(sock: socket.socket, msg: msgspec.Struct, fds: list[int] = ()) -> None:
    data = encode(msg)
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4)


def fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors that came with a recvmsg (the caller owns them)."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    return fds


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    chunks, need = [], n
    while need:
        data, anc, flags, _ = sock.recvmsg(need, ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds.extend(fds_of(anc))
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("file descriptors were truncated in transit")
        if not data:
            raise ConnectionError("memory service closed the connection")
        chunks.append(data)
        need -= len(data)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[Reply, list[int]]:
    """Read one reply and the fds that came with it (the caller owns them)."""
    fds: list[int] = []
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size, fds))
    if length > MAX_FRAME:
        raise ProtocolError(f"reply of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return decode_reply(_recv_exact(sock, length, fds)), fds

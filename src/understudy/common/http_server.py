"""How the engine and the frontend serve HTTP: uvicorn with bounds a slow or abusive client cannot get round.

uvicorn alone bounds an idle keep-alive connection (after an answer), but not one that connects and
never finishes its request head: a client that sends nothing, or trickles a header byte every few
seconds (slowloris), holds its socket, its file descriptor and its slot under --limit-concurrency
forever. `GuardedH11` closes such a connection once its request head has taken `--header-timeout`
seconds (counted from the connection, or from the first byte of the next request on a kept-alive
one; trickling does not reset it). The head's size is bounded too (--max-header-bytes: a longer one is
answered 431 and the connection closed), and --limit-concurrency answers 503 beyond that many
connections + in-flight requests.

    config = uvicorn.Config(app, host=..., port=..., **server_limits(limits))

The flags: add_http_limit_arguments (the same for `serve` and `frontend`).
"""

from __future__ import annotations

import argparse
import asyncio
import re
from dataclasses import dataclass
from typing import Any

from understudy.common.units import parse_size, positive_int

DEFAULT_TIMEOUT_KEEP_ALIVE = 5.0
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_HEADER_BYTES = 64 << 10


@dataclass(frozen=True)
class HTTPLimits:
    timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE  # an idle kept-alive connection is closed after it
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # a request head must be complete within it
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # request line + headers
    limit_concurrency: int | None = None  # connections + in-flight requests beyond it: 503


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def _size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def add_http_limit_arguments(g) -> None:
    """The flags of the connection bounds, into an argument group (`HTTP` of serve and frontend)."""
    g.add_argument("--timeout-keep-alive", type=_positive_float, default=DEFAULT_TIMEOUT_KEEP_ALIVE,
                   metavar="SECONDS",
                   help="close a kept-alive connection that sends no new request for this long "
                        f"(default: {DEFAULT_TIMEOUT_KEEP_ALIVE:g})")
    g.add_argument("--header-timeout", type=_positive_float, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                   help="close a connection whose request line and headers are not complete this long after it "
                        "opened (or after the first byte of its next request): slow or silent clients cannot "
                        f"hold sockets (default: {DEFAULT_HEADER_TIMEOUT:g})")
    g.add_argument("--max-header-bytes", type=_size, default=DEFAULT_MAX_HEADER_BYTES, metavar="BYTES",
                   help="largest request line + headers, e.g. 64KiB; a larger head gets 431 and the connection "
                        f"is closed (default: {DEFAULT_MAX_HEADER_BYTES})")
    g.add_argument("--limit-concurrency", type=positive_int, default=None, metavar="N",
                   help="answer 503 to new requests while N connections or requests are open (idle "
                        "keep-alive connections count; /health and /live too): sheds load before memory or "
                        "file descriptors run out (default: no limit)")


def limits_from_args(ns: argparse.Namespace) -> HTTPLimits:
    return HTTPLimits(timeout_keep_alive=ns.timeout_keep_alive, header_timeout=ns.header_timeout,
                      max_header_bytes=ns.max_header_bytes, limit_concurrency=ns.limit_concurrency)


TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
             b"connection: close\r\ncontent-length: 32\r\n\r\nrequest header fields too large\n")
_BLANK_LINE = re.compile(rb"\n\r?\n")  # the end of a request head, as h11 finds it
LINGER_S = 1.0  # after a 431: how long the rest of an oversized head is read and dropped before closing


def guarded_h11(header_timeout: float, max_header_bytes: int) -> type:
    """uvicorn's h11 protocol, with the request head bounded in time (header_timeout: the connection is
    closed) and in size (max_header_bytes: 431, then the connection is closed).

    h11's own size bound (h11_max_incomplete_event_size, set too) only applies to a head still incomplete
    when its bytes arrive: one that arrives whole in a read of any size went through, so the size is
    counted here, up to the blank line that ends the head."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0  # of the request head being received
        _tail = b""  # its last bytes: a blank line may straddle two reads
        _rejected = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self._rejected:
                return  # the rest of an oversized head: dropped until the client or LINGER_S closes
            if self.conn.their_state is h11.IDLE:
                if self._head_timer is None:
                    self._arm_head_timer()  # the first byte of the next request on a kept-alive connection
                if self._too_large(data):
                    return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is parsed (or the connection failed)
                self._cancel_head_timer()
                self._head_bytes, self._tail = 0, b""

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _too_large(self, data: bytes) -> bool:
            seen = self._tail + data
            end = _BLANK_LINE.search(seen)
            head = len(data) if end is None else end.end() - len(self._tail)  # bytes of this read in the head
            self._head_bytes += head
            self._tail = seen[-3:]
            if self._head_bytes <= max_header_bytes:
                return False
            self._cancel_head_timer()
            self._rejected = True
            self.transport.write(TOO_LARGE)
            if self.transport.can_write_eof():
                self.transport.write_eof()  # the answer is read before the close (no reset loses it)
            self.loop.call_later(LINGER_S, self.transport.close)
            return True

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no answer: there is no request to answer

    return GuardedH11


def server_limits(limits: HTTPLimits) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for these limits (h11, whose head size can be bounded)."""
    return {"http": guarded_h11(limits.header_timeout, limits.max_header_bytes),
            "timeout_keep_alive": limits.timeout_keep_alive,
            "h11_max_incomplete_event_size": limits.max_header_bytes,
            "limit_concurrency": limits.limit_concurrency}


async def warm_streaming() -> None:
    """Load now what the process's first streamed answer would load in that answer's way.

    Starlette streams a response inside an anyio task group, and anyio imports its asyncio backend on the
    first one: 20-45 ms. In a promoted shadow that first answer is the first token after a failover
    (bench/failover.py saw it between the step and the client); in an active engine, its first request's.
    Called on the server's loop at startup, before anything is frozen (gc.freeze)."""
    import anyio

    async with anyio.create_task_group():
        pass

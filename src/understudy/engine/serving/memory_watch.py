"""Engines outlive their memory service: notice it die, hand a restarted one our memory back.

While the service is down the engine goes on serving from its mappings (nothing on the
decode path talks to it). When a new service listens on the same socket (a standby that
took over within milliseconds, `memory-server --standby`, or a restarted one), the engine,
polling for it every few ms, gives it back what it maps, without touching the disk: the
weights (the first engine back restores the pool, the others find the same layout and read
it) and, from the engine that owns it, the kv pool with its sealed-block index, so later
shadows import and adopt as before. A service that comes back holding other weights is
logged as an error: this engine keeps serving from its own mappings but can no longer sleep
and wake.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable

from understudy.logs import log
from understudy.memory import MemoryServiceError

logger = logging.getLogger("understudy.engine.serving.memory_watch")

# Reaching the next service: every RETRY_FAST s for the first FAST_FOR s after the loss (a standby
# takes over within milliseconds, a cold start takes a few hundred ms, a second or two on CUDA; a
# connect to a Unix socket costs microseconds, so 200 tries a second cost nothing), then backing off
# (doubling) to RETRY_MAX, which also bounds one connect attempt. parallel/rank.py's watch takes the same.
RETRY_FAST, FAST_FOR = 0.005, 10.0
RETRY_MAX = 0.5


def retry_delays():
    """Seconds to sleep between attempts to reach a service that went away (see RETRY_FAST)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < FAST_FOR:
        yield RETRY_FAST
    delay = RETRY_FAST
    while True:
        delay = min(2 * delay, RETRY_MAX)
        yield delay


async def _connected(path: str) -> socket.socket:
    """A connection to the service at `path`, retrying (see retry_delays) until one listens there."""
    loop = asyncio.get_running_loop()
    delays = retry_delays()
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # Bounded: a non-blocking AF_UNIX connect that gets EAGAIN waits for writability,
            # which a listener that never accepts would never give.
            await asyncio.wait_for(loop.sock_connect(sock, path), RETRY_MAX)
            return sock
        except (OSError, asyncio.TimeoutError) as e:  # no socket yet (ENOENT), a stale one (ECONNREFUSED)
            log(logger, "memory_service_unreachable", logging.DEBUG, error=repr(e))
            sock.close()
        await asyncio.sleep(next(delays))


def give_back(worker) -> dict[str, str]:
    """Restore what this engine maps into a restarted service; what happened to each pool."""
    out: dict[str, str] = {}
    weights = worker.weights
    if weights is not None and weights.mappings and all(m.mapped for m in weights.mappings.values()):
        try:
            out["weights"] = "restored" if weights.restore() else "attached"
        except MemoryServiceError as e:
            out["weights"] = f"refused: {e}"
    else:
        out["weights"] = "not mapped"  # asleep: wake_up reconnects (and checks the layout)
    kv = worker.engine.engine.kv
    if kv.client is not None and kv.client.mappings:  # we own the kv pool (not a parked or asleep engine)
        try:
            kv.client.restore()
            out["kv"] = "restored"
        except MemoryServiceError as e:
            out["kv"] = f"refused: {e}"
    return out


async def watch_memory_service(worker, path: str, control: asyncio.Lock,
                               restart: Callable[[], None] | None = None) -> None:
    """Run for the engine's life: wait for the service to die, then for the next one, and give back.

    `control` serialises this with sleep/wake_up; `restart`, if given, starts the next service
    (an engine that started its own)."""
    try:
        await _watch(worker, path, control, restart)
    except asyncio.CancelledError:
        raise
    except Exception:  # a bug of ours: say so, or the engine would silently stop watching
        logger.exception("memory_watch_failed")
        raise


async def _watch(worker, path: str, control: asyncio.Lock, restart: Callable[[], None] | None) -> None:
    loop = asyncio.get_running_loop()
    lost_at: float | None = None
    while True:
        sock = await _connected(path)
        try:
            if lost_at is not None:
                try:
                    async with control:
                        t0 = time.perf_counter()
                        outcome = await asyncio.to_thread(give_back, worker)
                        outcome["give_back_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
                except OSError as e:  # the service went away again meanwhile: wait for the next one
                    log(logger, "memory_service_recovery_interrupted", logging.WARNING, error=str(e))
                    await asyncio.sleep(RETRY_MAX)
                    continue
                failed = any(str(v).startswith("refused") for v in outcome.values())
                log(logger, "memory_service_recovered", logging.ERROR if failed else logging.INFO,
                    seconds=round(time.monotonic() - lost_at, 3), **outcome)
            # The service never writes to this connection: it becomes readable only at EOF.
            try:
                while await loop.sock_recv(sock, 1 << 12):
                    pass
            except OSError:  # reset: gone just the same
                pass
        finally:
            sock.close()
        lost_at = time.monotonic()
        log(logger, "memory_service_lost", logging.WARNING, socket=path, state=worker.state,
            note="serving on from our mappings; waiting for a restarted service")
        if restart is not None:
            restart()  # on this (the main) thread: see launch.spawn_memory_service

"""An engine's lifecycle: INIT -> STANDBY (parked shadow) -> WAKING -> ACTIVE -> DRAINING / DEAD, with
ACTIVE <-> SLEEPING (sleep / wake_up) and STANDBY / SLEEPING <-> QUIESCED (a snapshot, serving/control.py).

common/states.py names the states and says what each means (torch-free: the frontend counts engines by
them). Every transition is logged and counted; requests wait for ACTIVE (bounded); a promotion waits out
a snapshot's QUIESCED."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Callable

from understudy.common.states import STATES
from understudy.logs import log

logger = logging.getLogger("understudy.engine.serving.lifecycle")

_SETTLED = ("ACTIVE", "DRAINING", "DEAD")  # a request waiting for ACTIVE stops waiting in these


class Lifecycle:
    def __init__(self, state: str = "INIT"):
        self.state = state
        self.since = time.monotonic()
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.failovers = 0
        self.last_switch_s: float | None = None  # lock acquired -> serving, on the last promotion
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: asyncio.Event | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._changed = threading.Condition()  # transitions that test the state take it (swap, set_unquiesced)

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call listener(state) on the bound loop after each transition (e.g. to tell discovery)."""
        self._listeners.append(listener)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the HTTP server's loop, so requests can await ACTIVE."""
        self._loop = loop
        self._active = asyncio.Event()  # set while the state is ACTIVE or final (DRAINING, DEAD): no more waiting
        if self.state in _SETTLED:
            self._active.set()

    def set(self, state: str, **fields) -> None:
        """Thread-safe: the promotion runs on its own thread."""
        assert state in STATES, state
        with self._changed:
            old, self.state = self.state, state
            self.transitions[(old, state)] += 1
            log(logger, "state", old=old, new=state, after_s=round(time.monotonic() - self.since, 4), **fields)
            self.since = time.monotonic()
            self._changed.notify_all()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._sync_event)

    def swap(self, expected: tuple[str, ...], state: str, **fields) -> str | None:
        """Set `state` if the current one is in `expected`, atomically; the old state, or None if unchanged."""
        with self._changed:
            old = self.state
            if old not in expected:
                return None
            self.set(state, **fields)
            return old

    def set_unquiesced(self, state: str, **fields) -> None:
        """Set `state` once the engine is not QUIESCED (blocking: the promotion thread waits here for a
        snapshot's resume, so it never takes over with its weights unmapped)."""
        with self._changed:
            self._changed.wait_for(lambda: self.state != "QUIESCED")
            self.set(state, **fields)

    def _sync_event(self) -> None:
        if self.state in _SETTLED:  # held requests go on, or are refused at once when the engine is ending
            self._active.set()
        else:
            self._active.clear()
        for listener in self._listeners:
            listener(self.state)

    async def wait_active(self, timeout: float) -> bool:
        if self.state == "ACTIVE":
            return True
        if self.state in ("DRAINING", "DEAD") or self._active is None:
            return False
        try:
            await asyncio.wait_for(self._active.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return self.state == "ACTIVE"

"""What the frontend knows of each engine: its discovery record, its last /health and our own counts.

State comes from two sources, the newest wins: the record (pushed by the engine at once when its
lifecycle changes) and /health (polled). An engine is not routable before its first good poll, after
a failed poll or a broken connection (until a poll succeeds again), while canaries fail, and while it is
*suspect*: a stream on it stalled (no token for --stall-timeout) until it shows progress again (a token
on any of our streams from it, or polls that find it idle or its counts moving).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from understudy.discovery.records import EngineRecord, View
from understudy.logs import log

logger = logging.getLogger("understudy.frontend.pool")


@dataclass(eq=False)
class EngineState:
    record: EngineRecord
    state: str = "INIT"
    routable_flag: bool = False  # the engine's own word (record or /health)
    health: dict[str, Any] = field(default_factory=dict)  # last good /health body
    polled: bool = False  # a poll has succeeded at least once
    reachable: bool = False  # the last poll / request got through
    healthy: bool = True  # the last canary passed (or none ran)
    inflight: int = 0  # this frontend's requests on the engine now
    inflight_at_poll: int = 0  # ... when /health was last read (its counts include those)
    last_used: float = 0.0  # monotonic time our last request there ended (canaries go to idle engines)
    poke: asyncio.Event = field(default_factory=asyncio.Event)  # poll now
    removed: bool = False
    suspect: str | None = None  # why a stream on it stalled; None: not suspect
    suspect_counts: tuple | None = None  # (running, waiting, kv usage) at the first poll after the stall

    def __post_init__(self) -> None:
        self.state, self.routable_flag = self.record.state, self.record.routable

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def url(self) -> str:
        return self.record.url

    @property
    def node(self) -> str:
        return self.record.node

    @property
    def routable(self) -> bool:
        """Takes new work."""
        return (self.polled and self.reachable and self.healthy and self.suspect is None and self.state == "ACTIVE"
                and self.routable_flag)

    @property
    def running(self) -> int:
        return int(self.health.get("running", 0))

    @property
    def waiting(self) -> int:
        return int(self.health.get("waiting", 0))

    @property
    def kv_usage(self) -> float:
        return float(self.health.get("kv_cache_usage", 0.0))

    @property
    def load(self) -> int:
        """Requests on the engine: the polled counts plus ours started since (minus ours ended since)."""
        return max(0, self.running + self.waiting + self.inflight - self.inflight_at_poll)

    @property
    def status(self) -> str:
        """For people and metrics: the lifecycle state, or why we do not use the engine."""
        if not self.reachable:
            return "UNREACHABLE"
        if not self.healthy:
            return "UNHEALTHY"
        if self.suspect is not None:
            return "SUSPECT"
        return self.state

    def unreachable(self) -> None:
        """A request could not get through: no new work until a poll succeeds."""
        self.reachable = False
        self.poke.set()

    def stalled(self, reason: str) -> None:
        """A stream on it got no token for too long: no new work until it shows progress."""
        if self.suspect is None:
            log(logger, "engine_suspect", logging.WARNING, id=self.id, url=self.url, reason=reason)
        self.suspect, self.suspect_counts = reason, None
        self.poke.set()

    def progressed(self, how: str) -> None:
        """It sent a token, or its polls show it working (or idle): not suspect any more."""
        if self.suspect is not None:
            log(logger, "engine_suspect_cleared", id=self.id, url=self.url, how=how)
            self.suspect = self.suspect_counts = None

    def polled_ok(self, body: dict[str, Any]) -> None:
        self.health = body
        self.state = body.get("state", self.state)
        self.routable_flag = bool(body.get("routable", self.state == "ACTIVE"))
        self.inflight_at_poll = self.inflight
        self.polled = self.reachable = True
        if self.suspect is not None:
            # Answering is not enough (a stuck engine thread does not stop the HTTP loop): it must be idle
            # (nothing to make progress on) or its counts must move between two polls after the stall.
            counts = (self.running, self.waiting, self.kv_usage)
            if counts[:2] == (0, 0):
                self.progressed("idle")
            elif self.suspect_counts is None:
                self.suspect_counts = counts
            elif counts != self.suspect_counts:
                self.progressed("counts moved")

    def describe(self, busy: bool) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "node": self.node, "role": self.record.role, "pid": self.record.pid,
                "state": self.state, "status": self.status, "routable": self.routable, "busy": busy,
                "running": self.running, "waiting": self.waiting, "kv_cache_usage": self.kv_usage,
                "inflight": self.inflight, "healthy": self.healthy, "reachable": self.reachable,
                "suspect": self.suspect}


class Pool:
    """The engines discovery knows, kept in step with a View; watchers hear additions and removals."""

    def __init__(self, view: View):
        self.view = view
        self.engines: dict[str, EngineState] = {}
        self.on_added: list[Callable[[EngineState], None]] = []
        view.listen(self._changed)

    def start(self) -> None:
        for record in list(self.view.records.values()):
            self._changed("put", record.id, record)

    def _changed(self, kind: str, engine_id: str, record: EngineRecord | None) -> None:
        if kind == "delete":
            engine = self.engines.pop(engine_id, None)
            if engine is not None:
                engine.removed = True
                engine.poke.set()  # its poller ends
            return
        engine = self.engines.get(engine_id)
        if engine is None:
            engine = self.engines[engine_id] = EngineState(record)
            for watcher in self.on_added:
                watcher(engine)
        else:
            engine.record = record
            engine.state, engine.routable_flag = record.state, record.routable
        engine.poke.set()  # confirm with a poll now (a promotion is routable at once)

    def __iter__(self):
        return iter(list(self.engines.values()))

    def idle_for(self, engine: EngineState) -> float:
        return time.monotonic() - engine.last_used if engine.inflight == 0 else 0.0

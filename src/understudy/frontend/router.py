"""Which engine takes a request.

New work goes to ACTIVE, routable engines only, the least loaded that is not busy. Busy means KV
usage or queue depth (from the last poll) at or above the thresholds, which can change at run time.
When every active engine is busy the request is shed (503 + Retry-After). A broken request goes first
to an engine of the same node (the shadow that takes over the dead engine's KV cache and prefixes;
a standby holds the request until it is promoted), then to any active engine, busy or not: it was
admitted already, shedding it now would lose the client's answer. A request whose engine stalled (hung,
not dead: it still holds its node's failover lock, so the node's standby cannot take over until something
kills it) goes to an active engine first: its node's promoted shadow, else any; only then to a standby.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from understudy.frontend.pool import EngineState, Pool

# A broken request's preferred targets on its node: serving now, about to, parked (it holds the request
# until promoted), parked but paused for a snapshot (the promotion waits for the resume).
WAKING_ORDER = {"ACTIVE": 0, "WAKING": 1, "STANDBY": 2, "QUIESCED": 3}


class NoEngine(RuntimeError):
    """No active engine: 503."""


class AllBusy(RuntimeError):
    """Every active engine is busy: 503 + Retry-After."""


@dataclass
class Thresholds:
    kv_usage: float = 0.95  # busy at or above this fraction of KV blocks in use
    waiting: int = 32  # busy with this many requests waiting or more

    def update(self, changes: dict) -> "Thresholds":
        """Validated partial update; raises ValueError naming the bad field."""
        kv = changes.get("kv_usage", self.kv_usage)
        waiting = changes.get("waiting", self.waiting)
        unknown = set(changes) - {"kv_usage", "waiting"}
        if unknown:
            raise ValueError(f"unknown thresholds: {sorted(unknown)} (known: kv_usage, waiting)")
        if isinstance(kv, bool) or not isinstance(kv, (int, float)) or not 0 < kv <= 1:
            raise ValueError(f"kv_usage must be a number in (0, 1], got {kv!r}")
        if isinstance(waiting, bool) or not isinstance(waiting, int) or waiting < 1:
            raise ValueError(f"waiting must be an integer >= 1, got {waiting!r}")
        self.kv_usage, self.waiting = float(kv), waiting
        return self

    def as_dict(self) -> dict:
        return asdict(self)


class Router:
    def __init__(self, pool: Pool, thresholds: Thresholds, model: str):
        self.pool = pool
        self.thresholds = thresholds
        self.model = model

    def busy(self, e: EngineState) -> bool:
        return e.kv_usage >= self.thresholds.kv_usage or e.waiting >= self.thresholds.waiting

    def _serves(self, e: EngineState) -> bool:
        return e.record.model == self.model

    def active(self) -> list[EngineState]:
        return [e for e in self.pool if e.routable and self._serves(e)]

    def pick(self, exclude: set[str] = frozenset()) -> EngineState:
        """An engine for new work, or NoEngine / AllBusy."""
        candidates = [e for e in self.active() if e.id not in exclude]
        if not candidates:
            raise NoEngine("no active engine serves this model")
        free = [e for e in candidates if not self.busy(e)]
        if not free:
            raise AllBusy(f"all {len(candidates)} active engines are busy")
        least = min(e.load for e in free)
        return random.choice([e for e in free if e.load == least])  # spread ties

    def pick_for_migration(self, node: str, exclude: set[str], hung: bool = False) -> EngineState:
        """Where a broken request goes: its node's next engine (active, waking or standby), else any
        active engine, preferring one that is not busy. `hung`: the failed engine stalled rather than
        died, so its node's standby may never be promoted: active engines anywhere come before it."""
        same = [e for e in self.pool if e.node == node and e.id not in exclude and e.reachable and e.healthy
                and e.suspect is None and e.state in WAKING_ORDER and self._serves(e)]
        if hung:
            same = [e for e in same if e.state == "ACTIVE" and e.routable_flag] or (
                [] if any(e.id not in exclude for e in self.active()) else same)
        if same:
            return min(same, key=lambda e: (WAKING_ORDER[e.state], e.load))
        candidates = [e for e in self.active() if e.id not in exclude]
        if not candidates:
            raise NoEngine("no other engine to move the request to")
        return min(candidates, key=lambda e: (self.busy(e), e.load))

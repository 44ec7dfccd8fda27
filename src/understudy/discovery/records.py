"""What an engine publishes about itself, and the frontend's view of all published records."""

from __future__ import annotations

import logging
import time
from typing import Callable

import msgspec

from understudy.logs import log

logger = logging.getLogger("understudy.discovery")


class EngineRecord(msgspec.Struct, kw_only=True):
    id: str  # unique per engine process: host, port and pid
    url: str  # where the frontend reaches it (http://host:port)
    model: str  # the served model name
    # The failover group: engines of one node share a failover lock, so a dead engine's work goes
    # first to an engine of the same node (its shadow, which takes over the KV cache and the prefixes).
    node: str
    role: str = "primary"  # what it was started as: primary or shadow
    state: str = "INIT"  # lifecycle state at the last update
    routable: bool = False  # takes new work (ACTIVE)
    max_model_len: int = 0
    pid: int = 0
    registered_at: float = msgspec.field(default_factory=time.time)
    # Seconds the record outlives the engine's last keep-alive (its --registration-ttl; 0: not said).
    # An engine that lost its registry registers again within a third of it once the registry is back.
    ttl: float = 0.0


def encode(record: EngineRecord) -> bytes:
    return msgspec.json.encode(record)


def decode(data: bytes | str) -> EngineRecord:
    return msgspec.json.decode(data, type=EngineRecord)


Listener = Callable[[str, str, "EngineRecord | None"], None]  # (kind "put"/"delete", id, record)


class View:
    """The records a frontend knows, kept up to date by a discovery backend; listeners hear changes."""

    def __init__(self) -> None:
        self.records: dict[str, EngineRecord] = {}
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _put(self, record: EngineRecord) -> None:
        old = self.records.get(record.id)
        self.records[record.id] = record
        if old is None:
            log(logger, "engine_registered", id=record.id, url=record.url, node=record.node, role=record.role,
                state=record.state)
        elif (old.state, old.routable) != (record.state, record.routable):
            log(logger, "engine_updated", id=record.id, state=record.state, routable=record.routable)
        for listener in self._listeners:
            listener("put", record.id, record)

    def _delete(self, engine_id: str, reason: str) -> None:
        record = self.records.pop(engine_id, None)
        if record is None:
            return
        log(logger, "engine_deregistered", id=engine_id, url=record.url, reason=reason)
        for listener in self._listeners:
            listener("delete", engine_id, record)

    async def start(self) -> None:
        """Begin following the backend (the embedded registry needs nothing)."""

    async def stop(self) -> None:
        pass

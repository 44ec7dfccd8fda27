"""The engine's side of discovery: register, keep the lease alive, publish state changes, deregister.

One `Registration` per target (`--register` may repeat): an embedded registry (the frontend's URL)
or etcd (etcd://HOST:PORT). It runs as an asyncio task on the engine's HTTP loop: a keep-alive
every TTL/3, an update at once when the lifecycle state changes (a promoted shadow becomes routable
without waiting for a poll), and a deregistration when the engine shuts down. A registry that cannot
be reached is retried at the same pace; the engine serves meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable
from urllib.parse import urlsplit

import httpx
import msgspec

from understudy.logs import log
from understudy.discovery.etcd import EtcdAddress, EtcdTarget
from understudy.discovery.records import EngineRecord

logger = logging.getLogger("understudy.discovery.registration")

DEREGISTER_TIMEOUT = 3.0


class EmbeddedTarget:
    """A frontend's embedded registry, over HTTP."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        self.base = url.rstrip("/")
        # A connection per call, none held between keep-alives: an engine being checkpointed (CRIU) or
        # a frontend restarting meets no half-open connection of ours. `headers`: the admin token
        # (common/auth.py), which the registry's routes require.
        self.http = httpx.AsyncClient(timeout=5.0, limits=httpx.Limits(max_keepalive_connections=0),
                                      headers=headers)

    async def register(self, record: EngineRecord, ttl: float) -> None:
        r = await self.http.post(f"{self.base}/registry/engines",
                                 json={"record": msgspec.to_builtins(record), "ttl": ttl})
        r.raise_for_status()

    async def keepalive(self, engine_id: str) -> bool:
        r = await self.http.put(f"{self.base}/registry/engines/{engine_id}/keepalive")
        if r.status_code == 404:  # expired (we were too slow, or the frontend restarted)
            return False
        r.raise_for_status()
        return True

    async def deregister(self, engine_id: str) -> None:
        r = await self.http.delete(f"{self.base}/registry/engines/{engine_id}")
        if r.status_code != 404:
            r.raise_for_status()

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        await self.http.aclose()


def target_for(url: str, headers: dict[str, str] | None = None) -> EmbeddedTarget | EtcdTarget:
    if url.startswith("etcd://"):
        return EtcdTarget(EtcdAddress.parse(url))
    if urlsplit(url).scheme in ("http", "https"):
        return EmbeddedTarget(url, headers)
    raise ValueError(f"cannot register at {url!r}: give a frontend's URL (http://HOST:PORT) or etcd://HOST:PORT")


def advertised_url(host: str, port: int, advertise_url: str | None) -> str:
    """Where others reach us: --advertise-url, or our own address (the host name for 0.0.0.0)."""
    if advertise_url:
        return advertise_url.rstrip("/")
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


class Registration:
    def __init__(self, target_url: str, record: Callable[[], EngineRecord], ttl: float,
                 headers: dict[str, str] | None = None):
        self.target_url = target_url
        self.target = target_for(target_url, headers)
        self.record = record  # the record as of now (state, routable)
        self.ttl = ttl
        self.registered = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"registration {self.target_url}")

    def changed(self) -> None:
        """The record changed (lifecycle state): publish it now."""
        self._changed.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if not self.registered or self._changed.is_set():
                    self._changed.clear()
                    record = msgspec.structs.replace(self.record(), ttl=self.ttl)
                    await self.target.register(record, self.ttl)
                    if not self.registered:
                        log(logger, "registered", target=self.target_url, id=record.id, url=record.url,
                            node=record.node, state=record.state, ttl=self.ttl)
                    self.registered = True
                elif not await self.target.keepalive(self.record().id):
                    log(logger, "registration_lost", logging.WARNING, target=self.target_url)
                    self.registered = False
                    continue  # register again at once
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the registry is away: keep serving, keep trying
                if failures == 0:
                    log(logger, "registration_failed", logging.WARNING, target=self.target_url,
                        error=f"{type(e).__name__}: {e}")
                failures += 1
                self.registered = False
                await self.target.reset()
            try:  # next keep-alive, or sooner when the record changes
                await asyncio.wait_for(self._changed.wait(), self.ttl / 3)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        """Stop the keep-alives and deregister (bounded: a registry that is away must not hold us)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        engine_id = self.record().id
        try:
            await asyncio.wait_for(self.target.deregister(engine_id), DEREGISTER_TIMEOUT)
            log(logger, "deregistered", target=self.target_url, id=engine_id)
        except Exception as e:  # noqa: BLE001 - the lease expires on its own
            log(logger, "deregister_failed", logging.WARNING, target=self.target_url, error=f"{type(e).__name__}: {e}")
        finally:
            self.registered = False
            await self.target.close()

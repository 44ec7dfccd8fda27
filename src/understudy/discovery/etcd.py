"""Discovery over etcd (through `aetcd`): for many nodes and frontends.

Each engine puts its record at `<prefix>/engines/<id>` with a lease of its own (TTL, refreshed by
keep-alives), so the key vanishes when the engine dies without saying goodbye. Frontends read the
prefix once and then watch it from the next revision on, so no change falls between the two.

    etcd://HOST:PORT            keys under /understudy
    etcd://HOST:PORT/myprefix   keys under /myprefix
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from urllib.parse import urlsplit

from understudy.logs import log
from understudy.discovery.records import EngineRecord, View, decode, encode

logger = logging.getLogger("understudy.discovery.etcd")

DEFAULT_PREFIX = "/understudy"
RPC_TIMEOUT = 5  # seconds for one etcd call


@dataclass(frozen=True)
class EtcdAddress:
    host: str
    port: int
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def parse(cls, url: str) -> "EtcdAddress":
        parts = urlsplit(url)
        if parts.scheme != "etcd" or not parts.hostname:
            raise ValueError(f"not an etcd address: {url!r} (expected etcd://HOST:PORT[/prefix])")
        prefix = parts.path.rstrip("/") or DEFAULT_PREFIX
        return cls(parts.hostname, parts.port or 2379, prefix)

    @property
    def engines(self) -> bytes:
        return f"{self.prefix}/engines/".encode()

    def key(self, engine_id: str) -> bytes:
        return self.engines + engine_id.encode()

    def client(self):
        import aetcd  # only where etcd is used: it brings grpc along

        return aetcd.Client(self.host, self.port, timeout=RPC_TIMEOUT)


def require_aetcd() -> None:
    """Fail at start-up, not at the first registration, when the etcd client is missing."""
    try:
        import aetcd  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"etcd discovery needs the aetcd package ({e}): pip install 'understudy[etcd]'") from None


class EtcdTarget:
    """The engine's side: its record under a lease (see registration.Registration)."""

    def __init__(self, address: EtcdAddress):
        require_aetcd()
        self.address = address
        self._client = None
        self._lease = None

    async def _connected(self):
        if self._client is None:
            self._client = self.address.client()
            await self._client.connect()
        return self._client

    async def register(self, record: EngineRecord, ttl: float) -> None:
        client = await self._connected()
        if self._lease is None:
            self._lease = await client.lease(max(1, math.ceil(ttl)))  # etcd counts whole seconds
        await client.put(self.address.key(record.id), encode(record), lease=self._lease)

    async def keepalive(self, engine_id: str) -> bool:
        if self._lease is None:
            return False
        reply = await (await self._connected()).refresh_lease(self._lease.id)
        if reply is None or reply.TTL <= 0:  # expired (etcd was away, or we were too slow): register again
            self._lease = None
            return False
        return True

    async def deregister(self, engine_id: str) -> None:
        client = await self._connected()
        if self._lease is not None:
            await client.revoke_lease(self._lease.id)  # deletes the key with it
            self._lease = None
        else:
            await client.delete(self.address.key(engine_id))

    async def reset(self) -> None:
        """After a failure: drop the connection (and the lease: a new one is granted on register)."""
        client, self._client, self._lease = self._client, None, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - it is broken already
                pass

    async def close(self) -> None:
        await self.reset()


class EtcdView(View):
    """The frontend's side: every record under the prefix, followed by a watch; reconnects forever.

    While etcd is away the last records stay (the frontend's health checks still tell dead engines
    apart); once it is back the view is re-read, so engines whose leases expired meanwhile go."""

    def __init__(self, address: EtcdAddress, retry_s: float = 1.0):
        require_aetcd()
        super().__init__()
        self.address = address
        self.retry_s = retry_s
        self.connected = False
        self.synced = asyncio.Event()  # set after the first full read
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="etcd-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def _follow(self) -> None:
        failures = 0
        while True:
            client = self.address.client()
            try:
                await client.connect()
                got = await client.get_prefix(self.address.engines)
                present = {}
                for kv in got:
                    try:
                        record = decode(kv.value)
                    except Exception as e:  # noqa: BLE001 - one bad value must not hide the rest
                        log(logger, "etcd_bad_record", logging.WARNING, key=kv.key.decode(), error=str(e))
                        continue
                    present[record.id] = record
                for engine_id in [i for i in self.records if i not in present]:
                    self._delete(engine_id, "gone_from_etcd")
                for record in present.values():
                    self._put(record)
                watch = await client.watch_prefix(self.address.engines, start_revision=got.header.revision + 1)
                self.connected, failures = True, 0
                self.synced.set()
                log(logger, "etcd_watching", host=self.address.host, port=self.address.port,
                    prefix=self.address.prefix, engines=len(present), revision=got.header.revision)
                async for event in watch:
                    engine_id = event.kv.key[len(self.address.engines):].decode()
                    if event.kind == "PUT":  # a plain str (or the str enum EventKind)
                        try:
                            self._put(decode(event.kv.value))
                        except Exception as e:  # noqa: BLE001
                            log(logger, "etcd_bad_record", logging.WARNING, key=engine_id, error=str(e))
                    else:  # DELETE: deregistered, or its lease expired
                        self._delete(engine_id, "etcd_delete")
                raise ConnectionError("the etcd watch ended")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd away: keep the last view, retry
                if self.connected or failures == 0:
                    log(logger, "etcd_unavailable", logging.WARNING, error=f"{type(e).__name__}: {e}",
                        keeping=len(self.records))
                self.connected = False
                failures += 1
                await asyncio.sleep(min(self.retry_s * failures, 5.0))  # back-off between reconnects
            finally:
                try:
                    await client.close()
                except Exception:  # noqa: BLE001
                    pass

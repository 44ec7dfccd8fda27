"""Discovery over etcd (through `aetcd`): for many nodes and frontends.

Each engine puts its record at `<prefix>/engines/<id>` with a lease of its own (TTL, refreshed by
keep-alives), so the key vanishes when the engine dies without saying goodbye. Frontends read the
prefix once and then watch it from the next revision on, so no change falls between the two.

    etcd://HOST:PORT                      keys under /understudy
    etcd://HOST:PORT/myprefix             keys under /myprefix
    etcd://HOST1:P1,HOST2:P2,HOST3:P3     the members of one cluster: any of them will do

Faults: a member that goes away (or loses its leader) costs a reconnection to another one; the
engine keeps its lease through it (a lease outlives a leader change: etcd's new leader renews every
lease) and only takes a new one when etcd says the old one is gone (it expired, or etcd was
replaced by a new cluster). A frontend keeps its view while etcd is away and re-reads it once back.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from understudy.logs import log
from understudy.discovery.records import EngineRecord, View, decode, encode

logger = logging.getLogger("understudy.discovery.etcd")

DEFAULT_PREFIX = "/understudy"
RPC_TIMEOUT = 5  # seconds for one etcd call (an engine's calls: less, see EtcdTarget)
KEEPALIVE_S = 10  # gRPC pings on an idle-looking connection (etcd refuses pings more often than every 5 s)


@dataclass(frozen=True)
class EtcdAddress:
    host: str  # the first endpoint
    port: int
    prefix: str = DEFAULT_PREFIX
    endpoints: tuple[tuple[str, int], ...] = ()  # every member given (host and port above are the first)

    @classmethod
    def parse(cls, url: str) -> "EtcdAddress":
        """etcd://HOST[:PORT][,HOST[:PORT]...][/prefix]: one member, or several of one cluster."""
        parts = urlsplit(url)
        if parts.scheme != "etcd" or not parts.netloc:
            raise ValueError(f"not an etcd address: {url!r} (expected etcd://HOST:PORT[,HOST:PORT...][/prefix])")
        endpoints = []
        for member in parts.netloc.split(","):
            one = urlsplit(f"//{member}")
            try:
                port = one.port or 2379
            except ValueError:
                port = None
            if not one.hostname or port is None:
                raise ValueError(f"not an etcd address: {url!r} (bad member {member!r}; expected "
                                 f"etcd://HOST:PORT[,HOST:PORT...][/prefix])")
            endpoints.append((one.hostname, port))
        prefix = parts.path.rstrip("/") or DEFAULT_PREFIX
        return cls(endpoints[0][0], endpoints[0][1], prefix, tuple(endpoints))

    @property
    def members(self) -> tuple[tuple[str, int], ...]:
        return self.endpoints or ((self.host, self.port),)

    @property
    def where(self) -> str:
        """HOST:PORT[,HOST:PORT...] for logs."""
        return ",".join(f"{h}:{p}" for h, p in self.members)

    @property
    def engines(self) -> bytes:
        return f"{self.prefix}/engines/".encode()

    def key(self, engine_id: str) -> bytes:
        return self.engines + engine_id.encode()

    async def client(self, timeout: float = RPC_TIMEOUT):
        """A client over every member: gRPC connects to the first that answers and moves on to another
        when that one goes away (each reconnection resolves host names again)."""
        import aetcd  # only where etcd is used: it brings grpc along

        options = {  # a member that vanishes without closing its connections (a partition) is noticed
            "grpc.keepalive_time_ms": KEEPALIVE_S * 1000, "grpc.keepalive_timeout_ms": int(timeout * 1000),
            "grpc.max_reconnect_backoff_ms": 2000}
        if len(self.members) == 1:
            return aetcd.Client(self.host, self.port, timeout=timeout, options=options)
        target = await _static_target(self.members)
        host, _, port = target.rpartition(":")  # aetcd dials f"{host}:{port}": the whole target again
        return aetcd.Client(host, port, timeout=timeout, options=options)


async def _static_target(members: tuple[tuple[str, int], ...]) -> str:
    """A gRPC target over several members: ipv4:A:P,B:P (or ipv6:[A]:P,...), names resolved now."""
    loop = asyncio.get_running_loop()
    v4, v6 = [], []
    for host, port in members:
        try:
            addrs = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                continue  # an unknown name: the other members may do
            addrs = [ipaddress.ip_address(info[4][0]) for info in infos]
        for a in dict.fromkeys(addrs):
            (v4 if a.version == 4 else v6).append(f"{a}:{port}" if a.version == 4 else f"[{a}]:{port}")
    if not v4 and not v6:
        raise ConnectionError(f"no etcd member's name resolves: {members}")
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def require_aetcd() -> None:
    """Fail at start-up, not at the first registration, when the etcd client is missing."""
    try:
        import aetcd  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"etcd discovery needs the aetcd package ({e}): pip install 'understudy[etcd]'") from None


class EtcdTarget:
    """The engine's side: its record under a lease (see registration.Registration).

    A failed call drops the connection (reset), never the lease: the next register() renews the lease
    it holds and puts the record again; a new lease is granted only when etcd no longer knows the old
    one. Calls are bounded by a third of the TTL (at most RPC_TIMEOUT): one that hangs (a member cut
    off, an election) is retried on another member while the lease still runs."""

    def __init__(self, address: EtcdAddress):
        require_aetcd()
        self.address = address
        self._client = None
        self._lease = None
        self._timeout = float(RPC_TIMEOUT)

    async def _connected(self):
        if self._client is None:
            self._client = await self.address.client(self._timeout)
            await self._client.connect()
        return self._client

    async def _renewed(self, client) -> bool:
        """Keep the lease alive; False when etcd does not know it (expired, or a new etcd)."""
        reply = await client.refresh_lease(self._lease.id)
        if reply is None or reply.TTL <= 0:
            log(logger, "etcd_lease_gone", logging.WARNING, lease=self._lease.id)
            self._lease = None
            return False
        return True

    async def register(self, record: EngineRecord, ttl: float) -> None:
        self._timeout = min(float(RPC_TIMEOUT), max(0.5, ttl / 3))
        client = await self._connected()
        if self._lease is None or not await self._renewed(client):
            self._lease = await client.lease(max(1, math.ceil(ttl)))  # etcd counts whole seconds
        try:
            await client.put(self.address.key(record.id), encode(record), lease=self._lease)
        except Exception as e:  # noqa: BLE001 - the lease expired since we renewed it: take a new one
            if "lease not found" not in str(e):
                raise
            self._lease = await client.lease(max(1, math.ceil(ttl)))
            await client.put(self.address.key(record.id), encode(record), lease=self._lease)

    async def keepalive(self, engine_id: str) -> bool:
        if self._lease is None:
            return False
        return await self._renewed(await self._connected())

    async def deregister(self, engine_id: str) -> None:
        client = await self._connected()
        if self._lease is not None:
            await client.revoke_lease(self._lease.id)  # deletes the key with it
            self._lease = None
        else:
            await client.delete(self.address.key(engine_id))

    async def reset(self) -> None:
        """After a failure: drop the connection (the next call connects again, to any member); the lease
        stays ours, to be renewed by the next register()."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - it is broken already
                pass

    async def close(self) -> None:
        await self.reset()
        self._lease = None


class EtcdView(View):
    """The frontend's side: every record under the prefix, followed by a watch; reconnects forever.

    While etcd is away the last records stay (the frontend's health checks still tell dead engines
    apart); once it is back the view is re-read. A record missing from that re-read is kept for its
    engine's TTL more (`missing_grace`) before it goes: either the engine died meanwhile (its health
    polls failed long ago, so nothing is routed to it) or etcd lost it (a new, empty cluster) and the
    engine, which retries every TTL/3, is about to register again; dropping it at once would leave a
    frontend with no engine for that while. A watch's DELETE (the lease expired, or a deregistration)
    drops a record at once."""

    def __init__(self, address: EtcdAddress, retry_s: float = 1.0, missing_grace: float = 10.0):
        require_aetcd()
        super().__init__()
        self.address = address
        self.retry_s = retry_s
        self.missing_grace = missing_grace  # for records that do not say their TTL
        self.connected = False
        self.synced = asyncio.Event()  # set after the first full read
        self._task: asyncio.Task | None = None
        self._missing: dict[str, asyncio.TimerHandle] = {}  # id -> its removal, pending

    def _missed(self, engine_id: str) -> None:
        """Missing from a re-read: gone after the grace unless it comes back."""
        if engine_id in self._missing:
            return
        ttl = self.records[engine_id].ttl
        grace = ttl if 0 < ttl <= 3600 else self.missing_grace  # (a record says anything: keep it sane)
        log(logger, "etcd_record_missing", logging.WARNING, id=engine_id, grace_s=grace)
        self._missing[engine_id] = asyncio.get_running_loop().call_later(
            grace, self._delete_missing, engine_id)

    def _delete_missing(self, engine_id: str) -> None:
        self._missing.pop(engine_id, None)
        self._delete(engine_id, "gone_from_etcd")

    def _found(self, engine_id: str) -> None:
        timer = self._missing.pop(engine_id, None)
        if timer is not None:
            timer.cancel()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="etcd-view")

    async def stop(self) -> None:
        for timer in self._missing.values():
            timer.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def _follow(self) -> None:
        failures = 0
        while True:
            client = None
            try:
                client = await self.address.client()
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
                    self._missed(engine_id)
                for record in present.values():
                    self._found(record.id)
                    self._put(record)
                watch = await client.watch_prefix(self.address.engines, start_revision=got.header.revision + 1)
                self.connected, failures = True, 0
                self.synced.set()
                log(logger, "etcd_watching", members=self.address.where, prefix=self.address.prefix,
                    engines=len(present), revision=got.header.revision)
                async for event in watch:
                    engine_id = event.kv.key[len(self.address.engines):].decode()
                    if event.kind == "PUT":  # a plain str (or the str enum EventKind)
                        try:
                            record = decode(event.kv.value)
                        except Exception as e:  # noqa: BLE001
                            log(logger, "etcd_bad_record", logging.WARNING, key=engine_id, error=str(e))
                            continue
                        self._found(record.id)
                        self._put(record)
                    else:  # DELETE: deregistered, or its lease expired
                        self._found(engine_id)
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
                    if client is not None:
                        await client.close()
                except Exception:  # noqa: BLE001
                    pass

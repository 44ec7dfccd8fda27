"""Discovery in-process: the embedded registry's leases and HTTP routes, and an engine's Registration
against a real embedded registry served by uvicorn (register, state updates, re-registration after the
registry forgot it, deregistration). etcd is covered end to end in test_frontend.py, and with its
faults in test_etcd_faults.py.

Lease expiry is awaited as the registry's delete event, never by sleeping."""

from __future__ import annotations

import asyncio
import socket

import httpx
import msgspec
import pytest

from understudy.discovery.embedded import EmbeddedRegistry
from understudy.discovery.etcd import EtcdAddress
from understudy.discovery.records import EngineRecord, decode, encode
from understudy.discovery.registration import Registration, advertised_url, target_for


def record(engine_id: str = "e1", **kw) -> EngineRecord:
    return EngineRecord(id=engine_id, url="http://127.0.0.1:9", model="m", node="host:/tmp/lock", **kw)


class Changes:
    """The registry's put/delete events as an asyncio queue."""

    def __init__(self, registry: EmbeddedRegistry):
        self.q: asyncio.Queue = asyncio.Queue()
        registry.listen(lambda kind, engine_id, rec: self.q.put_nowait((kind, engine_id)))

    async def next(self, timeout: float = 10.0) -> tuple[str, str]:
        return await asyncio.wait_for(self.q.get(), timeout)


def test_records_round_trip_and_addresses():
    r = record(state="ACTIVE", routable=True, max_model_len=512, pid=7)
    assert decode(encode(r)) == r
    a = EtcdAddress.parse("etcd://10.0.0.1:2379/prod")
    assert (a.host, a.port, a.prefix, a.key("x")) == ("10.0.0.1", 2379, "/prod", b"/prod/engines/x")
    assert EtcdAddress.parse("etcd://h").prefix == "/understudy" and EtcdAddress.parse("etcd://h").port == 2379
    m = EtcdAddress.parse("etcd://10.0.0.1:2379,etcd-b,[::1]:2380/p")  # the members of one cluster
    assert m.members == (("10.0.0.1", 2379), ("etcd-b", 2379), ("::1", 2380)) and (m.host, m.port) == ("10.0.0.1", 2379)
    assert m.prefix == "/p" and m.where == "10.0.0.1:2379,etcd-b:2379,::1:2380"
    for bad in ("http://h:1", "etcd://", "etcd://a:1,,b:2", "etcd://a:x"):
        with pytest.raises(ValueError):
            EtcdAddress.parse(bad)
    with pytest.raises(ValueError):
        target_for("ftp://x")
    assert advertised_url("127.0.0.1", 8000, None) == "http://127.0.0.1:8000"
    assert advertised_url("0.0.0.0", 8000, None) == f"http://{socket.gethostname()}:8000"
    assert advertised_url("0.0.0.0", 8000, "http://engine-3:80/") == "http://engine-3:80"


def test_a_lease_expires_without_keepalives_and_lives_on_with_them():
    async def main():
        reg = EmbeddedRegistry(max_ttl=30)
        changes = Changes(reg)
        assert reg.register(record("a"), ttl=1.0) == 1.0
        assert reg.register(record("b"), ttl=0.01) == 0.5  # clamped up to the minimum
        assert reg.register(record("c"), ttl=999) == 30  # and down to the maximum
        assert [await changes.next() for _ in range(3)] == [("put", "a"), ("put", "b"), ("put", "c")]
        assert await changes.next() == ("delete", "b")  # no keep-alive: gone after its TTL
        # a keep-alive renews a's lease to a full TTL from now...
        assert reg.keepalive("a")
        [lease] = [l for l in reg.leases() if l["record"]["id"] == "a"]
        assert 0.9 < lease["expires_in"] <= 1.0 and set(reg.records) == {"a", "c"}
        # ...and without more, it expires in turn; c (30 s) stays.
        assert await changes.next() == ("delete", "a")
        assert not reg.keepalive("a") and not reg.deregister("a")
        assert reg.deregister("c") and await changes.next() == ("delete", "c") and reg.records == {}
        await reg.stop()

    asyncio.run(main())


def test_registry_http_routes():
    async def main():
        from fastapi import FastAPI

        reg = EmbeddedRegistry()
        app = FastAPI()
        app.include_router(reg.routes())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fe") as http:
            body = {"record": msgspec.to_builtins(record("e1", state="ACTIVE", routable=True)), "ttl": 5}
            assert (await http.post("/registry/engines", json=body)).json() == {"id": "e1", "ttl": 5.0}
            listing = (await http.get("/registry/engines")).json()["engines"]
            assert [e["record"]["id"] for e in listing] == ["e1"] and 0 < listing[0]["expires_in"] <= 5
            assert (await http.put("/registry/engines/e1/keepalive")).status_code == 200
            assert (await http.put("/registry/engines/nope/keepalive")).status_code == 404
            for bad in ({"ttl": 5}, {"record": {"id": "x"}}, {"record": {**body["record"], "url": "file:///x"}}):
                r = await http.post("/registry/engines", json=bad)
                assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
            r = await http.post("/registry/engines", content=b"{not json")
            assert r.status_code == 400
            assert (await http.delete("/registry/engines/e1")).json() == {"id": "e1", "deregistered": True}
            assert (await http.delete("/registry/engines/e1")).status_code == 404
        await reg.stop()

    asyncio.run(main())


def test_registration_registers_updates_recovers_and_deregisters():
    """An engine's Registration against a frontend-like server holding an embedded registry."""
    async def main():
        import uvicorn
        from fastapi import FastAPI

        reg = EmbeddedRegistry()
        changes = Changes(reg)
        app = FastAPI()
        app.include_router(reg.routes())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        serving = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)  # uvicorn has no startup event to await from outside
        state = {"state": "STANDBY"}
        registration = Registration(f"http://127.0.0.1:{port}",
                                    lambda: record("e1", state=state["state"], routable=state["state"] == "ACTIVE"),
                                    ttl=0.6)
        await registration.start()
        try:
            assert await changes.next() == ("put", "e1") and reg.records["e1"].state == "STANDBY"
            state["state"] = "ACTIVE"
            registration.changed()  # a promotion is published at once, not at the next keep-alive
            assert await changes.next() == ("put", "e1")
            assert (reg.records["e1"].state, reg.records["e1"].routable) == ("ACTIVE", True)
            # Keep-alives hold the lease well past its TTL: the next event is our own deregistration.
            reg.deregister("e1", reason="test")  # the registry forgets it (a frontend restart)
            assert await changes.next() == ("delete", "e1")
            assert await changes.next() == ("put", "e1")  # its next keep-alive got 404: registered again
            await registration.stop()
            assert await changes.next() == ("delete", "e1") and reg.records == {}
        finally:
            server.should_exit = True
            await serving

    asyncio.run(main())

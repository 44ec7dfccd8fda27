"""Infrastructure faults with real processes: etcd losing members, its leader, all of itself; an
engine cut off from etcd by a real network partition; a frontend SIGKILLed. Clients are the official
openai client streaming greedy completions all along; none may fail and every answer must equal the
undisturbed one.

Processes (module scope, handed on from test to test in file order):
  * etcd: a 3-member cluster on 127.0.0.1 (tests/helpers/etcd_cluster.py), each member also listening
    on the host's address in the network namespace below;
  * engine A (host network) registered at etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3 (TTL 2 s);
  * engine B inside a network namespace (tests/helpers/netns.py: a veth pair), listening on the
    namespace's address, registered at etcd://SERVICE:P1,SERVICE:P2,SERVICE:P3 where SERVICE is a host
    address the test can cut off from the namespace; without root, B runs on the host and test 3 skips;
  * frontends F and G, both `--discovery etcd://` (all three members).

    1. under load, a follower is SIGKILLed (then restarted), then the leader: no failed request; the
       records stay under their original leases (no new lease, none expired), kept alive through the
       new leader; the frontends never drop an engine.
    2. all of etcd SIGKILLed under load: the engines keep serving through what the frontends know;
       the same members restarted: the engines' keep-alives work again on their old leases; etcd
       replaced by a new, empty cluster on the same ports: the engines register again (new leases)
       and the frontends never drop them meanwhile; no failed request throughout.
    3. engine B cut off from etcd (a blackhole route in its namespace; the frontends still reach it):
       its lease expires, etcd deletes its key, both frontends drop it and A takes all the work; the
       partition heals: B registers again (a new lease) and gets work again; no failed request.
    4. clients with a list of frontends [F, G] (or [G, F]) retry a request on the next one when one
       fails; F is SIGKILLed mid-load: no request fails, some were retried on G, G still sees both.

Everything is awaited as an event (a log line, etcd's health, a key appearing or leaving, a request
completing), never by sleeping.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import netns
from tests.helpers.etcd_cluster import EtcdCluster
from tests.helpers.frontend import (BACKEND, ENGINE_ARGS, ENGINE_ENV, REGISTRATION_TTL, Engine, Frontend, ServerProcess,
                                    is_event, metric, wait_until)
from tests.helpers.procs import LineProcess, free_port

PROMPTS = ["The capital of France is", "Count: 1, 2, 3,", "Once upon a time"]
MAX_TOKENS = 4
CLIENTS = 3
AFTER = CLIENTS + 1  # requests to complete after a fault: one at least was sent after it


# -- processes -------------------------------------------------------------------------------------

class NsEngine(Engine):
    """`understudy serve` inside a network namespace, reached at the namespace's address."""

    def __init__(self, ns: netns.NetNamespace, socket_dir: Path, register: str):
        self.port = free_port()
        self.url = f"http://{ns.inside}:{self.port}"
        self.proc = LineProcess(ns.argv([
            sys.executable, "-m", "understudy", "serve", "--backend", BACKEND, "--memory-service", "connect",
            "--socket-dir", str(socket_dir), "--host", ns.inside, "--port", str(self.port), "--log-format", "json",
            "--no-progress", *ENGINE_ARGS, "--register", register, "--registration-ttl", REGISTRATION_TTL]),
            env=ENGINE_ENV, stream="stderr")
        self.http = httpx.Client(base_url=self.url, timeout=60)


class World:
    def __init__(self):
        self.ns: netns.NetNamespace | None = None
        self.no_ns = ""  # why there is none
        self.cluster: EtcdCluster | None = None
        self.dirs = [Path(tempfile.mkdtemp(prefix="us-ef-", dir="/tmp")) for _ in range(2)]  # short: socket paths
        self.mems: list[ServerProcess] = []
        self.engines: list[Engine] = []
        self.frontends: list[Frontend] = []

    def close(self) -> None:
        for p in self.engines + self.frontends:
            p.close()
        for m in self.mems:
            if m.proc.poll() is None:
                m.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.ns is not None:
            self.ns.close()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def world():
    w = World()
    try:
        try:
            w.ns = netns.NetNamespace()
        except RuntimeError as e:  # not root, no `ip`, no permission: B on the host, test 3 skips
            w.no_ns = str(e)
        w.cluster = EtcdCluster(3, extra_hosts=(w.ns.service,) if w.ns else ())
        w.mems = [ServerProcess.start(BACKEND, d) for d in w.dirs]
        w.a = Engine(w.dirs[0], register=(w.cluster.url,))
        w.b = (NsEngine(w.ns, w.dirs[1], w.cluster.url_on(w.ns.service)) if w.ns
               else Engine(w.dirs[1], register=(w.cluster.url,)))
        w.engines = [w.a, w.b]
        w.f = Frontend("--discovery", w.cluster.url)
        w.g = Frontend("--discovery", w.cluster.url)
        w.frontends = [w.f, w.g]
        for e in w.engines:
            e.wait_serving()
            e.wait_for(is_event("registered"))
        w.ids = {w.a.id, w.b.id}
        for f in w.frontends:
            wait_until(lambda: all(f.engines().get(i, {}).get("routable") for i in w.ids),
                       "both engines routable in the frontend's view", timeout=60)
        w.model = w.a.model
        w.reference = {p: answer([w.f.client], w.model, p)[0] for p in PROMPTS}
        yield w
    finally:
        w.close()


# -- clients ---------------------------------------------------------------------------------------

def answer(clients: list[openai.OpenAI], model: str, prompt: str) -> tuple[str, int]:
    """A streamed greedy completion through the first frontend that gives a whole answer: a client-side
    list of frontends. A frontend that refuses the connection, answers an error or cuts the stream
    (it died) sends the request, from the start, to the next one (a greedy answer is the same anywhere).
    Returns (the text, how many frontends failed it first)."""
    errors = []
    for tried, client in enumerate(clients):
        try:
            text, finish = "", None
            for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason
            if finish != "length":
                raise ConnectionError(f"the stream ended without a finish_reason ({finish!r})")
            return text, tried
        except (openai.APIError, httpx.HTTPError, ConnectionError) as e:
            errors.append(f"{client.base_url}: {type(e).__name__}: {e}")
    raise ConnectionError("every frontend failed: " + "; ".join(errors))


class Load:
    """CLIENTS threads, each streaming greedy completions in a loop through its list of frontends;
    every answer is checked against the undisturbed one."""

    def __init__(self, world: World, routes: list[list[Frontend]]):
        self.world = world
        self.done = self.retried = 0
        self.failures: list[str] = []
        self.changed: list[tuple[str, str]] = []
        self.cv = threading.Condition()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k, route), daemon=True)
                        for k, route in enumerate(routes)]
        for t in self.threads:
            t.start()

    def _run(self, k: int, route: list[Frontend]) -> None:
        clients = [openai.OpenAI(base_url=f"{f.url}/v1", api_key="-", max_retries=0, timeout=60) for f in route]
        i = k
        while not self.stopping.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            i += 1
            try:
                text, tried = answer(clients, self.world.model, prompt)
            except Exception as e:  # noqa: BLE001 - reported to the test
                with self.cv:
                    self.failures.append(f"{prompt!r}: {type(e).__name__}: {e}")
                    self.cv.notify_all()
                continue
            with self.cv:
                self.done += 1
                self.retried += tried
                if text != self.world.reference[prompt]:
                    self.changed.append((prompt, text))
                self.cv.notify_all()
        for c in clients:
            c.close()

    def progress(self, n: int, what: str, timeout: float = 90.0) -> None:
        """Until n more requests have completed (no failure allowed meanwhile)."""
        with self.cv:
            target = self.done + n
            ok = self.cv.wait_for(lambda: self.done >= target or self.failures, timeout)
            assert not self.failures, f"failed requests ({what}): {self.failures}"
            assert ok, f"no progress ({what}): {self.done} done, waiting for {target}"

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"
        assert not self.failures, self.failures
        assert not self.changed, f"answers differ from the undisturbed ones: {self.changed}"


def count(proc, name: str) -> int:
    return len(proc.events(name))


def wait_more(proc, name: str, before: int, what: str, timeout: float = 60.0) -> None:
    """Until proc has logged `name` more often than `before` times."""
    wait_until(lambda: count(proc, name) > before, what, timeout)


def routable_everywhere(w: World, ids: set[str], frontends=None) -> None:
    for f in frontends or w.frontends:
        wait_until(lambda: all(f.engines().get(i, {}).get("routable") for i in ids),
                   f"engines {ids} routable in {f.url}'s view", timeout=60)


# -- 0. the frontend's view across a replaced etcd (in-process, no engines) ---------------------------

def test_view_keeps_records_missing_after_reconnecting_for_their_ttl():
    """etcd replaced by an empty one: the re-read finds no record. A record that its engine puts again
    within its TTL never leaves the view; one that does not come back goes after its TTL; a DELETE
    from the watch (a lease revoked) goes at once."""
    import asyncio

    import aetcd

    from understudy.discovery.etcd import EtcdAddress, EtcdView
    from understudy.discovery.records import EngineRecord, encode

    c = EtcdCluster(1)
    prefix = "/understudy/engines/"

    def rec(engine_id: str, ttl: float) -> EngineRecord:
        return EngineRecord(id=engine_id, url="http://127.0.0.1:9", model="m", node="n", ttl=ttl)

    async def put(*records: EngineRecord) -> aetcd.Client:
        client = aetcd.Client("127.0.0.1", c.members[0].client_port, timeout=5)
        lease = await client.lease(10)
        for r in records:
            await client.put(f"{prefix}{r.id}".encode(), encode(r), lease=lease)
        return client, lease

    async def until(cond, what: str, timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for: {what}"
            await asyncio.sleep(0.02)

    async def main():
        changes: asyncio.Queue = asyncio.Queue()
        view = EtcdView(EtcdAddress.parse(c.url), retry_s=0.1)
        view.listen(lambda kind, engine_id, r: changes.put_nowait((kind, engine_id)))
        client, _ = await put(rec("stays", 30.0), rec("goes", 1.0))
        await client.close()
        await view.start()
        try:
            await asyncio.wait_for(view.synced.wait(), 30)
            assert set(view.records) == {"stays", "goes"}
            while not changes.empty():
                changes.get_nowait()
            await asyncio.to_thread(c.kill_all)
            await until(lambda: not view.connected, "the view to lose etcd")
            await asyncio.to_thread(c.fresh)
            await asyncio.to_thread(c.wait_healthy)
            await until(lambda: view.connected, "the view to read the new etcd")
            assert set(view.records) == {"stays", "goes"}  # missing from the re-read, yet kept for now
            t0 = asyncio.get_running_loop().time()
            client, lease = await put(rec("stays", 30.0))  # its engine registers again
            assert await asyncio.wait_for(changes.get(), 10) == ("put", "stays")
            # "goes" never comes back: it leaves after its TTL (1 s), "stays" is still there.
            assert await asyncio.wait_for(changes.get(), 10) == ("delete", "goes")
            assert asyncio.get_running_loop().time() - t0 > 0.5 and set(view.records) == {"stays"}
            await client.revoke_lease(lease.id)  # the watch's DELETE: at once
            assert await asyncio.wait_for(changes.get(), 10) == ("delete", "stays") and view.records == {}
            await client.close()
        finally:
            await view.stop()

    try:
        asyncio.run(main())
    finally:
        c.stop()


# -- 1. a follower, then the leader ------------------------------------------------------------------

def test_follower_then_leader_killed_under_load(world):
    w, c = world, world.cluster
    leases = c.keys()
    assert set(leases) == w.ids and all(leases.values()), leases
    load = Load(w, [[w.f]] * CLIENTS)
    try:
        load.progress(1, "before the faults")
        leader = c.wait_healthy()
        follower = (leader + 1) % 3
        c.kill(follower)
        assert c.wait_healthy() == leader  # the two left keep their leader
        load.progress(AFTER, "a follower dead")
        c.restart(follower)
        c.wait_healthy()

        old = c.leader()
        renewed = {i: c.metric(i, "etcd_debugging_lease_renewed_total") for i in range(3)}
        c.kill(old)
        new = c.wait_healthy()
        assert new != old
        load.progress(AFTER, "the leader dead")
        # The keep-alives reach the new leader (every lease renewed twice there, an event etcd counts)...
        wait_until(lambda: c.metric(new, "etcd_debugging_lease_renewed_total") >= renewed[new] + 2 * len(leases),
                   "keep-alives renewing the leases on the new leader", timeout=30)
        # ...on the leases the engines had from the start: none expired, none taken anew.
        assert c.keys() == leases
        assert all(c.metric(i, "etcd_debugging_server_lease_expired_total") == 0 for i in range(3) if i != old)
        for e in w.engines:
            assert count(e, "etcd_lease_gone") == 0
        for f in w.frontends:
            assert count(f, "engine_deregistered") == 0 and set(f.engines()) == w.ids
        load.progress(AFTER, "after the new leader")
        c.restart(old)
        c.wait_healthy()
    finally:
        load.stop()


# -- 2. all of etcd ----------------------------------------------------------------------------------

def test_all_of_etcd_gone_then_back_and_then_replaced(world):
    w, c = world, world.cluster
    leases = c.keys()
    load = Load(w, [[w.f]] * CLIENTS)
    try:
        load.progress(1, "before")
        lost = {p: count(p, n) for p, n in [(w.f, "etcd_unavailable"), (w.g, "etcd_unavailable"),
                                            (w.a, "registration_failed"), (w.b, "registration_failed")]}
        registered = {e: count(e, "registered") for e in w.engines}
        watching = {f: count(f, "etcd_watching") for f in w.frontends}
        c.kill_all()
        for p, before in lost.items():  # everyone noticed...
            wait_more(p, "etcd_unavailable" if p in w.frontends else "registration_failed", before,
                      "etcd's loss to be noticed")
        load.progress(AFTER, "etcd gone")  # ...and the engines serve on through what F knew
        for f in w.frontends:
            assert set(f.engines()) == w.ids

        # The same members come back (from their data dirs): the old leases are there again.
        c.start_all()
        c.wait_healthy()
        for e in w.engines:
            wait_more(e, "registered", registered[e], "the engine to register again")
            registered[e] = count(e, "registered")
        for f in w.frontends:
            wait_more(f, "etcd_watching", watching[f], "the frontend to watch etcd again")
            watching[f] = count(f, "etcd_watching")
        assert c.keys() == leases  # kept: etcd renews every lease it restores
        load.progress(AFTER, "etcd back")

        # etcd replaced by a new, empty cluster on the same ports: the engines register anew.
        c.kill_all()
        load.progress(AFTER, "etcd gone again")
        c.fresh()
        c.wait_healthy()
        wait_until(lambda: set(c.keys()) == w.ids, "both engines registered in the new cluster", timeout=30)
        new = c.keys()
        assert not set(new.values()) & set(leases.values())  # new leases
        for e in w.engines:  # (the log line follows the put)
            wait_more(e, "registered", registered[e], "the engine to log its new registration")
            assert count(e, "etcd_lease_gone") >= 1
        for f in w.frontends:
            wait_more(f, "etcd_watching", watching[f], "the frontend to watch the new etcd")
        routable_everywhere(w, w.ids)
        load.progress(AFTER, "the new etcd")
        for f in w.frontends:  # the frontends never lost sight of the engines
            assert count(f, "engine_deregistered") == 0, f.events("engine_deregistered")
    finally:
        load.stop()


# -- 3. a partition between an engine and etcd --------------------------------------------------------

def test_engine_partitioned_from_etcd_is_dropped_and_comes_back(world):
    w, c = world, world.cluster
    if w.ns is None:
        pytest.skip(f"no network namespace here: {w.no_ns}")
    a, b = w.a, w.b
    lease_b = c.keys()[b.id]
    registered, failed = count(b, "registered"), count(b, "registration_failed")
    load = Load(w, [[w.f]] * CLIENTS)
    try:
        load.progress(1, "before")
        w.ns.cut(w.ns.service)  # B's packets to etcd vanish; the frontends still reach B
        wait_more(b, "registration_failed", failed, "B's keep-alives to fail")
        wait_until(lambda: b.id not in c.keys(), "etcd to expire B's lease", timeout=30)
        for f in w.frontends:
            f.wait_for(is_event("engine_deregistered", id=b.id, reason="etcd_delete"), timeout=30)
            assert b.id not in f.engines()
        assert b.health()["state"] == "ACTIVE"  # B itself is fine: it is only unregistered
        served_a = metric(a.metrics(), "understudy_engine_requests_total", endpoint="tokens", outcome="length")
        load.progress(AFTER, "B cut off")  # one of them at least started after B left: on A
        assert metric(a.metrics(), "understudy_engine_requests_total", endpoint="tokens",
                      outcome="length") >= served_a + 1

        served_b = metric(b.metrics(), "understudy_engine_requests_total", endpoint="tokens", outcome="length")
        w.ns.heal(w.ns.service)
        wait_more(b, "registered", registered, "B to register again", timeout=30)
        assert count(b, "etcd_lease_gone") >= 1 and c.keys()[b.id] != lease_b  # a new lease
        routable_everywhere(w, w.ids)
        wait_until(lambda: metric(b.metrics(), "understudy_engine_requests_total", endpoint="tokens",
                                  outcome="length") > served_b, "B to get work again", timeout=60)
        load.progress(AFTER, "partition healed")
    finally:
        if w.ns._cut:
            w.ns.heal(w.ns.service)
        load.stop()


# -- 4. two frontends, one SIGKILLed ------------------------------------------------------------------

def test_clients_retry_on_the_other_frontend_when_one_is_killed(world):
    w = world
    routes = [[w.f, w.g], [w.g, w.f], [w.f, w.g]]  # each client's list of frontends, in the order it tries them
    load = Load(w, routes)
    try:
        load.progress(1, "both frontends")
        w.f.kill(signal.SIGKILL)
        load.progress(AFTER, "F dead")
    finally:
        load.stop()
    assert load.retried >= 1  # requests F failed (cut mid-stream, or refused) went to G
    assert set(w.g.engines()) == w.ids
    w.g.assert_clean_log()

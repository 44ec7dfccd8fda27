"""The frontend end to end: real engine processes on the CPU, the official openai client, SIGKILL.

Processes (module scope, handed on from test to test in file order):
  * F: `understudy frontend` with the embedded registry (migration on, the default limit);
  * G: `understudy frontend --discovery etcd://... --migration-limit 0`;
  * etcd-server on 127.0.0.1;
  * node A: a memory server, engine A1 (primary) and engine A2 (shadow, parked on A's failover lock);
  * node B: a memory server and engine B1.
Every engine registers with both F and etcd (TTL 2 s).

    1. F's /health is 503 until an active engine registers (a standby does not count).
    2. completions and chat through F equal the engine's own answers (greedy), streaming and not.
    3. malformed and oversized bodies: OpenAI-style 400 / 404 / 413.
    4. A1 is SIGKILLed under four streams: the broken ones move to A2 (A's shadow, promoted) and every
       answer equals the undisturbed run (greedy and seeded): no token lost, none repeated.
    5. through G (migration off) an engine is SIGKILLed mid-stream: the client gets a clear error; the
       dead engine's key leaves etcd when its lease expires (the watch event) and both frontends drop it.
    6. a client that disconnects (streaming, or a non-streaming client timing out) cancels the engine's
       work at once: it goes idle and counts the request as cancelled.
    7. 503 + Retry-After only when every engine is busy; thresholds change at run time.
    8. canaries mark an engine that fails them unhealthy (a frontend of its own, with stub engines).
    9. SIGTERM on G: the stream in flight finishes, G exits 0.
   10. SIGTERM on the last engine: its stream finishes, it deregisters (F and etcd) and exits 0; F's
       /health turns 503.

Generated lengths are small: SmolLM2-135M makes ~10 tokens/s per CPU core here.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import signal
import tempfile
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers.frontend import (BACKEND, Engine, Etcd, EtcdWatch, Frontend, ServerProcess, StubEngine, event, is_event,
                                    metric, wait_until)
from tests.helpers.streams import Streams

PARIS = "The capital of France is"
STORY = "set in a quiet village by the sea, where an old fisherman mended his nets every morning."
TOPICS = ["a red kite", "the last train", "a lost key", "two rival bakers"]
MAX_TOKENS = 24
FEW = 3  # tokens every stream has before the kill


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def etcd():
    e = Etcd()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def etcd_watch(etcd):
    return EtcdWatch(etcd)


@pytest.fixture(scope="module")
def frontend():
    f = Frontend()
    yield f
    f.close()


@pytest.fixture(scope="module")
def frontend_etcd(etcd):
    f = Frontend("--discovery", etcd.url, "--migration-limit", "0")
    yield f
    f.close()


class Cluster:
    def __init__(self):
        self.dirs = [Path(tempfile.mkdtemp(prefix="us-fe-", dir="/tmp")) for _ in range(2)]  # short: socket paths
        self.mems: list[ServerProcess] = []
        self.engines: list[Engine] = []
        self.survivor: Engine | None = None  # the engine left after test 5

    def close(self) -> None:
        for e in self.engines:
            e.close()
        for m in self.mems:
            if m.proc.poll() is None:
                m.stop()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(frontend, frontend_etcd, etcd):
    c = Cluster()
    try:
        c.mems = [ServerProcess.start(BACKEND, d) for d in c.dirs]
        targets = (frontend.url, etcd.url)
        c.a1 = Engine(c.dirs[0], "--role", "primary", register=targets)
        c.b1 = Engine(c.dirs[1], register=targets)
        c.a1.wait_for(is_event("weights_ready"), timeout=240)  # it holds node A's failover lock by now
        c.a2 = Engine(c.dirs[0], "--role", "shadow", register=targets)
        c.engines = [c.a1, c.b1, c.a2]
        for e in c.engines:
            e.wait_serving()
        c.a2.wait_for(is_event("waiting_for_failover_lock"))
        for e in c.engines:
            e.wait_for(is_event("registered"))
        yield c
    finally:
        c.close()


def create(client: openai.OpenAI, model: str, prompt: str, max_tokens: int = MAX_TOKENS, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=kw.pop(
        "temperature", 0), extra_body={"ignore_eos": True}, **kw)


def wait_idle(engine: Engine, timeout: float = 15.0) -> dict[str, float]:
    """The engine's metrics once nothing runs or waits and no KV block is in use."""
    def idle():
        m = engine.metrics()
        busy = (m["understudy_engine_running_requests"], m["understudy_engine_waiting_requests"],
                m["understudy_engine_kv_cache_usage"])
        return m if busy == (0, 0, 0) else None
    return wait_until(idle, f"engine {engine.url} to go idle", timeout)


# -- 1. readiness ----------------------------------------------------------------------------------

def test_health_is_503_until_an_active_engine_registers(frontend, request):
    assert frontend.http.get("/live").json() == {"status": "alive"}
    status, body = frontend.health()
    assert status == 503 and body["status"] == "unavailable" and body["active_engines"] == 0, body
    # A registered standby is not enough.
    standby = StubEngine(body["model"], state="STANDBY", routable=False)
    try:
        standby.register(frontend, "standby-stub")
        wait_until(lambda: frontend.engines().get("standby-stub", {}).get("status") == "STANDBY",
                   "the frontend to poll the standby")
        status, body = frontend.health()
        assert status == 503 and body["active_engines"] == 0, body
        assert frontend.http.delete("/registry/engines/standby-stub").json()["deregistered"] is True
        assert frontend.http.delete("/registry/engines/standby-stub").status_code == 404
    finally:
        standby.close()
    cluster = request.getfixturevalue("cluster")
    body = frontend.wait_ready()
    assert body["status"] == "ok" and body["reason"] is None
    ids = {e.id: e for e in cluster.engines}
    wait_until(lambda: {i: e["status"] for i, e in frontend.engines().items()} == {
        cluster.a1.id: "ACTIVE", cluster.b1.id: "ACTIVE", cluster.a2.id: "STANDBY"}, "all three engines in F's view")
    view = frontend.engines()
    assert view[cluster.a1.id]["node"] == view[cluster.a2.id]["node"] != view[cluster.b1.id]["node"]
    assert not view[cluster.a2.id]["routable"] and view[cluster.a1.id]["routable"]
    assert set(ids) == set(view)
    frontend.assert_clean_log()


# -- 2. the OpenAI API through the frontend ---------------------------------------------------------

def test_completions_and_chat_through_the_frontend_equal_the_engine(frontend, cluster):
    a1 = cluster.a1
    kw = dict(model=a1.model, prompt=PARIS, max_tokens=8, temperature=0)
    direct = a1.client.completions.create(**kw)
    via = frontend.client.completions.create(**kw)
    assert via.model == a1.model and via.id.startswith("cmpl-")
    assert (via.choices[0].text, via.choices[0].finish_reason) == (direct.choices[0].text, "length")
    assert (via.usage.prompt_tokens, via.usage.completion_tokens) == (5, 8)
    chunks = list(frontend.client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "length"
    # Stop strings are cut by the frontend exactly as by the engine.
    stop = dict(kw, stop=["."])
    assert (frontend.client.completions.create(**stop).choices[0].text ==
            a1.client.completions.create(**stop).choices[0].text == " Paris")

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    direct = a1.client.chat.completions.create(model=a1.model, messages=msgs, max_tokens=8, temperature=0)
    via = frontend.client.chat.completions.create(model=a1.model, messages=msgs, max_tokens=8, temperature=0)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.choices[0].message.role == "assistant" and via.usage.prompt_tokens == direct.usage.prompt_tokens
    chunks = list(frontend.client.chat.completions.create(model=a1.model, messages=msgs, max_tokens=8,
                                                          temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == direct.choices[0].message.content
    assert [m.id for m in frontend.client.models.list().data] == [a1.model]
    m = frontend.metrics()
    assert m["understudy_frontend_time_to_first_token_seconds_count"] == 5  # the five requests above
    assert m["understudy_frontend_inter_token_latency_seconds_count"] > 0
    assert metric(m, "understudy_frontend_requests_total", endpoint="completions", outcome="length") == 2
    assert metric(m, "understudy_frontend_requests_total", endpoint="completions", outcome="stop") == 1
    assert metric(m, "understudy_frontend_requests_total", endpoint="chat",
                  outcome=direct.choices[0].finish_reason) == 2
    assert (metric(m, "understudy_frontend_engines", state="ACTIVE"),
            metric(m, "understudy_frontend_engines", state="STANDBY")) == (2, 1)
    assert m["understudy_frontend_inflight_requests"] == 0
    frontend.assert_clean_log()


# -- 3. bad requests ---------------------------------------------------------------------------------

def test_malformed_and_oversized_bodies_get_openai_errors(frontend, cluster):
    model = cluster.a1.model

    def post(**kw) -> httpx.Response:
        return frontend.http.post("/v1/completions", **kw)

    def err(r: httpx.Response, status: int, type_: str = "invalid_request_error") -> dict:
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert e["type"] == type_ and e["code"] == status and e["message"], e
        return e

    assert "JSON" in err(post(content=b'{"prompt": "Hi", ', headers={"content-type": "application/json"}),
                         400)["message"]
    assert err(post(json={"max_tokens": 3}), 400)["param"] == "prompt"
    assert err(post(json={"prompt": "Hi", "temperature": "hot"}), 400)["param"] == "temperature"
    assert err(post(json={"prompt": "Hi", "n": 1000}), 400)["param"] == "n"  # above 64 choices
    assert err(post(json={"prompt": "Hi", "suffix": "!"}), 400)["param"] == "suffix"  # refused, not ignored
    assert err(frontend.http.post("/v1/chat/completions", json={"messages": []}), 400)["param"] == "messages"
    assert err(post(json={"prompt": "Hi", "model": "gpt-4"}), 404, "not_found_error")["param"] == "model"
    # Too long for the engines' context: the engine's own 400, passed on.
    assert "512" in err(post(json={"prompt": "Hi", "max_tokens": 600}), 400)["message"]
    # Bodies over --max-request-bytes, with a Content-Length and chunked.
    big = {"prompt": "x" * 40000}
    assert "limit" in err(post(json=big), 413)["message"]
    import json as _json

    payload = _json.dumps(big).encode()
    assert "limit" in err(post(content=iter([payload[:20000], payload[20000:]]),
                               headers={"content-type": "application/json"}), 413)["message"]
    # The official client sees them as what they are.
    with pytest.raises(openai.BadRequestError):
        frontend.client.completions.create(model=model, prompt="Hi", max_tokens=600)
    with pytest.raises(openai.NotFoundError):
        frontend.client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    m = frontend.metrics()
    assert metric(m, "understudy_frontend_requests_total", endpoint="completions", outcome="invalid") >= 5
    frontend.assert_clean_log()


# -- 4. migration on: the active engine of node A dies under four streams ----------------------------

def test_kill_mid_stream_migrates_to_the_promoted_shadow_with_no_token_lost(frontend, cluster):
    a1, a2 = cluster.a1, cluster.a2
    model = a1.model
    prompts = [f"Write a short story about {t}, {STORY}" for t in TOPICS]
    seeded = dict(temperature=0.9, top_p=0.95, seed=1234)
    kws = [{} for _ in prompts[:-1]] + [seeded]  # three greedy, one seeded
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        reference = list(pool.map(lambda i: create(frontend.client, model, prompts[i], **kws[i]).choices[0].text,
                                  range(len(prompts))))
    before = frontend.metrics()

    streams = Streams([lambda i=i: create(frontend.client, model, prompts[i], stream=True, **kws[i])
                       for i in range(len(prompts))], few=FEW)
    got, finish = streams.got, streams.finish
    on_a1 = a1.health()["running"]
    assert on_a1 >= 1 and all(len(g) < MAX_TOKENS for g in got), (on_a1, [len(g) for g in got])
    a1.kill(signal.SIGKILL)
    streams.join()

    # Every answer is the undisturbed one: nothing lost, nothing repeated (the seeded one too).
    for i in range(len(prompts)):
        assert "".join(got[i]) == reference[i], (i, got[i], reference[i])
        assert finish[i] == "length"
    # The broken streams went to node A's shadow, which took over A1's KV cache and found the prefixes.
    a2.wait_for(is_event("state", new="ACTIVE"))
    moves = frontend.events("migrating")
    assert len(moves) == on_a1, moves
    assert all(m["source"] == a1.id and m["target"] == a2.id and m["same_node"] for m in moves), moves
    m = frontend.metrics()
    assert (metric(m, "understudy_frontend_migrations_total", reason="stream_broken")
            - metric(before, "understudy_frontend_migrations_total", reason="stream_broken")) == on_a1
    e2 = a2.metrics()
    assert metric(e2, "understudy_engine_requests_total", endpoint="tokens", outcome="length") == on_a1
    assert e2["understudy_engine_cached_prompt_tokens_total"] > 0
    # F routes new work to the promoted shadow; the dead engine leaves the registry with its lease.
    wait_until(lambda: frontend.engines().get(a2.id, {}).get("routable"), "A2 routable in F's view")
    frontend.wait_for(is_event("engine_deregistered", id=a1.id, reason="lease_expired"))
    assert a1.id not in frontend.engines()
    assert create(frontend.client, model, prompts[0]).choices[0].text == reference[0]
    frontend.assert_clean_log()
    a2.assert_clean_log()


# -- 5. migration off, and etcd leases ---------------------------------------------------------------

def test_migration_off_gives_a_clear_error_and_the_dead_engine_leaves_etcd(frontend, frontend_etcd, cluster,
                                                                          etcd_watch):
    g, a2, b1 = frontend_etcd, cluster.a2, cluster.b1
    wait_until(lambda: {i: e["status"] for i, e in g.engines().items()} == {a2.id: "ACTIVE", b1.id: "ACTIVE"},
               "G's view (from etcd): A2 and B1 active")
    watch = etcd_watch
    assert watch.keys() == sorted([a2.id, b1.id])
    stream = create(g.client, a2.model, "Count: 1, 2, 3,", max_tokens=120, stream=True)
    got = [next(stream) for _ in range(FEW)]
    assert all(c.choices[0].finish_reason is None for c in got)
    [victim] = [e for e in (a2, b1) if e.health()["running"] == 1]
    survivor = b1 if victim is a2 else a2
    victim.kill(signal.SIGKILL)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    message = str(caught.value)
    assert "could not move to another engine (disabled)" in message, message
    m = g.metrics()
    assert metric(m, "understudy_frontend_migration_failures_total", reason="disabled") == 1
    assert metric(m, "understudy_frontend_migrations_total", reason="stream_broken") == 0
    assert metric(m, "understudy_frontend_requests_total", endpoint="completions", outcome="failed") == 1
    # etcd deletes the key when the lease runs out (no keep-alive from a dead process)...
    watch.wait_for("DELETE", victim.id)
    assert watch.keys() == [survivor.id]
    # ...and both frontends drop it (G through its watch, F through its own lease).
    wait_until(lambda: victim.id not in g.engines(), "G to drop the dead engine")
    frontend.wait_for(is_event("engine_deregistered", id=victim.id, reason="lease_expired"))
    assert g.events("engine_deregistered")[-1]["reason"] == "etcd_delete"
    cluster.survivor = survivor
    g.assert_clean_log()


# -- 6. cancellation ----------------------------------------------------------------------------------

def test_client_disconnect_cancels_the_engines_work(frontend, cluster):
    e = cluster.survivor
    before, f_before = wait_idle(e), frontend.metrics()
    stream = create(frontend.client, e.model, "Count: 1, 2, 3,", max_tokens=400, stream=True)
    got = [next(stream) for _ in range(FEW)]
    assert all(c.choices[0].finish_reason is None for c in got)
    assert e.health()["running"] == 1
    stream.close()
    after = wait_idle(e)  # 400 tokens would take far longer than the deadline
    cancelled = lambda m: metric(m, "understudy_engine_requests_total", endpoint="tokens", outcome="cancelled")  # noqa: E731
    assert cancelled(after) == cancelled(before) + 1
    # A non-streaming client that gives up.
    with pytest.raises(openai.APITimeoutError):
        create(frontend.client.with_options(timeout=1.5), e.model, "Count: 1, 2, 3,", max_tokens=400)
    final = wait_idle(e)
    assert cancelled(final) == cancelled(before) + 2
    generated = final["understudy_engine_generation_tokens_total"] - before["understudy_engine_generation_tokens_total"]
    assert generated < 300, generated
    f_after = frontend.metrics()
    for endpoint in ("completions",):
        assert (metric(f_after, "understudy_frontend_cancellations_total", endpoint=endpoint)
                - metric(f_before, "understudy_frontend_cancellations_total", endpoint=endpoint)) == 2
    assert f_after["understudy_frontend_inflight_requests"] == 0
    frontend.assert_clean_log()


# -- 7. load shedding -----------------------------------------------------------------------------------

def test_503_only_when_every_engine_is_busy_and_thresholds_change_at_run_time(frontend, cluster):
    e = cluster.survivor
    stub = StubEngine(e.model, kv_cache_usage=0.99)  # busy at the default threshold (0.95)
    try:
        stub.register(frontend, "busy-stub")
        wait_until(lambda: frontend.engines().get("busy-stub", {}).get("busy") is True, "the stub to look busy")
        # One engine busy, one free: work goes to the free one.
        assert create(frontend.client, e.model, "Hi", max_tokens=2).choices[0].finish_reason == "length"
        assert stub.generate_calls == 0
        # A long stream holds KV blocks; with a low threshold (set at run time) that makes e busy too.
        wait_until(lambda: frontend.engines()[e.id]["kv_cache_usage"] == 0, "F to see the engine idle again")
        r = frontend.http.post("/admin/thresholds", json={"kv_usage": 0.01})  # one block of 91 is 0.011
        assert r.json() == {"kv_usage": 0.01, "waiting": 32}
        stream = create(frontend.client, e.model, f"Write a short story {STORY}", max_tokens=400, stream=True)
        next(stream)
        wait_until(lambda: frontend.engines()[e.id]["busy"], "the engine to look busy")
        assert frontend.health()[1]["busy_engines"] == 2
        r = frontend.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["type"] == "overloaded_error"
        with pytest.raises(openai.InternalServerError) as caught:
            create(frontend.client, e.model, "Hi", max_tokens=2)
        assert caught.value.status_code == 503
        # Raised at run time: the engine takes work again, while the stream still runs.
        assert frontend.http.post("/admin/thresholds", json={"kv_usage": 0.5}).status_code == 200
        assert not frontend.engines()[e.id]["busy"]
        assert create(frontend.client, e.model, "Hi", max_tokens=2).choices[0].finish_reason == "length"
        stream.close()
        assert stub.generate_calls == 0
        # Queue depth: the stub reports 10 waiting; busy at 5, not at 50.
        stub.health.update(kv_cache_usage=0.0, waiting=10)
        frontend.http.post("/admin/thresholds", json={"waiting": 5})
        wait_until(lambda: frontend.engines()["busy-stub"]["waiting"] == 10, "the stub's queue in F's view")
        assert frontend.engines()["busy-stub"]["busy"]
        assert frontend.http.post("/admin/thresholds", json={"waiting": 50}).json()["waiting"] == 50
        assert not frontend.engines()["busy-stub"]["busy"]
        frontend.http.delete("/registry/engines/busy-stub")
        for bad in ({"kv_usage": 2}, {"waiting": 0}, {"waiting": 1.5}, {"nope": 1}, [1]):
            r = frontend.http.post("/admin/thresholds", json=bad)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)
        assert frontend.http.post("/admin/thresholds", json={"kv_usage": 0.95, "waiting": 32}).status_code == 200
        m = frontend.metrics()
        assert metric(m, "understudy_frontend_rejections_total", reason="all_busy") == 2
        assert stub.generate_calls == 0
    finally:
        frontend.http.delete("/registry/engines/busy-stub")
        stub.close()
    frontend.assert_clean_log()


# -- 8. canaries ----------------------------------------------------------------------------------------

def test_canaries_mark_an_engine_that_fails_them_unhealthy():
    h = Frontend("--canary-interval", "0.2", "--canary-timeout", "5")
    model = h.health()[1]["model"]
    good, bad = StubEngine(model), StubEngine(model, generate_ok=False)
    try:
        good.register(h, "good")
        bad.register(h, "bad")
        wait_until(lambda: h.engines().get("bad", {}).get("status") == "UNHEALTHY", "a failed canary")
        assert not h.engines()["bad"]["routable"]
        wait_until(lambda: good.generate_calls >= 2, "canaries to the good engine")
        assert h.engines()["good"]["healthy"] and h.engines()["good"]["status"] == "ACTIVE"
        assert metric(h.metrics(), "understudy_frontend_canaries_total", result="failed") >= 1
        h.wait_for(is_event("canary_failed", id="bad"))
        # It recovers once a canary passes.
        bad.generate_ok = True
        wait_until(lambda: h.engines()["bad"]["healthy"], "the engine to pass a canary")
        assert h.engines()["bad"]["status"] == "ACTIVE"
    finally:
        h.close()
        good.close()
        bad.close()


# -- 9. SIGTERM on a frontend ------------------------------------------------------------------------------

def test_frontend_sigterm_finishes_in_flight_streams_then_exits_0(frontend, frontend_etcd, cluster):
    g, e = frontend_etcd, cluster.survivor
    reference = create(frontend.client, e.model, PARIS, max_tokens=16).choices[0].text
    stream = create(g.client, e.model, PARIS, max_tokens=16, stream=True)
    first = next(stream)
    g.proc.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:  # new connections are refused once the listener closes
        try:
            httpx.get(f"{g.url}/live", timeout=2)
        except httpx.TransportError:
            return True
        return False

    wait_until(refused, "G to stop accepting connections")
    chunks = [first, *stream]
    assert "".join(c.choices[0].text for c in chunks) == reference
    assert chunks[-1].choices[0].finish_reason == "length"
    assert g.proc.wait(timeout=60) == 0
    names = [event(l).get("event") for l in g.proc.lines]
    assert names.index("draining") < names.index("stopped"), names
    g.assert_clean_log()


# -- 10. SIGTERM on the last engine ------------------------------------------------------------------------

def test_engine_sigterm_drains_then_deregisters(frontend, cluster, etcd_watch):
    e, watch = cluster.survivor, etcd_watch
    reference = create(frontend.client, e.model, PARIS, max_tokens=16).choices[0].text
    before = frontend.metrics()
    stream = create(frontend.client, e.model, PARIS, max_tokens=16, stream=True)
    first = next(stream)
    e.proc.proc.send_signal(signal.SIGTERM)
    chunks = [first, *stream]
    assert "".join(c.choices[0].text for c in chunks) == reference  # finished by the draining engine
    assert e.proc.wait(timeout=60) == 0
    after = frontend.metrics()
    assert (sum(v for k, v in after.items() if k.startswith("understudy_frontend_migrations_total")) ==
            sum(v for k, v in before.items() if k.startswith("understudy_frontend_migrations_total")))
    # It said DRAINING at once (new work stops), then left the registries when its requests were done.
    lines = list(e.proc.lines)
    draining = next(i for i, l in enumerate(lines) if is_event("state", new="DRAINING")(l))
    assert draining < next(i for i, l in enumerate(lines) if is_event("deregistered")(l))
    assert len(e.events("deregistered")) == 2  # F and etcd
    frontend.wait_for(is_event("engine_deregistered", id=e.id, reason="deregistered"))
    watch.wait_for("DELETE", e.id)
    assert watch.keys() == []
    status, body = wait_until(lambda: (h := frontend.health())[0] == 503 and h, "F to report no active engine")
    assert body["reason"] == "no active engine" and body["engines"] == []
    r = frontend.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "unavailable_error"
    e.assert_clean_log()
    frontend.assert_clean_log()

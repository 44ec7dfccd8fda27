"""The frontend's decisions in-process: routing, busy thresholds, and migration over fake engines.

The engines here are httpx.MockTransport handlers: they stream NDJSON lines like `/engine/generate`
and break off (a read error), refuse (503 / 400) or cannot be reached (connect error) on cue. The
resent bodies are checked: prompt + tokens so far, max_tokens reduced, the seed's offset.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from understudy.discovery.records import EngineRecord, View
from understudy.common.params import SamplingParams
from understudy.frontend.metrics import FrontendMetrics
from understudy.frontend.migration import EngineRefused, Generation, Policy, StreamFailed
from understudy.frontend.pool import Pool
from understudy.frontend.router import AllBusy, NoEngine, Router, Thresholds

MODEL = "m"


def make_router(*engines: tuple[str, str, str], **health) -> Router:
    """engines: (id, node, state); each looks polled with the given health numbers (per id)."""
    view = View()
    pool = Pool(view)
    for engine_id, node, state in engines:
        view._put(EngineRecord(id=engine_id, url=f"http://{engine_id}", model=MODEL, node=node, state=state,
                               routable=state == "ACTIVE"))
    for e in pool:
        e.polled_ok({"state": e.state, "routable": e.state == "ACTIVE", "running": 0, "waiting": 0,
                     "kv_cache_usage": 0.0, **health.get(e.id, {})})
    return Router(pool, Thresholds(), MODEL)


class Broken(httpx.AsyncByteStream):
    """Lines, then a dropped connection."""

    def __init__(self, lines: list[dict]):
        self.lines = lines

    async def __aiter__(self):
        for line in self.lines:
            yield (json.dumps(line) + "\n").encode()
        raise httpx.ReadError("connection reset by peer")


def line(ids: list[int], finish: str | None = None, prompt: int = 3) -> dict:
    return {"token_ids": ids, "finish_reason": finish, "prompt_tokens": prompt, "cached_tokens": 0, "error": None}


def run(router: Router, handler, prompt: list[int], params: SamplingParams, policy: Policy | None = None):
    """(tokens, finish reason, generation, exception) of one request through Generation."""
    async def main():
        sent = []

        async def record(request: httpx.Request):
            sent.append((request.url.host, json.loads(request.content)))
            return await handler(request, sent)

        metrics = FrontendMetrics()
        async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as http:
            gen = Generation(http, router, metrics, policy or Policy(), prompt, params, "req-1")
            tokens, finish, error = [], None, None
            try:
                async for chunk in gen.stream():
                    tokens += chunk.token_ids
                    finish = chunk.finish_reason
            except Exception as e:  # noqa: BLE001
                error = e
        return tokens, finish, gen, error, sent, metrics
    return asyncio.run(main())


def counter(metrics: FrontendMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# -- routing -------------------------------------------------------------------------------------------

def test_pick_least_loaded_active_engine_and_shed_only_when_all_are_busy():
    r = make_router(("a", "n1", "ACTIVE"), ("b", "n2", "ACTIVE"), ("s", "n1", "STANDBY"),
                    a={"running": 3}, b={"running": 1})
    assert r.pick().id == "b"
    assert r.pick(exclude={"b"}).id == "a"
    r.pool.engines["b"].health["kv_cache_usage"] = 0.97  # busy at 0.95: the other one, though more loaded
    assert r.pick().id == "a"
    r.pool.engines["a"].health["waiting"] = 32
    with pytest.raises(AllBusy):
        r.pick()
    r.thresholds.update({"waiting": 33})  # at run time
    assert r.pick().id == "a"
    with pytest.raises(NoEngine):  # the standby never takes new work
        r.pick(exclude={"a", "b"})


def test_unreachable_unhealthy_and_other_models_get_no_work():
    r = make_router(("a", "n1", "ACTIVE"), ("b", "n2", "ACTIVE"), ("c", "n3", "ACTIVE"))
    r.pool.engines["a"].unreachable()
    r.pool.engines["b"].healthy = False
    r.pool.engines["c"].record.model = "other"
    with pytest.raises(NoEngine):
        r.pick()
    assert {e.status for e in r.pool} == {"UNREACHABLE", "UNHEALTHY", "ACTIVE"}


def test_migration_prefers_the_same_node_then_any_active_engine_busy_or_not():
    r = make_router(("a1", "A", "ACTIVE"), ("a2", "A", "STANDBY"), ("a3", "A", "WAKING"), ("b", "B", "ACTIVE"))
    assert r.pick_for_migration("A", {"a1"}).id == "a3"  # waking beats standby; both beat another node
    assert r.pick_for_migration("A", {"a1", "a3"}).id == "a2"
    r.pool.engines["b"].health["kv_cache_usage"] = 1.0
    assert r.pick_for_migration("A", {"a1", "a2", "a3"}).id == "b"  # busy, but the request was admitted
    with pytest.raises(NoEngine):
        r.pick_for_migration("A", {"a1", "a2", "a3", "b"})


def test_thresholds_are_validated():
    t = Thresholds()
    assert t.update({"kv_usage": 0.5}).as_dict() == {"kv_usage": 0.5, "waiting": 32}
    for bad in ({"kv_usage": 0}, {"kv_usage": 1.5}, {"kv_usage": True}, {"waiting": 0}, {"waiting": "3"},
                {"other": 1}):
        with pytest.raises(ValueError):
            t.update(bad)
    assert t.as_dict() == {"kv_usage": 0.5, "waiting": 32}  # unchanged by the failures


# -- migration -----------------------------------------------------------------------------------------

def test_a_broken_stream_resumes_on_the_same_nodes_shadow_with_prompt_plus_tokens_so_far():
    r = make_router(("a1", "A", "ACTIVE"), ("a2", "A", "STANDBY"), ("b", "B", "ACTIVE"),
                    b={"kv_cache_usage": 0.99})  # b busy: the request starts on a1

    async def engines(request, sent):
        if request.url.host == "a1":
            return httpx.Response(200, stream=Broken([line([10]), line([11, 12])]))
        body = sent[-1][1]
        n = body["sampling"]["max_tokens"]
        return httpx.Response(200, content="".join(json.dumps(line([20 + i], "length" if i == n - 1 else None)) + "\n"
                                                   for i in range(n)))

    params = SamplingParams(max_tokens=8, temperature=0.7, seed=5, stop_token_ids=(2,), ignore_eos=True)
    tokens, finish, gen, error, sent, metrics = run(r, engines, [1, 2, 3], params)
    assert error is None and finish == "length"
    assert tokens == [10, 11, 12, 20, 21, 22, 23, 24] and gen.generated == tokens
    assert [host for host, _ in sent] == ["a1", "a2"] and gen.engines == ["a1", "a2"]
    first, resent = sent[0][1], sent[1][1]
    assert first["token_ids"] == [1, 2, 3] and first["sampling"]["resumed_tokens"] == 0
    assert resent["token_ids"] == [1, 2, 3, 10, 11, 12]
    assert resent["sampling"] == {**first["sampling"], "max_tokens": 5, "resumed_tokens": 3}
    assert gen.migrations == 1
    assert counter(metrics, "understudy_frontend_migrations_total", reason="stream_broken") == 1
    assert counter(metrics, "understudy_frontend_migrated_tokens_total") == 6
    assert not r.pool.engines["a1"].reachable  # no new work there until a poll succeeds


def test_migration_limit_max_seq_len_and_off():
    def always_breaking():
        async def engines(request, sent):
            return httpx.Response(200, stream=Broken([line([7])]))
        return engines

    hosts = [("e1", "A", "ACTIVE"), ("e2", "B", "ACTIVE"), ("e3", "C", "ACTIVE"), ("e4", "D", "ACTIVE")]
    params = SamplingParams(max_tokens=10, temperature=0)
    tokens, _, gen, error, sent, metrics = run(make_router(*hosts), always_breaking(), [1], params, Policy(limit=2))
    assert isinstance(error, StreamFailed) and error.reason == "limit" and gen.migrations == 2
    assert tokens == [7, 7, 7] and len(sent) == 3  # every engine's token reached the client once
    assert counter(metrics, "understudy_frontend_migration_failures_total", reason="limit") == 1

    _, _, gen, error, _, _ = run(make_router(*hosts), always_breaking(), [1, 2, 3], params,
                                 Policy(limit=5, max_seq_len=5))
    assert isinstance(error, StreamFailed) and error.reason == "max_seq_len" and gen.migrations == 2  # 4, 5, then 6

    tokens, _, gen, error, sent, _ = run(make_router(*hosts), always_breaking(), [1], params, Policy(limit=0))
    assert isinstance(error, StreamFailed) and error.reason == "disabled" and "disabled" in str(error)
    assert tokens == [7] and len(sent) == 1


def test_before_the_first_token_unreachable_or_refusing_engines_are_replaced_not_migrated():
    r = make_router(("a", "A", "ACTIVE"), ("b", "B", "ACTIVE"), ("c", "C", "ACTIVE"),
                    b={"running": 1}, c={"running": 2})  # tried in the order a, b, c

    async def engines(request, sent):
        if request.url.host == "a":
            raise httpx.ConnectError("connection refused")
        if request.url.host == "b":
            return httpx.Response(503, json={"error": {"message": "engine overloaded"}})
        return httpx.Response(200, content=json.dumps(line([5], "stop")) + "\n")

    tokens, finish, gen, error, sent, metrics = run(r, engines, [1], SamplingParams(max_tokens=4),
                                                    Policy(limit=0))
    assert error is None and (tokens, finish) == ([5], "stop")
    assert [h for h, _ in sent] == ["a", "b", "c"] and gen.migrations == 0
    assert counter(metrics, "understudy_frontend_retries_total") == 2


def test_every_engine_refusing_is_all_busy_and_a_4xx_goes_to_the_client():
    r = make_router(("a", "A", "ACTIVE"), ("b", "B", "ACTIVE"))

    async def refusing(request, sent):
        return httpx.Response(503, json={"error": {"message": "queue full"}})

    *_, error, sent, _ = run(r, refusing, [1], SamplingParams())
    assert isinstance(error, AllBusy) and len(sent) == 2

    async def invalid(request, sent):
        return httpx.Response(400, json={"error": {"message": "too long", "type": "invalid_request_error"}})

    *_, error, sent, _ = run(make_router(("a", "A", "ACTIVE")), invalid, [1], SamplingParams())
    assert isinstance(error, EngineRefused) and error.status == 400 and error.body["error"]["message"] == "too long"


# -- stalls ---------------------------------------------------------------------------------------------

class Stalling(httpx.AsyncByteStream):
    """Lines, then nothing more (a hung engine: the connection stays open)."""

    def __init__(self, lines: list[dict]):
        self.lines = lines

    async def __aiter__(self):
        for line in self.lines:
            yield (json.dumps(line) + "\n").encode()
        await asyncio.sleep(3600)
        yield b""


def test_a_stalled_stream_moves_to_an_active_engine_and_its_engine_is_suspect_until_it_progresses():
    # a1 hangs after two tokens; its node's standby a2 cannot be promoted while a1 holds the lock: b takes it.
    r = make_router(("a1", "A", "ACTIVE"), ("a2", "A", "STANDBY"), ("b", "B", "ACTIVE"),
                    b={"running": 2})  # the request starts on a1

    async def engines(request, sent):
        if request.url.host == "a1":
            return httpx.Response(200, stream=Stalling([line([10]), line([11])]))
        n = sent[-1][1]["sampling"]["max_tokens"]
        return httpx.Response(200, content="".join(json.dumps(line([20 + i], "length" if i == n - 1 else None)) + "\n"
                                                   for i in range(n)))

    tokens, finish, gen, error, sent, metrics = run(r, engines, [1, 2, 3], SamplingParams(max_tokens=5),
                                                    Policy(stream_timeout=30, stall_timeout=0.2))
    assert error is None and (tokens, finish) == ([10, 11, 20, 21, 22], "length")
    assert [h for h, _ in sent] == ["a1", "b"] and sent[1][1]["token_ids"] == [1, 2, 3, 10, 11]
    assert counter(metrics, "understudy_frontend_migrations_total", reason="stalled") == 1
    assert counter(metrics, "understudy_frontend_stalled_streams_total") == 1
    a1 = r.pool.engines["a1"]
    assert a1.status == "SUSPECT" and not a1.routable and a1.reachable and "0.2 s" in a1.suspect
    assert r.pick().id == "b"
    # Answering /health is not progress: its counts must move between two polls (or it must be idle).
    busy = {"state": "ACTIVE", "routable": True, "running": 1, "waiting": 0, "kv_cache_usage": 0.5}
    a1.polled_ok(busy)
    a1.polled_ok(busy)
    assert a1.status == "SUSPECT"
    a1.polled_ok({**busy, "kv_cache_usage": 0.55})
    assert a1.status == "ACTIVE" and a1.routable
    a1.stalled("again")
    a1.polled_ok({**busy, "running": 0})
    assert a1.routable  # idle: nothing to make progress on


def test_no_first_token_within_the_stream_timeout_is_a_retry_elsewhere():
    r = make_router(("a", "A", "ACTIVE"), ("b", "B", "ACTIVE"), b={"running": 1})

    async def engines(request, sent):
        if request.url.host == "a":
            return httpx.Response(200, stream=Stalling([]))
        return httpx.Response(200, content=json.dumps(line([5], "stop")) + "\n")

    tokens, finish, gen, error, sent, metrics = run(r, engines, [1], SamplingParams(max_tokens=4),
                                                    Policy(stream_timeout=0.3, stall_timeout=0.05))
    assert error is None and (tokens, finish) == ([5], "stop") and [h for h, _ in sent] == ["a", "b"]
    assert counter(metrics, "understudy_frontend_retries_total") == 1 and gen.migrations == 0
    assert r.pool.engines["a"].status == "SUSPECT" and "0.3 s" in r.pool.engines["a"].suspect  # the first-token bound

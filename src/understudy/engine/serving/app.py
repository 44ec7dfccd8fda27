"""The worker's HTTP API: OpenAI completions and chat, a token-level stream, health, metrics, sleep / wake_up.

Text lives only here: prompts are tokenised, tokens are detokenised
incrementally and stop strings are matched on the text. A client that goes
away cancels its request in the engine at once (its KV blocks are freed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from understudy.common.api import BodyLimit as _BodyLimit
from understudy.common.api import (
    ChatCompletionRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    TokenGenerateRequest,
    chat_prompt,
    collect_text,
    error,
    sse_events,
)
from understudy.common.text import TextStream
from understudy.engine.core.scheduler import QueueFull
from understudy.engine.serving.control import release_memory, remap
from understudy.engine.serving.lifecycle import STATES
from understudy.engine.serving.worker import NotActive, Worker
from understudy.logs import log

logger = logging.getLogger("understudy.engine.serving.app")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


class _Metrics:
    def __init__(self, worker: Worker):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("understudy_engine_requests", "Finished requests", ["endpoint", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("understudy_engine_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter("understudy_engine_cached_prompt_tokens", "Prompt tokens found in the "
                                     "prefix cache", registry=r)
        self.generated = Counter("understudy_engine_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("understudy_engine_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("understudy_engine_inter_token_latency_seconds", "Time between tokens of a stream",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(worker))


class _EngineCollector(Collector):
    def __init__(self, worker: Worker):
        self.worker = worker

    def collect(self):
        eng = self.worker.engine.engine
        for name, doc, value in [
            ("understudy_engine_running_requests", "Requests being computed", len(eng.scheduler.running)),
            ("understudy_engine_waiting_requests", "Requests waiting to be scheduled", len(eng.scheduler.waiting)),
            ("understudy_engine_kv_cache_usage", "Fraction of KV blocks in use", eng.blocks.usage),
            ("understudy_engine_kv_cache_blocks", "KV blocks in the cache", eng.blocks.num_blocks),
            ("understudy_engine_preemptions", "Sequences preempted for lack of KV blocks",
             eng.scheduler.preemptions),
        ]:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        state = GaugeMetricFamily("understudy_engine_state", "1 for the engine's lifecycle state", labels=["state"])
        for s in STATES:
            state.add_metric([s], 1.0 if self.worker.state == s else 0.0)
        yield state
        life = self.worker.lifecycle
        transitions = CounterMetricFamily("understudy_engine_state_transitions", "Lifecycle transitions",
                                          labels=["from", "to"])
        for (old, new), n in sorted(life.transitions.items()):
            transitions.add_metric([old, new], n)
        yield transitions
        failovers = CounterMetricFamily("understudy_engine_failovers", "Promotions of this engine to active")
        failovers.add_metric([], life.failovers)
        yield failovers
        if life.last_switch_s is not None:
            switch = GaugeMetricFamily("understudy_engine_last_switch_seconds",
                                       "Failover lock acquired -> serving, on the last promotion")
            switch.add_metric([], life.last_switch_s)
            yield switch


def _refusal(e: Exception) -> JSONResponse:
    """A request refused before its first token: not active or overloaded (retry later), or invalid."""
    if isinstance(e, NotActive):
        return error(503, str(e), type_="unavailable_error", headers={"Retry-After": "1"})
    if isinstance(e, QueueFull):
        return error(503, f"engine overloaded: {e}", type_="overloaded_error", headers={"Retry-After": "1"})
    return error(400, str(e))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(worker: Worker) -> FastAPI:
    app = FastAPI(title="understudy engine", version="0.1.0")
    metrics = _Metrics(worker)
    app.state.worker = worker
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'body'}: {e.get('msg')}"
                            for e in exc.errors()[:5])
        return error(400, message or "invalid request", param=param)

    app.add_middleware(_BodyLimit, worker=worker)

    # -- health -------------------------------------------------------------------
    @app.get("/live")
    async def live():
        return {"status": "alive"}

    @app.get("/health")
    async def health():
        body = {"status": "ok" if worker.state in ("ACTIVE", "STANDBY", "WAKING", "SLEEPING", "QUIESCED")
                else "unavailable",
                "failovers": worker.lifecycle.failovers, "last_switch_s": worker.lifecycle.last_switch_s,
                "state": worker.state, "routable": worker.routable, "model": worker.model_name,
                "running": len(worker.engine.engine.scheduler.running),
                "waiting": len(worker.engine.engine.scheduler.waiting),
                "kv_cache_usage": round(worker.engine.engine.blocks.usage, 4),
                "kv_adopted": worker.engine.engine.kv.adopted, **worker.info}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": worker.model_name, "object": "model", "created": worker.created,
                                            "owned_by": "understudy", "max_model_len": worker.max_model_len}]}

    # -- generation ---------------------------------------------------------------
    def _check_model(name: str | None) -> JSONResponse | None:
        if name and name != worker.model_name:
            return error(404, f"model {name!r} does not exist; this engine serves {worker.model_name!r}",
                         param="model", type_="not_found_error")
        return None

    async def _tokens(prompt: list[int], params, endpoint: str, done: dict | None = None) -> AsyncIterator:
        """The engine's stream, with metrics; bad requests and overload surface before the first token.

        A caller that closes the stream because the request is complete (a stop string) says so in
        done["outcome"], so the request is not counted as cancelled."""
        t0 = last = time.perf_counter()
        first = True
        outcome = None
        try:
            async for out in worker.engine.generate(prompt, params):
                now = time.perf_counter()
                if out.new_token_ids:
                    (metrics.ttft.observe(now - t0) if first else metrics.itl.observe(now - last))
                    first, last = False, now
                    metrics.generated.inc(len(out.new_token_ids))
                if out.finish_reason:
                    metrics.prompt_tokens.inc(out.prompt_tokens)
                    metrics.cached_tokens.inc(out.cached_tokens)
                    outcome = out.finish_reason
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            outcome = outcome or "cancelled"
            raise
        except QueueFull:
            outcome = "rejected"
            raise
        finally:
            metrics.requests.labels(endpoint, (done or {}).get("outcome") or outcome or "error").inc()

    async def _text(prompt: list[int], params, endpoint: str) -> AsyncIterator[tuple[str, str | None, dict]]:
        """(text delta, finish reason, usage) triples with stop strings applied."""
        text_of = TextStream(worker.tokenizer, prompt, params.stop)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
        done: dict = {}
        tokens = _tokens(prompt, params, endpoint, done)
        try:
            async for out in tokens:
                if out.error:
                    raise RuntimeError(out.error)
                usage.update(completion_tokens=out.completion_tokens,
                             total_tokens=out.prompt_tokens + out.completion_tokens,
                             prompt_tokens_details={"cached_tokens": out.cached_tokens})
                emit, hit = text_of.push(out.new_token_ids, final=out.finish_reason is not None)
                if hit:
                    done["outcome"] = "stop"  # finished, not cancelled (metrics)
                    yield emit, "stop", usage
                    return  # closing the token stream aborts the request in the engine
                yield emit, out.finish_reason, usage
        finally:
            await tokens.aclose()

    async def _admit(params, prompt_len: int) -> None:
        """Hold a request until the engine is active (bounded), then check it can ever run."""
        if not await worker.lifecycle.wait_active(worker.standby_wait):
            raise NotActive(f"engine is {worker.state}, not active")
        params.validate()
        worker.engine.engine.scheduler.check_fits(prompt_len, params.max_tokens)

    async def _start(prompt: list[int], params, endpoint: str):
        """Validate against the engine before answering 200: returns (first item, rest) or an error."""
        await _admit(params, len(prompt))
        worker.engine.engine.scheduler.check_fits(len(prompt), params.max_tokens)
        stream = _text(prompt, params, endpoint)
        try:
            first = await stream.__anext__()
        except BaseException:
            await stream.aclose()
            raise
        return first, stream

    async def _generate(request: Request, prompt: list[int], params, endpoint: str, streaming: bool,
                        render_chunk, render_final, include_usage: bool):
        try:
            first, rest = await _start(prompt, params, endpoint)
        except (NotActive, QueueFull, ValueError) as e:
            return _refusal(e)
        if streaming:
            async def events():
                try:
                    async for event in sse_events(first, rest, render_chunk, include_usage):
                        yield event
                finally:
                    await rest.aclose()
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        work = asyncio.ensure_future(collect_text(first, rest))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # the client left: stop computing for it
                # BUGFIX (tests/engine/test_engine_http.py::test_nonstreaming_client_timeout_cancels_engine_work):
                # `rest` is still running inside `work` until the cancellation lands; closing it before that
                # raised "aclose(): asynchronous generator is already running" (a 500 and a traceback).
                await asyncio.wait({work})
            await rest.aclose()
        if work.cancelled():
            return Response(status_code=499)
        text, reason, usage = work.result()
        return JSONResponse(render_final(text, reason, usage))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if (bad := _check_model(body.model)) is not None:
            return bad
        prompt = body.prompt if isinstance(body.prompt, list) else worker.tokenizer.encode(body.prompt)
        shape = CompletionShape(worker.model_name)
        return await _generate(request, prompt, body.sampling(worker.default_max_tokens), "completions",
                               body.stream, shape.chunk, shape.final, body.include_usage)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        if (bad := _check_model(body.model)) is not None:
            return bad
        try:
            prompt = chat_prompt(worker.tokenizer, body)
        except ValueError as e:
            return error(400, str(e), param="messages")
        shape = ChatShape(worker.model_name)

        return await _generate(request, prompt, body.sampling(worker.default_max_tokens), "chat", body.stream,
                               shape.chunk, shape.final, body.include_usage)

    @app.post("/engine/generate")
    async def generate_tokens(body: TokenGenerateRequest):
        """Token ids in, newline-delimited JSON out: {"token_ids": [...], "finish_reason": ...} per step."""
        params = body.params()
        try:
            await _admit(params, len(body.token_ids))
            stream = _tokens(body.token_ids, params, "tokens")
            first = await stream.__anext__()
        except (NotActive, QueueFull, ValueError) as e:
            return _refusal(e)

        async def lines():
            try:
                out = first
                while True:
                    yield json.dumps({"token_ids": out.new_token_ids, "finish_reason": out.finish_reason,
                                      "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens,
                                      "error": out.error}) + "\n"
                    if out.finish_reason:
                        return
                    out = await stream.__anext__()
            finally:
                await stream.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # -- manual control -----------------------------------------------------------
    # One sleep / wake_up at a time (a repeated call sees the first one's result); the memory watch
    # takes it too while it gives a restarted memory service our memory back.
    control = app.state.control = asyncio.Lock()

    def _conflict(message: str) -> JSONResponse:
        return error(409, message, type_="conflict_error")

    @app.post("/engine/control/sleep")
    async def sleep():
        """Unmap the weights and the KV cache, keeping their addresses, and leave both pools.

        Only an ACTIVE engine sleeps (SLEEPING: 200, nothing to do; otherwise 409). Requests in flight
        are neither aborted nor waited for: the answer is 409 and the engine stays active (drain it
        first). Once asleep, new requests wait in _admit as on a standby (up to --standby-wait, then 503)."""
        async with control:
            if worker.state == "SLEEPING":
                return {"state": "SLEEPING", "changed": False}
            if worker.state != "ACTIVE":
                return _conflict(f"engine is {worker.state}: only an active engine can sleep")
            if worker.weights is None:  # not started by launch.build: its weights are not ours to unmap
                return _conflict("this engine's weights do not come from a memory service")
            if worker.info.get("tensor_parallel", 1) > 1:  # only rank 0's memory would go (tp_group.py)
                return _conflict("sleep is not supported with --tensor-parallel")
            if worker.engine.num_requests:
                return _conflict(f"{worker.engine.num_requests} requests in flight: drain the engine, then "
                                 f"retry (they are not aborted)")
            t0 = time.perf_counter()
            worker.lifecycle.set("SLEEPING")  # before any await: nothing is admitted from here on
            await asyncio.to_thread(release_memory, worker)
            seconds = round(time.perf_counter() - t0, 4)
            log(logger, "asleep", seconds=seconds)
            return {"state": "SLEEPING", "changed": True, "seconds": seconds}

    @app.post("/engine/control/wake_up")
    async def wake_up():
        """Remap the weights and the KV cache at the addresses they had, and serve again.

        SLEEPING -> ACTIVE (ACTIVE: 200, nothing to do; otherwise 409). The KV cache is adopted if the kv
        pool still has our layout, else started afresh (it is a cache). Weights whose layout changed
        while we slept cannot be used at our addresses: 409, state DEAD, and the process exits with code
        3 once the answer is sent. A memory service that cannot be reached or locked: 503, still asleep."""
        async with control:
            if worker.state == "ACTIVE":
                return {"state": "ACTIVE", "changed": False}
            if worker.state != "SLEEPING":
                return _conflict(f"engine is {worker.state}: only a sleeping engine wakes up")
            t0 = time.perf_counter()
            restored, refusal = await remap(worker, "wake up", "while the engine slept", "sleeping")
            if refusal is not None:
                return refusal
            worker.engine.start()  # on this loop: it delivers the engine's outputs here
            kv = worker.engine.engine.kv
            seconds = round(time.perf_counter() - t0, 4)
            worker.lifecycle.set("ACTIVE", kv_adopted=kv.adopted, restored_blocks=restored, seconds=seconds)
            return {"state": "ACTIVE", "changed": True, "kv_adopted": kv.adopted, "restored_blocks": restored,
                    "seconds": seconds}

    from understudy.engine.serving.control import (
        add_quiesce_routes,  # around a snapshot: /engine/control/quiesce and /resume
    )

    add_quiesce_routes(app, worker)
    return app

"""The frontend's HTTP API: OpenAI completions and chat (streaming and not), models, health, metrics,
run-time thresholds and, with embedded discovery, the engines' registry.

Text lives here: prompts are tokenised with the model's tokenizer and chat template, engines get and
return token ids, answers are detokenised incrementally with stop strings applied (the engine's own
code for both, engine/api.py and engine/text.py). A request is answered 200 only once an engine
produced its first token, so refusals keep their status codes (400, 404, 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from understudy.discovery.embedded import EmbeddedRegistry
from understudy.discovery.records import View
from understudy.common.api import BodyLimit, ChatCompletionRequest, ChatShape, CompletionRequest, CompletionShape, chat_prompt, collect_text, error, invalid_request, sse, sse_events
from understudy.common.params import SamplingParams
from understudy.common.text import TextStream
from understudy.common.tokenizer import Tokenizer
from understudy.logs import log
from understudy.frontend.health import HealthMonitor
from understudy.frontend.metrics import FrontendMetrics
from understudy.frontend.migration import EngineError, EngineRefused, Generation, Policy, StreamFailed
from understudy.frontend.pool import Pool
from understudy.frontend.router import AllBusy, NoEngine, Router, Thresholds

logger = logging.getLogger("understudy.frontend")


@dataclass
class Frontend:
    """Everything the HTTP layer needs."""

    model_name: str
    view: View
    discovery: str  # "embedded" or the etcd URL (for /health)
    policy: Policy = field(default_factory=Policy)
    thresholds: Thresholds = field(default_factory=Thresholds)
    default_max_tokens: int = 256
    max_request_bytes: int = 4 << 20
    retry_after: int = 1
    health_interval: float = 1.0
    health_timeout: float = 5.0
    canary_interval: float = 0.0
    canary_timeout: float = 10.0
    load_tokenizer: Callable[[], Tokenizer] | None = None  # run on a thread at start-up
    draining: bool = False
    inflight: set[str] = field(default_factory=set)  # ids of the requests being answered
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = FrontendMetrics()
        self.pool = Pool(self.view)
        self.router = Router(self.pool, self.thresholds, self.model_name)
        self.metrics.watch_engines(self.router)
        self.tokenizer_task: asyncio.Future | None = None
        self.http: httpx.AsyncClient | None = None
        self.monitor: HealthMonitor | None = None

    async def start(self) -> None:
        # No pool limit: every streamed request holds a connection to its engine for its whole life.
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                                      timeout=httpx.Timeout(30.0, connect=5.0))
        self.monitor = HealthMonitor(self.pool, self.http, self.metrics, interval=self.health_interval,
                                     timeout=self.health_timeout, canary_interval=self.canary_interval,
                                     canary_timeout=self.canary_timeout)
        if self.load_tokenizer is not None:
            self.tokenizer_task = asyncio.ensure_future(asyncio.to_thread(self.load_tokenizer))
        self.pool.start()
        await self.view.start()

    async def stop(self) -> None:
        await self.view.stop()
        if self.monitor is not None:
            await self.monitor.stop()
        if self.http is not None:
            await self.http.aclose()

    async def tokenizer(self) -> Tokenizer:
        return await asyncio.shield(self.tokenizer_task)

    @property
    def tokenizer_ready(self) -> bool:
        t = self.tokenizer_task
        return t is not None and t.done() and not t.cancelled() and t.exception() is None


class _ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_gone(request: Request, awaitable):
    """The awaitable's result, or _ClientGone (and the awaitable cancelled) if the client leaves first."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})
            raise _ClientGone()
    return work.result()


class _Stream(StreamingResponse):
    """Closes its body iterator however the response ends: when the client disconnects while the
    iterator waits at a `yield`, Starlette cancels the sender without closing it, and the engine's
    stream would stay open until garbage collection."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def create_app(fe: Frontend) -> FastAPI:
    app = FastAPI(title="understudy frontend", version="0.1.0")
    app.state.frontend = fe
    metrics = fe.metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.requests.labels(request.url.path.rsplit("/", 1)[-1], "invalid").inc()
        return invalid_request(exc.errors())

    app.add_middleware(BodyLimit, worker=fe)

    if isinstance(fe.view, EmbeddedRegistry):
        app.include_router(fe.view.routes())

    # -- health -------------------------------------------------------------------
    @app.get("/live")
    async def live():
        return {"status": "alive"}

    @app.get("/health")
    async def health():
        active = fe.router.active()
        reason = ("draining" if fe.draining else "loading the tokenizer" if not fe.tokenizer_ready
                  else "no active engine" if not active else None)
        body = {"status": "ok" if reason is None else "unavailable", "reason": reason, "model": fe.model_name,
                "discovery": fe.discovery, "active_engines": len(active),
                "busy_engines": sum(fe.router.busy(e) for e in active), "thresholds": fe.thresholds.as_dict(),
                "engines": [e.describe(fe.router.busy(e)) for e in fe.pool]}
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        lens = [e.record.max_model_len for e in fe.pool if e.record.model == fe.model_name]
        return {"object": "list", "data": [{"id": fe.model_name, "object": "model", "created": fe.created,
                                            "owned_by": "understudy", "max_model_len": max(lens, default=None)}]}

    # -- run-time settings ----------------------------------------------------------
    @app.get("/admin/thresholds")
    async def get_thresholds():
        return fe.thresholds.as_dict()

    @app.post("/admin/thresholds")
    async def set_thresholds(request: Request):
        """Change the busy thresholds: {"kv_usage": 0.9, "waiting": 8} (either or both)."""
        try:
            changes = json.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            old = fe.thresholds.as_dict()
            fe.thresholds.update(changes)
        except ValueError as e:
            return error(400, str(e))
        log(logger, "thresholds_changed", old=old, new=fe.thresholds.as_dict())
        return fe.thresholds.as_dict()

    # -- generation ---------------------------------------------------------------
    def _check_model(name: str | None) -> JSONResponse | None:
        if name and name != fe.model_name:
            return error(404, f"model {name!r} does not exist; this frontend serves {fe.model_name!r}",
                         param="model", type_="not_found_error")
        return None

    def _unavailable(endpoint: str, reason: str, message: str) -> JSONResponse:
        metrics.rejections.labels(reason).inc()
        metrics.requests.labels(endpoint, "rejected").inc()
        type_ = "overloaded_error" if reason == "all_busy" else "unavailable_error"
        return error(503, message, type_=type_, headers={"Retry-After": str(fe.retry_after)})

    async def _items(gen: Generation, tokenizer: Tokenizer, t0: float, outcome: dict) -> AsyncIterator[tuple]:
        """(text delta, finish reason, usage) triples with stop strings applied, with latency metrics."""
        text = TextStream(tokenizer, gen.prompt, gen.params.stop)
        n_prompt = len(gen.prompt)
        usage: dict[str, Any] = {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}
        last = None
        async with aclosing(gen.stream()) as chunks:
            async for c in chunks:
                now = time.perf_counter()
                if c.token_ids:
                    (metrics.ttft.observe(now - t0) if last is None else metrics.itl.observe(now - last))
                    last = now
                usage.update(completion_tokens=len(gen.generated), total_tokens=n_prompt + len(gen.generated),
                             prompt_tokens_details={"cached_tokens": c.cached_tokens})
                emit, hit = text.push(c.token_ids, final=c.finish_reason is not None)
                if hit:
                    outcome["value"] = "stop"
                    yield emit, "stop", usage
                    return  # closing the generation closes the engine's stream: it stops computing
                if c.finish_reason:
                    outcome["value"] = c.finish_reason
                yield emit, c.finish_reason, usage
                if c.finish_reason:
                    return

    async def _generate(request: Request, endpoint: str, prompt: list[int], params: SamplingParams, rid: str,
                        streaming: bool, include_usage: bool, render_chunk, render_final, t0: float,
                        tokenizer: Tokenizer):
        gen = Generation(fe.http, fe.router, metrics, fe.policy, prompt, params, rid)
        outcome: dict = {"value": None}
        items = _items(gen, tokenizer, t0, outcome)
        metrics.inflight.inc()
        fe.inflight.add(rid)
        counted = False

        def finish(value: str) -> None:
            nonlocal counted
            if not counted:
                counted = True
                metrics.inflight.dec()
                fe.inflight.discard(rid)
                metrics.requests.labels(endpoint, value).inc()
                if value == "cancelled":
                    metrics.cancellations.labels(endpoint).inc()
                    log(logger, "cancelled", request_id=rid, generated=len(gen.generated), engines=gen.engines)

        try:
            first = await _unless_gone(request, items.__anext__())
        except BaseException as e:
            await items.aclose()
            if isinstance(e, _ClientGone):
                finish("cancelled")
                return Response(status_code=499)
            counted = True  # each answer below counts itself
            metrics.inflight.dec()
            fe.inflight.discard(rid)
            if isinstance(e, AllBusy):
                return _unavailable(endpoint, "all_busy", f"every engine is busy: {e}; retry later")
            if isinstance(e, NoEngine):
                return _unavailable(endpoint, "no_engine", f"no engine can take the request: {e}")
            if isinstance(e, EngineRefused):  # the engine's own 4xx (too long for its context, ...)
                metrics.requests.labels(endpoint, "invalid").inc()
                return JSONResponse(e.body, status_code=e.status)
            if isinstance(e, StreamFailed):
                metrics.requests.labels(endpoint, "failed").inc()
                return error(503, str(e), type_="unavailable_error", headers={"Retry-After": str(fe.retry_after)})
            metrics.requests.labels(endpoint, "error").inc()
            if isinstance(e, EngineError):
                return error(500, f"the engine failed the request: {e}", type_="server_error")
            raise

        if streaming:
            async def events():
                try:
                    async for event in sse_events(first, items, render_chunk, include_usage):
                        yield event
                    finish(outcome["value"] or "stop")
                except (StreamFailed, EngineError, NoEngine, AllBusy) as e:
                    # After the 200: the error goes in the stream (the openai client raises it).
                    kind = "error" if isinstance(e, EngineError) else "failed"
                    yield sse({"error": {"message": str(e), "type": "server_error", "param": None,
                                          "code": 500 if kind == "error" else 503}})
                    finish(kind)
                except (asyncio.CancelledError, GeneratorExit):
                    finish("cancelled")
                    raise
                finally:
                    await items.aclose()
                    finish("error")  # anything not counted above
            return _Stream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        try:
            text, reason, usage = await _unless_gone(request, collect_text(first, items))
        except _ClientGone:
            finish("cancelled")
            return Response(status_code=499)
        except (StreamFailed, NoEngine, AllBusy) as e:
            finish("failed")
            return error(503, str(e), type_="unavailable_error", headers={"Retry-After": str(fe.retry_after)})
        except EngineError as e:
            finish("error")
            return error(500, f"the engine failed the request: {e}", type_="server_error")
        finally:
            await items.aclose()
        finish(outcome["value"] or reason)
        return JSONResponse(render_final(text, reason, usage))

    async def _prepare(endpoint: str, model: str | None) -> tuple[JSONResponse | None, Tokenizer | None]:
        if (bad := _check_model(model)) is not None:
            metrics.requests.labels(endpoint, "invalid").inc()
            return bad, None
        if fe.draining:
            return _unavailable(endpoint, "draining", "the frontend is shutting down"), None
        return None, await fe.tokenizer()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        refused, tokenizer = await _prepare("completions", body.model)
        if refused is not None:
            return refused
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer.encode(body.prompt)
        shape = CompletionShape(fe.model_name)
        return await _generate(request, "completions", prompt, body.sampling(fe.default_max_tokens), shape.id,
                               body.stream, body.include_usage, shape.chunk, shape.final, t0, tokenizer)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        refused, tokenizer = await _prepare("chat", body.model)
        if refused is not None:
            return refused
        try:
            prompt = chat_prompt(tokenizer, body)
        except ValueError as e:
            metrics.requests.labels("chat", "invalid").inc()
            return error(400, str(e), param="messages")
        shape = ChatShape(fe.model_name)

        return await _generate(request, "chat", prompt, body.sampling(fe.default_max_tokens), shape.id, body.stream,
                               body.include_usage, shape.chunk, shape.final, t0, tokenizer)

    return app

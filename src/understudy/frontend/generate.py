"""The frontend's generation routes: OpenAI completions and chat (POST /v1/completions,
/v1/chat/completions), streaming and not.

Text lives here: prompts are tokenised with the model's tokenizer and chat template, engines get and
return token ids (migration.Generation carries a request across engines), answers are detokenised
incrementally with stop strings applied (the engine's own code for both, common/api.py and
common/text.py). A request is answered 200 only once an engine produced its first token, so refusals
keep their status codes (400, 404, 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from understudy.common.api import (
    ChatCompletionRequest,
    ChatShape,
    ClientGone,
    CompletionRequest,
    CompletionShape,
    chat_prompt,
    collect_text,
    error,
    error_responses,
    sse,
    sse_events,
    unless_gone,
)
from understudy.common.params import SamplingParams
from understudy.common.text import TextStream
from understudy.common.tokenizer import Tokenizer
from understudy.frontend.migration import (
    EngineError,
    EngineRefused,
    Generation,
    StreamFailed,
)
from understudy.frontend.router import AllBusy, NoEngine
from understudy.frontend.service import Frontend
from understudy.logs import log

logger = logging.getLogger("understudy.frontend")


def add_generate_routes(app: FastAPI, fe: Frontend) -> None:
    @app.post("/v1/completions",
              responses=error_responses(400, 404, 413, 500, 503, ok_media=("text/event-stream",)))
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        refused, tokenizer = await _prepare(fe, "completions", body.model)
        if refused is not None:
            return refused
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer.encode(body.prompt)
        if not prompt:  # "" encodes to no token (the engine would name its own field, token_ids)
            fe.metrics.requests.labels("completions", "invalid").inc()
            return error(400, "the prompt is empty", param="prompt")
        shape = CompletionShape(fe.model_name)
        return await _generate(fe, request, "completions", prompt, body.sampling(fe.default_max_tokens), shape.id,
                               body.stream, body.include_usage, shape.chunk, shape.final, t0, tokenizer)

    @app.post("/v1/chat/completions",
              responses=error_responses(400, 404, 413, 500, 503, ok_media=("text/event-stream",)))
    async def chat(body: ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        refused, tokenizer = await _prepare(fe, "chat", body.model)
        if refused is not None:
            return refused
        try:
            prompt = chat_prompt(tokenizer, body)
        except ValueError as e:
            fe.metrics.requests.labels("chat", "invalid").inc()
            return error(400, str(e), param="messages")
        shape = ChatShape(fe.model_name)

        return await _generate(fe, request, "chat", prompt, body.sampling(fe.default_max_tokens), shape.id,
                               body.stream, body.include_usage, shape.chunk, shape.final, t0, tokenizer)


class _Stream(StreamingResponse):
    """Closes its body iterator however the response ends: when the client disconnects while the
    iterator waits at a `yield`, Starlette cancels the sender without closing it, and the engine's
    stream would stay open until garbage collection."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _check_model(fe: Frontend, name: str | None) -> JSONResponse | None:
    if name and name != fe.model_name:
        return error(404, f"model {name!r} does not exist; this frontend serves {fe.model_name!r}",
                     param="model", type_="not_found_error")
    return None


def _unavailable(fe: Frontend, endpoint: str, reason: str, message: str) -> JSONResponse:
    fe.metrics.rejections.labels(reason).inc()
    fe.metrics.requests.labels(endpoint, "rejected").inc()
    type_ = "overloaded_error" if reason == "all_busy" else "unavailable_error"
    return error(503, message, type_=type_, headers={"Retry-After": str(fe.retry_after)})


async def _prepare(fe: Frontend, endpoint: str, model: str | None) -> tuple[JSONResponse | None, Tokenizer | None]:
    if (bad := _check_model(fe, model)) is not None:
        fe.metrics.requests.labels(endpoint, "invalid").inc()
        return bad, None
    if fe.draining:
        return _unavailable(fe, endpoint, "draining", "the frontend is shutting down"), None
    return None, await fe.tokenizer()


async def _items(fe: Frontend, gen: Generation, tokenizer: Tokenizer, t0: float,
                 outcome: dict) -> AsyncIterator[tuple]:
    """(text delta, finish reason, usage) triples with stop strings applied, with latency metrics."""
    metrics = fe.metrics
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


async def _generate(fe: Frontend, request: Request, endpoint: str, prompt: list[int], params: SamplingParams,
                    rid: str, streaming: bool, include_usage: bool, render_chunk, render_final, t0: float,
                    tokenizer: Tokenizer):
    metrics = fe.metrics
    gen = Generation(fe.http, fe.router, metrics, fe.policy, prompt, params, rid)
    outcome: dict = {"value": None}
    items = _items(fe, gen, tokenizer, t0, outcome)
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
        first = await unless_gone(request, items.__anext__())
    except BaseException as e:
        await items.aclose()
        if isinstance(e, ClientGone):
            finish("cancelled")
            return Response(status_code=499)
        counted = True  # each answer below counts itself
        metrics.inflight.dec()
        fe.inflight.discard(rid)
        if isinstance(e, AllBusy):
            return _unavailable(fe, endpoint, "all_busy", f"every engine is busy: {e}; retry later")
        if isinstance(e, NoEngine):
            return _unavailable(fe, endpoint, "no_engine", f"no engine can take the request: {e}")
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
        text, reason, usage = await unless_gone(request, collect_text(first, items))
    except ClientGone:
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

"""The frontend's generation routes: OpenAI completions and chat (POST /v1/completions,
/v1/chat/completions), streaming and not.

Engines get and return token ids (migration.Generation carries each choice across engines); the text-level
work (fields -> SamplingParams, chat template, detokenization, stop strings, logprobs, n choices, tool calls,
reasoning) is common/openai_serving.py's, the engine's own code, and its state lives here, so it continues
over a migration. A request is answered 200 only once an engine produced its first token, so refusals
keep their status codes (400, 404, 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import replace
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from understudy.common.api import (
    ChatCompletionRequest,
    ClientGone,
    CompletionRequest,
    error,
    error_responses,
    sse,
    unless_gone,
)
from understudy.common.openai_requests import FieldError, log_ignored
from understudy.common.openai_serving import Answer, Choice, Piece
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
        return await _answer(fe, request, body, "completions")

    @app.post("/v1/chat/completions",
              responses=error_responses(400, 404, 413, 500, 503, ok_media=("text/event-stream",)))
    async def chat(body: ChatCompletionRequest, request: Request):
        return await _answer(fe, request, body, "chat")


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
    if not fe.openai.serves(name):
        return error(404, f"model {name!r} does not exist; this frontend serves "
                          f"{', '.join(map(repr, fe.openai.served_model_names))}",
                     param="model", type_="not_found_error")
    return None



def _unavailable(fe: Frontend, endpoint: str, reason: str, message: str) -> JSONResponse:
    fe.metrics.rejections.labels(reason).inc()
    fe.metrics.requests.labels(endpoint, "rejected").inc()
    type_ = "overloaded_error" if reason == "all_busy" else "unavailable_error"
    return error(503, message, type_=type_, headers={"Retry-After": str(fe.retry_after)})


def _source(fe: Frontend, rid: str, t0: float, gens: list[Generation]):
    """Tokens for one choice from the engines (openai_serving.Source): a Generation, which migrates."""
    async def source(choice: Choice) -> AsyncIterator[Piece]:
        params = choice.params
        if params.seed is None:  # a seed of our own, so that a migrated stream continues the same random draws
            params = replace(params, seed=random.getrandbits(63))
        gen = Generation(fe.http, fe.router, fe.metrics, fe.policy, choice.prompt, params,
                         rid if choice.index == 0 else f"{rid}-{choice.index}")
        gens.append(gen)
        last = None
        async with aclosing(gen.stream()) as chunks:
            async for c in chunks:
                now = time.perf_counter()
                if c.token_ids:
                    (fe.metrics.ttft.observe(now - t0) if last is None else fe.metrics.itl.observe(now - last))
                    last = now
                yield Piece(c.token_ids, c.finish_reason, c.prompt_tokens, c.cached_tokens, c.logprobs,
                            c.prompt_logprobs)
    return source


async def _answer(fe: Frontend, request: Request, body, endpoint: str):
    """An OpenAI completions or chat request: the text-level work is common/openai_serving.py's."""
    t0 = time.perf_counter()
    metrics = fe.metrics
    if (bad := _check_model(fe, body.model)) is not None:
        metrics.requests.labels(endpoint, "invalid").inc()
        return bad
    if fe.draining:
        return _unavailable(fe, endpoint, "draining", "the frontend is shutting down")
    tokenizer = await fe.tokenizer()
    rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    log_ignored(body, rid)
    build = Answer.chat_completions if endpoint == "chat" else Answer.completions
    try:
        # max_model_len None: an omitted max_tokens is left to the engine, which knows its KV cache too
        answer = build(body, tokenizer, fe.openai, None, rid, fe.default_max_tokens)
    except FieldError as e:
        metrics.requests.labels(endpoint, "invalid").inc()
        return error(400, str(e), param=e.param)
    gens: list[Generation] = []
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
                log(logger, "cancelled", request_id=rid, generated=sum(len(g.generated) for g in gens),
                    engines=[e for g in gens for e in g.engines])

    def outcome() -> str:
        return answer.choices[0].finish_reason or "stop"

    try:
        await unless_gone(request, answer.start(_source(fe, rid, t0, gens)))
    except BaseException as e:
        await answer.aclose()
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

    if body.stream:
        async def events():
            try:
                async for event in answer.events():
                    yield event
                finish(outcome())
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
                await answer.aclose()
                finish("error")  # anything not counted above
        return _Stream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    try:
        whole = await unless_gone(request, answer.whole())
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
        await answer.aclose()
    finish(outcome())
    return JSONResponse(whole)

"""The worker's generation routes: OpenAI completions and chat (POST /v1/completions, /v1/chat/completions)
and the token-level stream the frontend uses (POST /engine/generate).

The text-level work (request fields -> SamplingParams, prompts, detokenization, stop strings, logprobs,
n choices, tool calls) is common/openai_serving.py's, shared with the frontend; this module gives it the
engine's tokens. A request is held until the engine is ACTIVE (bounded) and checked against it before
the 200, so refusals keep their status codes (400, 404, 503 + Retry-After). A client that goes away
cancels its request in the engine at once (its KV blocks are freed). When the engine fails
(serving/faults.py), a request not yet answered gets 503 + Retry-After, a token stream ends without its
final line (the frontend migrates it) and an SSE stream gets an error event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from understudy.common.api import (
    ChatCompletionRequest,
    ClientGone,
    CompletionRequest,
    TokenGenerateRequest,
    error,
    error_responses,
    logprobs_wire,
    sse,
    unless_gone,
)
from understudy.common.openai_requests import FieldError, log_ignored
from understudy.common.openai_serving import Answer, Choice, Piece
from understudy.engine.core.async_engine import EngineDead
from understudy.engine.core.scheduler import QueueFull
from understudy.engine.serving.metrics import EngineMetrics
from understudy.engine.serving.worker import NotActive, Worker


def add_generate_routes(app: FastAPI, worker: Worker, metrics: EngineMetrics) -> None:
    @app.post("/v1/completions", responses=error_responses(400, 404, 413, 503, ok_media=("text/event-stream",)))
    async def completions(body: CompletionRequest, request: Request):
        return await _answer(worker, metrics, request, body, "completions")

    @app.post("/v1/chat/completions",
              responses=error_responses(400, 404, 413, 503, ok_media=("text/event-stream",)))
    async def chat(body: ChatCompletionRequest, request: Request):
        return await _answer(worker, metrics, request, body, "chat")

    @app.post("/engine/generate", responses=error_responses(400, 413, 503, ok_media=("application/x-ndjson",)))
    async def generate_tokens(body: TokenGenerateRequest):
        """Token ids in, newline-delimited JSON out: {"token_ids": [...], "finish_reason": ..., ...} per step,
        with "logprobs" / "prompt_logprobs" when the request asked for them."""
        params = body.params()
        try:
            if params.max_tokens is None:  # the frontend leaves an omitted max_tokens to us
                params.max_tokens = _rest_of_context(worker, len(body.token_ids))
            await _admit(worker, params, len(body.token_ids))
            stream = _tokens(worker, metrics, body.token_ids, params, "tokens")
            first = await stream.__anext__()
        except (NotActive, QueueFull, ValueError, EngineDead) as e:
            return _refusal(e)

        async def lines():
            try:
                out = first
                while True:
                    line = {"token_ids": out.new_token_ids, "finish_reason": out.finish_reason,
                            "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens, "error": out.error}
                    for key in ("logprobs", "prompt_logprobs"):  # only when the request asked for them
                        if getattr(out, key, None) is not None:
                            line[key] = logprobs_wire(getattr(out, key))
                    yield json.dumps(line) + "\n"
                    if out.finish_reason:
                        return
                    try:
                        out = await stream.__anext__()
                    except EngineDead:  # ended without a final line: the frontend migrates the request
                        return
            finally:
                await stream.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")


FAILURE_HEADER = "X-Understudy-Failure"  # on the 503s of an engine that failed: how it ends (exit_codes.NAMES)


def _check_model(worker: Worker, name: str | None) -> JSONResponse | None:
    if not worker.openai.serves(name):
        return error(404, f"model {name!r} does not exist; this engine serves "
                          f"{', '.join(map(repr, worker.openai.served_model_names))}",
                     param="model", type_="not_found_error")
    return None


def _refusal(e: Exception) -> JSONResponse:
    """A request refused before its first token: not active or overloaded (retry later), or invalid."""
    if isinstance(e, NotActive):
        return error(503, str(e), type_="unavailable_error", headers={"Retry-After": "1"})
    if isinstance(e, EngineDead):  # the engine failed (serving/faults.py): another engine can take it; the
        # header tells a frontend that this engine is gone (not busy): step_error, watchdog or device_fault
        return error(503, f"engine failed: {e}", type_="unavailable_error",
                     headers={"Retry-After": "1", FAILURE_HEADER: e.exit})
    if isinstance(e, QueueFull):
        return error(503, f"engine overloaded: {e}", type_="overloaded_error", headers={"Retry-After": "1"})
    return error(400, str(e))


async def _tokens(worker: Worker, metrics: EngineMetrics, prompt: list[int], params, endpoint: str,
                  done: Choice | None = None) -> AsyncIterator:
    """The engine's stream, with metrics; bad requests and overload surface before the first token.

    A choice that the text layer finished (a stop string) before the engine did is counted by its finish
    reason, not as cancelled."""
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
        outcome = outcome or (done.finish_reason if done is not None else None) or "cancelled"
        raise
    except QueueFull:
        outcome = "rejected"
        raise
    finally:
        metrics.requests.labels(endpoint, outcome or "error").inc()


def _context(worker: Worker) -> int:
    """The longest prompt + completion this engine can run: its context length, or its KV cache if smaller."""
    blocks = worker.engine.engine.scheduler.blocks
    return min(worker.max_model_len, blocks.num_blocks * blocks.block_size)


def _rest_of_context(worker: Worker, prompt_len: int) -> int:
    """An omitted max_tokens: the rest of the context (at most --default-max-tokens when set)."""
    rest = max(1, _context(worker) - prompt_len)
    return rest if worker.default_max_tokens is None else min(rest, worker.default_max_tokens)


async def _admit(worker: Worker, params, prompt_len: int) -> None:
    """Hold a request until the engine is active (bounded), then check it can ever run."""
    if not await worker.lifecycle.wait_active(worker.standby_wait):
        if worker.failure is not None:  # DEAD after a fault (e.g. a shadow refusing a faulty device)
            raise EngineDead(worker.failure, worker.engine.failure_exit)
        raise NotActive(f"engine is {worker.state}, not active")
    params.validate()
    worker.engine.engine.scheduler.check_fits(prompt_len, params.max_tokens)


def _source(worker: Worker, metrics: EngineMetrics, endpoint: str):
    """The engine's tokens for one choice of an OpenAI request (openai_serving.Source)."""
    async def source(choice: Choice) -> AsyncIterator[Piece]:
        await _admit(worker, choice.params, len(choice.prompt))
        stream = _tokens(worker, metrics, choice.prompt, choice.params, endpoint, choice)
        try:
            async for out in stream:
                if out.error:
                    raise RuntimeError(out.error)
                yield Piece(out.new_token_ids, out.finish_reason, out.prompt_tokens, out.cached_tokens,
                            getattr(out, "logprobs", None), getattr(out, "prompt_logprobs", None))
        finally:
            await stream.aclose()
    return source


async def _answer(worker: Worker, metrics: EngineMetrics, request: Request, body, endpoint: str):
    """An OpenAI completions or chat request: the text-level work is common/openai_serving.py's."""
    if (bad := _check_model(worker, body.model)) is not None:
        return bad
    rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    log_ignored(body, rid)
    build = Answer.chat_completions if endpoint == "chat" else Answer.completions
    try:
        answer = build(body, worker.tokenizer, worker.openai, _context(worker), rid, worker.default_max_tokens)
        await answer.start(_source(worker, metrics, endpoint))
    except FieldError as e:
        return error(400, str(e), param=e.param)
    except (NotActive, QueueFull, ValueError, EngineDead) as e:
        return _refusal(e)
    if body.stream:
        async def events():
            try:
                async for event in answer.events():
                    yield event
            except EngineDead as e:  # after the 200: the error goes in the stream (the openai client raises it)
                yield sse({"error": {"message": f"engine failed: {e}", "type": "unavailable_error", "param": None,
                                     "code": 503}})
            finally:
                await answer.aclose()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    try:
        # BUGFIX (tests/engine/test_engine_http.py::test_nonstreaming_client_timeout_cancels_engine_work):
        # the streams run inside the collecting task until its cancellation lands; closing them before that
        # raised "aclose(): asynchronous generator is already running" (a 500). unless_gone awaits the task.
        whole = await unless_gone(request, answer.whole())
    except ClientGone:  # the client left: the work for it is cancelled
        return Response(status_code=499)
    except EngineDead as e:  # nothing was sent yet: retry it elsewhere
        return _refusal(e)
    finally:
        await answer.aclose()
    return JSONResponse(whole)

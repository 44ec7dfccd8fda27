"""The worker's generation routes: OpenAI completions and chat (POST /v1/completions, /v1/chat/completions)
and the token-level stream the frontend uses (POST /engine/generate).

Text lives only here: prompts are tokenised, tokens are detokenised incrementally and stop strings are
matched on the text. A request is held until the engine is ACTIVE (bounded) and checked against it before
the 200, so refusals keep their status codes (400, 404, 503 + Retry-After). A client that goes away
cancels its request in the engine at once (its KV blocks are freed). When the engine fails
(serving/faults.py), a request not yet answered gets 503 + Retry-After, a token stream ends without its
final line (the frontend migrates it) and an SSE stream gets an error event.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from understudy.common.api import (
    ChatCompletionRequest,
    ChatShape,
    ClientGone,
    CompletionRequest,
    CompletionShape,
    TokenGenerateRequest,
    chat_prompt,
    collect_text,
    error,
    error_responses,
    sse,
    sse_events,
    unless_gone,
)
from understudy.common.text import TextStream
from understudy.engine.core.async_engine import EngineDead
from understudy.engine.core.scheduler import QueueFull
from understudy.engine.serving.metrics import EngineMetrics
from understudy.engine.serving.worker import NotActive, Worker


def add_generate_routes(app: FastAPI, worker: Worker, metrics: EngineMetrics) -> None:
    @app.post("/v1/completions", responses=error_responses(400, 404, 413, 503, ok_media=("text/event-stream",)))
    async def completions(body: CompletionRequest, request: Request):
        if (bad := _check_model(worker, body.model)) is not None:
            return bad
        prompt = body.prompt if isinstance(body.prompt, list) else worker.tokenizer.encode(body.prompt)
        if not prompt:  # "" encodes to no token
            return error(400, "the prompt is empty", param="prompt")
        shape = CompletionShape(worker.model_name)
        return await _generate(worker, metrics, request, prompt, body.sampling(worker.default_max_tokens),
                               "completions", body.stream, shape.chunk, shape.final, body.include_usage)

    @app.post("/v1/chat/completions",
              responses=error_responses(400, 404, 413, 503, ok_media=("text/event-stream",)))
    async def chat(body: ChatCompletionRequest, request: Request):
        if (bad := _check_model(worker, body.model)) is not None:
            return bad
        try:
            prompt = chat_prompt(worker.tokenizer, body)
        except ValueError as e:
            return error(400, str(e), param="messages")
        shape = ChatShape(worker.model_name)

        return await _generate(worker, metrics, request, prompt, body.sampling(worker.default_max_tokens), "chat",
                               body.stream, shape.chunk, shape.final, body.include_usage)

    @app.post("/engine/generate", responses=error_responses(400, 413, 503, ok_media=("application/x-ndjson",)))
    async def generate_tokens(body: TokenGenerateRequest):
        """Token ids in, newline-delimited JSON out: {"token_ids": [...], "finish_reason": ...} per step."""
        params = body.params()
        try:
            await _admit(worker, params, len(body.token_ids))
            stream = _tokens(worker, metrics, body.token_ids, params, "tokens")
            first = await stream.__anext__()
        except (NotActive, QueueFull, ValueError, EngineDead) as e:
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
                    try:
                        out = await stream.__anext__()
                    except EngineDead:  # ended without a final line: the frontend migrates the request
                        return
            finally:
                await stream.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")


FAILURE_HEADER = "X-Understudy-Failure"  # on the 503s of an engine that failed: how it ends (exit_codes.NAMES)


def _check_model(worker: Worker, name: str | None) -> JSONResponse | None:
    if name and name != worker.model_name:
        return error(404, f"model {name!r} does not exist; this engine serves {worker.model_name!r}",
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
                  done: dict | None = None) -> AsyncIterator:
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


async def _text(worker: Worker, metrics: EngineMetrics, prompt: list[int], params,
                endpoint: str) -> AsyncIterator[tuple[str, str | None, dict]]:
    """(text delta, finish reason, usage) triples with stop strings applied."""
    text_of = TextStream(worker.tokenizer, prompt, params.stop)
    usage = {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
    done: dict = {}
    tokens = _tokens(worker, metrics, prompt, params, endpoint, done)
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


async def _admit(worker: Worker, params, prompt_len: int) -> None:
    """Hold a request until the engine is active (bounded), then check it can ever run."""
    if not await worker.lifecycle.wait_active(worker.standby_wait):
        if worker.failure is not None:  # DEAD after a fault (e.g. a shadow refusing a faulty device)
            raise EngineDead(worker.failure, worker.engine.failure_exit)
        raise NotActive(f"engine is {worker.state}, not active")
    params.validate()
    worker.engine.engine.scheduler.check_fits(prompt_len, params.max_tokens)


async def _start(worker: Worker, metrics: EngineMetrics, prompt: list[int], params, endpoint: str):
    """Validate against the engine before answering 200: returns (first item, rest) or an error."""
    await _admit(worker, params, len(prompt))
    worker.engine.engine.scheduler.check_fits(len(prompt), params.max_tokens)
    stream = _text(worker, metrics, prompt, params, endpoint)
    try:
        first = await stream.__anext__()
    except BaseException:
        await stream.aclose()
        raise
    return first, stream


async def _generate(worker: Worker, metrics: EngineMetrics, request: Request, prompt: list[int], params,
                    endpoint: str, streaming: bool, render_chunk, render_final, include_usage: bool):
    try:
        first, rest = await _start(worker, metrics, prompt, params, endpoint)
    except (NotActive, QueueFull, ValueError, EngineDead) as e:
        return _refusal(e)
    if streaming:
        async def events():
            try:
                async for event in sse_events(first, rest, render_chunk, include_usage):
                    yield event
            except EngineDead as e:  # after the 200: the error goes in the stream (the openai client raises it)
                yield sse({"error": {"message": f"engine failed: {e}", "type": "unavailable_error", "param": None,
                                     "code": 503}})
            finally:
                await rest.aclose()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    try:
        # BUGFIX (tests/engine/test_engine_http.py::test_nonstreaming_client_timeout_cancels_engine_work):
        # `rest` runs inside the collecting task until its cancellation lands; closing it before that raised
        # "aclose(): asynchronous generator is already running" (a 500). unless_gone awaits the cancelled task.
        text, reason, usage = await unless_gone(request, collect_text(first, rest))
    except ClientGone:  # the client left: the work for it is cancelled
        return Response(status_code=499)
    except EngineDead as e:  # nothing was sent yet: retry it elsewhere
        return _refusal(e)
    finally:
        await rest.aclose()
    return JSONResponse(render_final(text, reason, usage))

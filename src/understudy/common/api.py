"""Request bodies of the worker's HTTP API (OpenAI-compatible and token-level), errors and the body limit.

Validation happens here, so a wrong payload becomes one OpenAI-style 400
before it reaches the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from understudy.common.params import SamplingParams

MAX_STOP_STRINGS = 16
# What torch.Generator.manual_seed takes: a seed outside it failed inside the engine.
SEED = {"ge": -(1 << 63), "le": (1 << 64) - 1}
# BUGFIX (tests/test_http_fuzz.py::test_bad_types_are_400s): pydantic's lax mode took what the schema
# forbids (false or "5" for an integer, 1.0 for n, [false] as token ids, NaN / Infinity for floats) and
# served it. Bodies are validated strictly now (an integer is still a valid float), as OpenAI does.
STRICT = {"strict": True, "allow_inf_nan": False}


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", **STRICT)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)  # extension (vLLM has it too)
    seed: int | None = Field(default=None, **SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)  # extension
    ignore_eos: bool = False  # extension
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
                              stop=tuple(self.stop or ()))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (send several requests for a batch)")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt is empty")
        return v

    @field_validator("echo", "suffix", "logprobs")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", **STRICT)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if any(part.get("type") != "text" for part in content):
                raise ValueError("only text content parts are supported")
            if any(not isinstance(part.get("text", ""), str) for part in content):
                raise ValueError("the `text` of a content part must be a string")
            content = "".join(part.get("text", "") for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs is not supported")
        return v

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling(default_max_tokens)
        if self.max_completion_tokens:
            params.max_tokens = self.max_completion_tokens
        return params


class TokenSampling(BaseModel):
    model_config = ConfigDict(extra="forbid", **STRICT)

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = Field(default=None, **SEED)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    # Tokens already sampled with this seed by another engine (a migrated request resumes the stream).
    seed_offset: int = Field(default=0, ge=0)


class TokenGenerateRequest(BaseModel):
    """The frontend's request: token ids in, a stream of token ids out."""

    model_config = ConfigDict(extra="forbid", **STRICT)

    token_ids: list[int] = Field(min_length=1)
    sampling: TokenSampling = Field(default_factory=TokenSampling)
    request_id: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _offset_within_prompt(self):
        """BUGFIX (tests/test_http_fuzz.py::test_seed_offset_beyond_the_prompt_is_400): the engine makes
        seed_offset random draws (2.3 ms each for SmolLM2's vocabulary on a CPU) on its own thread before a
        seeded request starts: a seed_offset of 10^6 held every request for 40 minutes. The draws were made
        for tokens that are in the prompt now (a migration resends them), so there are fewer of them."""
        if self.sampling.seed_offset >= len(self.token_ids):
            raise ValueError(f"sampling.seed_offset ({self.sampling.seed_offset}) must be below the number of "
                             f"token_ids ({len(self.token_ids)}): the tokens drawn elsewhere are in the prompt")
        return self

    def params(self) -> SamplingParams:
        s = self.sampling
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              seed=s.seed, stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
                              seed_offset=s.seed_offset)


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status, headers=headers)


# -- what the OpenAPI schema (/openapi.json) says about errors ---------------------------------------

ERROR_BODY = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "code": {"type": "integer"}}}}}
_WHY = {400: "Invalid request: malformed JSON, a wrong or missing field (named in `param`), a value the server "
             "cannot serve", 404: "Unknown model or resource", 409: "Conflicts with the current state",
        413: "Request body above --max-request-bytes", 500: "The server failed (never for bad input)",
        503: "Not serving now (overloaded, not active, draining): retry after `Retry-After` seconds"}


def error_responses(*codes: int, ok_media: tuple[str, ...] = ()) -> dict:
    """A route's `responses=` for FastAPI: these error statuses with OpenAI-style error bodies, and the
    media types its 200 may have besides JSON (ok_media: "text/event-stream" for a stream)."""
    out: dict = {code: {"description": _WHY[code], "content": {"application/json": {"schema": ERROR_BODY}}}
                 for code in codes}
    if ok_media:
        out[200] = {"content": {media: {} for media in ok_media}}  # a stream: no one JSON schema
    return out


def document_validation_as_400(app) -> None:
    """Validation failures are answered 400 (invalid_request), never FastAPI's 422: the app's OpenAPI
    schema says so (a client, or a schema-driven fuzzer, can trust the listed statuses)."""
    make = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = make()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    responses = op.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses.setdefault("400", error_responses(400)[400])
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def openai_http_errors(app) -> None:
    """Errors Starlette or FastAPI raise themselves (a body that is not UTF-8, an unknown path, a wrong
    method) in the OpenAI shape too, not as {"detail": ...}.

    BUGFIX (tests/test_http_fuzz.py::test_non_utf8_body_is_an_openai_400): a body that is not UTF-8 got
    {"detail": "There was an error parsing the body"}, which no OpenAI client can read."""
    from starlette.exceptions import HTTPException

    types = {404: "not_found_error", 405: "invalid_request_error"}

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), type_=types.get(exc.status_code, "invalid_request_error"),
                     headers=getattr(exc, "headers", None))


def invalid_request(errors: list[dict]) -> JSONResponse:
    """A pydantic / FastAPI validation failure as one OpenAI-style 400 naming the first bad field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))} "
                          f"(at character {first.get('loc', [None, '?'])[-1]})")
    param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'body'}: {e.get('msg')}"
                        for e in errors[:5])
    return error(400, message or "invalid request", param=param)


class BodyLimit:
    """413 for request bodies over `worker.max_request_bytes` (any object with that attribute).

    BUGFIX (tests/engine/test_engine_http.py::test_oversized_body_gets_413): only Content-Length was
    checked, so a chunked upload of any size went through. Bodies without one are now read (up to the
    limit) before the app runs, then replayed to it."""

    def __init__(self, app, worker: Any):
        self.app, self.worker = app, worker

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.worker.max_request_bytes
        too_big = lambda: error(413, f"request body exceeds the limit of {limit} bytes")  # noqa: E731
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > limit:
                return await too_big()(scope, receive, send)
            return await self.app(scope, receive, send)
        body, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            size += len(message.get("body", b""))
            if size > limit:
                return await too_big()(scope, receive, send)
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


# -- OpenAI response bodies (the engine's own API and the frontend's) ----------------------------

class CompletionShape:
    """The `text_completion` bodies of one request: streamed chunks and the whole answer."""

    def __init__(self, model: str):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.base = {"id": self.id, "object": "text_completion", "created": int(time.time()), "model": model}

    def chunk(self, text: str | None, reason: str | None) -> dict[str, Any]:
        return {**self.base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}

    def final(self, text: str, reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.chunk(text, reason), "usage": usage}


class ChatShape:
    """The `chat.completion(.chunk)` bodies of one request; the first chunk with text names the role."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.base = {"id": self.id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        self._started = False

    def chunk(self, text: str | None, reason: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not self._started and text is not None:
            delta["role"] = "assistant"
            self._started = True
        if text:
            delta["content"] = text
        return {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    def final(self, text: str, reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.base, "object": "chat.completion", "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": reason}]}


def chat_prompt(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The token ids of a chat request, through the model's chat template (ValueError if it fails)."""
    try:
        text = tokenizer.apply_chat_template([m.text() for m in body.messages], add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault
        raise ValueError(f"cannot render the chat template: {e}") from e
    return tokenizer.encode(text, add_special_tokens=False)


# The text of a completion arrives as (text, finish_reason, usage) items; the last has a reason.
TextItem = tuple[str, "str | None", dict]


def sse(obj: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def sse_events(first: TextItem, rest: AsyncIterator[TextItem], render_chunk: Callable,
                     include_usage: bool) -> AsyncIterator[str]:
    """A streamed OpenAI answer: a chunk per piece of text, the usage chunk if asked for, then [DONE]."""
    item = first
    while True:
        text, reason, usage = item
        if text or reason:
            yield sse(render_chunk(text, reason))
        if reason:
            if include_usage:
                yield sse({**render_chunk(None, None), "choices": [], "usage": usage})
            break
        item = await rest.__anext__()
    yield "data: [DONE]\n\n"


async def collect_text(first: TextItem, rest: AsyncIterator[TextItem]) -> TextItem:
    """A whole (non-streamed) answer: all the text, the finish reason and the usage."""
    parts, item = [], first
    while True:
        text, reason, usage = item
        parts.append(text)
        if reason:
            return "".join(parts), reason, usage
        item = await rest.__anext__()


class ClientGone(Exception):
    """The client went away before its answer was ready (the work for it was cancelled)."""


async def disconnected(request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_gone(request, awaitable):
    """The awaitable's result, or ClientGone (and the awaitable cancelled, and awaited until it has ended)
    if the client leaves first."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})
            raise ClientGone()
    return work.result()

"""Request bodies of the worker's HTTP API (OpenAI-compatible and token-level), errors and the body limit.

Validation happens here, so a wrong payload becomes one OpenAI-style 400
before it reaches the engine.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from understudy.common.params import MAX_LOGPROBS, SamplingParams, StructuredSpec, TokenLogprob

MAX_STOP_STRINGS = 16
MAX_N = 64  # choices per prompt (n, best_of)
MAX_PROMPTS = 256  # prompts in one /v1/completions request
# What torch.Generator.manual_seed takes: a seed outside it failed inside the engine.
SEED = {"ge": -(1 << 63), "le": (1 << 64) - 1}
# BUGFIX (tests/test_http_fuzz.py::test_bad_types_are_400s): pydantic's lax mode took what the schema
# forbids (false or "5" for an integer, 1.0 for n, [false] as token ids, NaN / Infinity for floats) and
# served it. Bodies are validated strictly now (an integer is still a valid float), as OpenAI does.
STRICT = {"strict": True, "allow_inf_nan": False}


class _Request(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's and the vLLM extensions we list;
    common/openai_fields.py says how each is served)."""

    # extra="allow": an unknown field is kept so the route can log it as ignored (as vLLM does).
    model_config = ConfigDict(extra="allow", **STRICT)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)  # extension (vLLM has it too)
    min_p: float = Field(default=0.0, ge=0, le=1)  # vLLM
    seed: int | None = Field(default=None, **SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)  # extension
    ignore_eos: bool = False  # extension
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)  # vLLM
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(default=0, ge=0)  # vLLM
    allowed_token_ids: list[int] | None = None  # vLLM
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # vLLM
    response_format: dict[str, Any] | None = None  # OpenAI (chat); vLLM takes it on completions too
    guided_json: str | dict[str, Any] | None = None  # vLLM (older spelling of structured_outputs.json)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM: {json | regex | choice | grammar | json_object}

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (strings of digits), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        unknown = set(v or {}) - {"include_usage", "continuous_usage_stats", "include_obfuscation"}
        if unknown:
            raise ValueError(f"unsupported stream_options: {', '.join(sorted(unknown))}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    @property
    def ignored_fields(self) -> list[str]:
        """Fields the request sent that no schema we serve has (logged, as vLLM does)."""
        return sorted(self.model_extra or {})


def _refuse_unless(allowed: Callable[[Any], bool], why: str):
    """A validator refusing a field we cannot serve unless its value asks for nothing (a 400 naming it)."""

    def check(cls, v, info):
        if v is not None and not allowed(v):
            raise ValueError(f"{info.field_name} is not supported: {why}")
        return v

    return classmethod(check)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Request):
    prompt: Prompt
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    check_suffix = field_validator("suffix")(_refuse_unless(lambda v: v == "", "no model we serve fills in the middle"))

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt is empty")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("a prompt in the list is empty")
        if len(cls.prompt_list(v)) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    @staticmethod
    def prompt_list(v: Prompt) -> list[str | list[int]]:
        """The prompts: a string, token ids, or a list of either."""
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return [v]
        return list(v)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", **STRICT)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call
    reasoning_content: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _calls(cls, v):
        for call in v or ():
            fn = call.get("function")
            if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)
                    and isinstance(fn.get("arguments", ""), (str, dict))):
                raise ValueError('each tool call is {"id": ..., "type": "function", "function": {"name": ..., '
                                 '"arguments": ...}}')
        return v

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: text content; tool calls with their arguments as objects
        (templates render them with tojson); the tool message's call id."""
        content = self.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if any(part.get("type") != "text" for part in content):
                raise ValueError("only text content parts are supported")
            if any(not isinstance(part.get("text", ""), str) for part in content):
                raise ValueError("the `text` of a content part must be a string")
            content = "".join(part.get("text", "") for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                fn = dict(call.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass  # not JSON: the template gets the text
                calls.append({**call, "function": fn})
            out["tool_calls"] = calls
        return out


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: e.g. {"enable_thinking": false}
    add_generation_prompt: bool = True  # vLLM
    continue_final_message: bool = False  # vLLM: the answer continues the last message (prefill)
    # OpenAI fields we cannot serve: a 400 naming them unless they ask for nothing.
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # a caching hint: prefix caching is automatic here
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    safety_identifier: str | None = None  # logged with the request, like user

    check_audio = field_validator("audio")(_refuse_unless(lambda v: False, "no audio output"))
    check_modalities = field_validator("modalities")(_refuse_unless(lambda v: v == ["text"], "text output only"))
    check_functions = field_validator("functions", "function_call")(
        _refuse_unless(lambda v: False, "deprecated by OpenAI: use tools and tool_choice"))
    check_prediction = field_validator("prediction")(_refuse_unless(lambda v: False, "no speculative decoding"))
    check_web = field_validator("web_search_options")(_refuse_unless(lambda v: False, "no web search"))
    check_effort = field_validator("reasoning_effort")(
        _refuse_unless(lambda v: False, "use chat_template_kwargs (e.g. enable_thinking) for reasoning models"))
    check_verbosity = field_validator("verbosity")(_refuse_unless(lambda v: False, "no verbosity control"))
    check_store = field_validator("store")(_refuse_unless(lambda v: v is False, "completions are not stored"))
    check_metadata = field_validator("metadata")(_refuse_unless(lambda v: not v, "completions are not stored"))
    check_retention = field_validator("prompt_cache_retention")(
        _refuse_unless(lambda v: v == "in_memory", "the prefix cache lives in memory (in_memory only)"))
    check_cache_options = field_validator("prompt_cache_options")(
        _refuse_unless(lambda v: False, "no explicit cache breakpoints or lifetimes: prefix caching is automatic"))
    check_moderation = field_validator("moderation")(_refuse_unless(lambda v: False, "no moderation"))
    check_tier = field_validator("service_tier")(
        _refuse_unless(lambda v: v in ("auto", "default"), "one service tier (auto / default)"))

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if isinstance(v, str) and v not in ("auto", "none", "required"):
            raise ValueError("tool_choice must be auto, none, required or {\"type\": \"function\", ...}")
        if isinstance(v, dict) and not (v.get("type") == "function" and isinstance(
                (v.get("function") or {}).get("name"), str)):
            raise ValueError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        for tool in v or ():
            fn = tool.get("function")
            if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError('each tool is {"type": "function", "function": {"name": ..., "parameters": ...}}')
        return v



class TokenSampling(BaseModel):
    """SamplingParams on the wire of POST /engine/generate (all of them but stop, which is applied to text)."""

    model_config = ConfigDict(extra="forbid", **STRICT)

    max_tokens: int | None = Field(default=16, ge=0)  # None: the rest of the engine's context (and KV cache)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = Field(default=None, **SEED)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    # The last resumed_tokens of token_ids are this request's own output from another engine (a migration).
    resumed_tokens: int = Field(default=0, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)
    logit_bias: list[list[float]] = Field(default_factory=list)  # [[token id, bias], ...]
    min_p: float = Field(default=0.0, ge=0, le=1)
    min_tokens: int = Field(default=0, ge=0)
    allowed_token_ids: list[int] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    structured: list[str] | None = None  # [StructuredSpec.kind, .value]

    @field_validator("logit_bias")
    @classmethod
    def _pairs(cls, v):
        if any(len(pair) != 2 or pair[0] != int(pair[0]) for pair in v):
            raise ValueError("logit_bias is a list of [token id, bias] pairs")
        return v

    @field_validator("structured")
    @classmethod
    def _spec(cls, v):
        if v is not None and len(v) != 2:
            raise ValueError("structured is [kind, value]")
        return v

    @classmethod
    def of(cls, p: SamplingParams) -> dict[str, Any]:
        """The wire form (JSON) of p."""
        return {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                "seed": p.seed, "stop_token_ids": list(p.stop_token_ids), "ignore_eos": p.ignore_eos,
                "resumed_tokens": p.resumed_tokens, "presence_penalty": p.presence_penalty,
                "frequency_penalty": p.frequency_penalty, "repetition_penalty": p.repetition_penalty,
                "logit_bias": [list(b) for b in p.logit_bias], "min_p": p.min_p, "min_tokens": p.min_tokens,
                "allowed_token_ids": None if p.allowed_token_ids is None else list(p.allowed_token_ids),
                "logprobs": p.logprobs, "prompt_logprobs": p.prompt_logprobs,
                "structured": None if p.structured is None else [p.structured.kind, p.structured.value]}

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
            resumed_tokens=self.resumed_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=tuple((int(t), float(b)) for t, b in self.logit_bias), min_p=self.min_p,
            min_tokens=self.min_tokens,
            allowed_token_ids=None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
            logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
            structured=None if self.structured is None else StructuredSpec(*self.structured))


class TokenGenerateRequest(BaseModel):
    """The frontend's request: token ids in, a stream of token ids out."""

    model_config = ConfigDict(extra="forbid", **STRICT)

    token_ids: list[int] = Field(min_length=1)
    sampling: TokenSampling = Field(default_factory=TokenSampling)
    request_id: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _offset_within_prompt(self):
        """The resumed tokens are in token_ids after at least one prompt token (a migration resends them).
        (Once the engine made that many random draws before starting: tests/test_http_fuzz.py::
        test_resumed_tokens_beyond_the_prompt_is_400.)"""
        if self.sampling.resumed_tokens >= len(self.token_ids):
            raise ValueError(f"sampling.resumed_tokens ({self.sampling.resumed_tokens}) must be below the number "
                             f"of token_ids ({len(self.token_ids)}): the tokens generated elsewhere are in the prompt")
        return self

    def params(self) -> SamplingParams:
        return self.sampling.params()


def logprobs_wire(entries) -> list | None:
    """TokenLogprob entries as NDJSON: [token_id, logprob, rank, [[id, logprob], ...]] (None stays None)."""
    if entries is None:
        return None
    return [None if e is None else [e.token_id, e.logprob, e.rank, [list(t) for t in e.top]] for e in entries]


def logprobs_from_wire(entries) -> list[TokenLogprob | None] | None:
    if entries is None:
        return None
    return [None if e is None else TokenLogprob(int(e[0]), float(e[1]), int(e[2]),
                                                 tuple((int(i), float(lp)) for i, lp in e[3])) for e in entries]


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


def sse(obj: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


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

"""/tokenize, /detokenize and /version, as vLLM serves them; mounted by the engine's and the frontend's apps.

    POST /tokenize    {"model"?, "prompt", "add_special_tokens"?: true, "return_token_strs"?: false}
                      {"model"?, "messages", "add_generation_prompt"?: true, "add_special_tokens"?: false,
                       "continue_final_message"?, "tools"?, "chat_template_kwargs"?, "return_token_strs"?}
                  ->  {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"model"?, "tokens"} -> {"prompt"}
    GET  /version     {"version": "0.1.0"}

The messages render exactly as the chat routes render them (openai_prompts.chat_text: the same message
checks, tools, tool calls and tool results, chat_template_kwargs). Unknown fields are a 400 naming them
(extra="forbid"); so is a model we do not serve (404, as vLLM).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import Body, FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from understudy import __version__
from understudy.common.api import STRICT, ChatCompletionRequest, error, error_responses, invalid_request
from understudy.common.openai_options import OpenAIOptions
from understudy.common.openai_prompts import chat_text
from understudy.common.openai_requests import FieldError
from understudy.common.tokenizer import Tokenizer

_BODY = ConfigDict(extra="forbid", **STRICT)


class TokenizeCompletion(BaseModel):
    model_config = _BODY
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(BaseModel):
    model_config = _BODY
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template has the special tokens it wants
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class Detokenize(BaseModel):
    model_config = _BODY
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


# /openapi.json's description of the /tokenize body (the route reads a plain object, then one of these)
TOKENIZE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "oneOf": [TokenizeCompletion.model_json_schema(), TokenizeChat.model_json_schema()]}}}}}


def _chat_request(body: TokenizeChat) -> ChatCompletionRequest:
    """The chat request whose prompt /tokenize counts: rendered by the chat routes' own chat_text."""
    return ChatCompletionRequest.model_validate(body.model_dump(include={
        "messages", "add_generation_prompt", "continue_final_message", "tools", "chat_template_kwargs"}))


def add_service_routes(app: FastAPI, tokenizer: Callable[[], Awaitable[Tokenizer]],
                       options: Callable[[], OpenAIOptions], max_model_len: Callable[[], int | None]) -> None:
    """`tokenizer`: awaits the tokenizer (the frontend's loads at start-up); `options`: the OpenAI options;
    `max_model_len`: the context length (the frontend's may come from its engines)."""

    def unknown_model(name: str | None):
        if options().serves(name):
            return None
        return error(404, f"The model `{name}` does not exist.", type_="not_found_error", param="model")

    @app.post("/tokenize", responses=error_responses(400, 404, 413), openapi_extra=TOKENIZE_BODY)
    async def tokenize(raw: dict[str, Any] = Body()):
        try:  # which body: the one with messages is a chat's (read by hand: a union's errors name both)
            body = (TokenizeChat if "messages" in raw else TokenizeCompletion).model_validate(raw)
        except ValidationError as e:
            return invalid_request([{**err, "loc": ("body", *err["loc"])} for err in e.errors()])
        if (refused := unknown_model(body.model)) is not None:
            return refused
        tok = await tokenizer()
        try:
            text = body.prompt if isinstance(body, TokenizeCompletion) else chat_text(tok, _chat_request(body))
        except ValidationError as e:  # the messages or tools as the chat route reads them
            return invalid_request([{**err, "loc": ("body", *err["loc"])} for err in e.errors()])
        except FieldError as e:
            return error(400, str(e), param=e.param)
        ids = tok.encode(text, add_special_tokens=body.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len(), "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [tok.backend.id_to_token(i) for i in ids]
        return out

    @app.post("/detokenize", responses=error_responses(400, 404, 413))
    async def detokenize(body: Detokenize):
        if (refused := unknown_model(body.model)) is not None:
            return refused
        tok = await tokenizer()
        if any(not 0 <= t < tok.vocab_size for t in body.tokens):
            bad = next(t for t in body.tokens if not 0 <= t < tok.vocab_size)
            return error(400, f"token id {bad} is outside the vocabulary (0..{tok.vocab_size - 1})", param="tokens")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/version")
    async def version():
        return {"version": __version__}

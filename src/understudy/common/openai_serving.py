"""The choices and the answer of the OpenAI routes, shared by the engine and the frontend: the tokens of each
choice become text, logprobs, tool calls and reasoning, and the choices become one answer (a JSON body or
server-sent events). Torch-free. The request fields are openai_requests.py's, the prompts openai_prompts.py's,
the logprob bodies openai_logprobs.py's.

The engine and the frontend differ only in where tokens come from: each hands `Answer.start` a `Source`,
a function of a Choice that yields `Piece`s (the engine reads its own engine, the frontend the NDJSON of
POST /engine/generate, migrating across engines). So every field is served by the same code in both.

    answer = Answer.completions(body, tokenizer, opts, max_model_len, request_id)  # FieldError -> 400
    await answer.start(source)   # every choice's first piece (the source's refusals raise here)
    body = await answer.whole()  # or: async for event in answer.events(): ...
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

from understudy.common import tools
from understudy.common.api import ChatCompletionRequest, CompletionRequest, sse
from understudy.common.openai_logprobs import (
    TokenTexts, chat_logprobs, completion_logprobs, prompt_logprobs_body)
from understudy.common.openai_options import OpenAIOptions
from understudy.common.openai_prompts import chat_prompt, completion_prompts
from understudy.common.openai_requests import check_request, sampling_params, tool_mode_of
from understudy.common.params import SamplingParams, TokenLogprob, choice_seed
from understudy.common.text import StopMatcher
from understudy.common.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Piece:
    """What a token source yields for one choice: the new tokens of a step (and their logprobs)."""

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


# -- one choice ----------------------------------------------------------------------------------------

@dataclass
class Choice:
    """One choice's text-level state: its prompt and params, the text so far, the parsers' state.
    It lives where the text is made (the frontend across migrations), so parsers continue over a move."""

    index: int
    prompt: list[int]
    params: SamplingParams
    first_of_prompt: bool  # counts the prompt in usage (once per prompt, whatever n)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class _Delta:
    """What one piece added to a choice."""

    __slots__ = ("text", "reasoning", "calls", "logprobs", "finish_reason", "first", "ids")

    def __init__(self):
        self.text, self.reasoning, self.calls, self.logprobs = "", "", [], None
        self.finish_reason, self.first, self.ids = None, False, []


def _unfiltered(ids: list[int]) -> list[int]:
    return ids  # the detokenizer skips every special token itself (no parser marker is one)


def _marker_text_ids(tokenizer: Tokenizer, markers: tuple[str, ...]) -> Callable[[list[int]], list[int]]:
    """The ids whose text a choice's parsers read. Where a parser's marker is a special token (Mistral's
    [TOOL_CALLS], Llama 3's <|python_tag|>) the detokenizer must keep special tokens, so the other special
    tokens are dropped from the ids first: the content still has none of them, as with skip_special_tokens."""
    if not markers:
        return _unfiltered
    special = {i: t.content for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    dropped = frozenset(i for i, text in special.items() if text not in markers)
    if len(dropped) == len(special):  # no marker is a special token
        return _unfiltered
    return lambda ids: [t for t in ids if t not in dropped]


class _ChoiceText:
    """Token ids -> text deltas for a choice: detokenizer, stop strings, reasoning and tool-call parsers."""

    def __init__(self, choice: Choice, tokenizer: Tokenizer, tool_mode: str | None, opts: OpenAIOptions,
                 chat: bool):
        self.choice = choice
        self.stops = StopMatcher(choice.params.stop)
        self.tool_mode = tool_mode
        self.tool_parser = tools.ToolCallParser(opts.tool_call_parser) if tool_mode == "auto" else None
        self.reasoning = (tools.ReasoningParser(opts.reasoning_parser, tokenizer.decode(choice.prompt, False))
                          if chat and opts.reasoning_parser else None)
        markers = (self.tool_parser.MARKERS[self.tool_parser.family] if self.tool_parser else ()) + (
            self.reasoning.MARKERS if self.reasoning else ())
        self.text_ids = _marker_text_ids(tokenizer, markers)
        self.detok = IncrementalDetokenizer(tokenizer, self.text_ids(choice.prompt),
                                            skip_special_tokens=self.text_ids is _unfiltered)
        self.constrained_text: list[str] = []  # required / named: the call JSON, parsed at the end
        self.made_calls = False
        self.started = False  # a piece came already (the first one carries the role, the echo)

    def push(self, piece: Piece) -> _Delta:
        c, d = self.choice, _Delta()
        d.first, self.started = not self.started, True
        final = piece.finish_reason is not None
        text = self.detok.push(self.text_ids(piece.token_ids)) + (self.detok.flush() if final else "")
        emit, hit = self.stops.push(text, final)
        d.ids = list(piece.token_ids)
        c.tokens += piece.token_ids
        reason = "stop" if hit else piece.finish_reason
        content = emit
        if self.reasoning is not None:
            d.reasoning, content = self.reasoning.push(content) if content else ("", "")
            if reason is not None:
                more_reasoning, more = self.reasoning.finish()
                d.reasoning, content = d.reasoning + more_reasoning, content + more
        if self.tool_mode == "constrained":
            self.constrained_text.append(content)
            content = ""
            if reason is not None:
                d.calls += self._constrained_calls()
        elif self.tool_parser is not None:
            content, d.calls = self.tool_parser.push(content) if content else ("", [])
            if reason is not None:
                tail, calls = self.tool_parser.finish()
                content, d.calls = content + tail, d.calls + calls
        self.made_calls = self.made_calls or bool(d.calls)
        if reason == "stop" and self.made_calls:
            reason = "tool_calls"
        d.text, d.finish_reason = content, reason
        d.logprobs = piece.logprobs
        return d

    def _constrained_calls(self) -> list:
        text = "".join(self.constrained_text)
        try:
            calls = tools.parse_constrained(text)
        except (ValueError, KeyError, TypeError):  # cut by max_tokens: no complete call
            return []
        return [tools.ToolCallDelta(i, call.id, call.name, call.arguments) for i, call in enumerate(calls)]


# -- the answer ----------------------------------------------------------------------------------------

Source = Callable[[Choice], AsyncIterator[Piece]]


class Answer:
    """All the choices of one request, rendered as an OpenAI completions or chat answer."""

    def __init__(self, chat: bool, model: str, request_id: str, tokenizer: Tokenizer, opts: OpenAIOptions,
                 choices: list[Choice], body, tool_mode: str | None = None):
        self.chat, self.model, self.body, self.opts = chat, model, body, opts
        self.tokenizer, self.choices, self.tool_mode = tokenizer, choices, tool_mode
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.text_of = TokenTexts(tokenizer)
        self.texts = [_ChoiceText(c, tokenizer, tool_mode, opts, chat) for c in choices]
        self.streams: list[AsyncIterator[Piece] | None] = []
        self.firsts: list[Piece] = []
        self.echo = not chat and body.echo
        self.want_logprobs = (body.logprobs if chat else body.logprobs is not None)
        self.offsets = [0] * len(choices)  # completions logprobs: the text offset of each choice's next token

    # -- building --

    @classmethod
    def completions(cls, body: CompletionRequest, tokenizer: Tokenizer, opts: OpenAIOptions,
                    max_model_len: int | None, request_id: str, default_max_tokens: int | None = None) -> "Answer":
        check_request(body)
        prompts = completion_prompts(tokenizer, body)
        choices = []
        for p, prompt in enumerate(prompts):
            params = sampling_params(body, opts, len(prompt), max_model_len, default_max_tokens)
            choices += _n_choices(p * body.n, prompt, params, body.n)
        return cls(False, opts.response_name(body.model), request_id, tokenizer, opts, choices, body)

    @classmethod
    def chat_completions(cls, body: ChatCompletionRequest, tokenizer: Tokenizer, opts: OpenAIOptions,
                         max_model_len: int | None, request_id: str,
                         default_max_tokens: int | None = None) -> "Answer":
        check_request(body)
        mode = tool_mode_of(body, opts)
        prompt = chat_prompt(tokenizer, body)
        params = sampling_params(body, opts, len(prompt), max_model_len, default_max_tokens)
        return cls(True, opts.response_name(body.model), request_id, tokenizer, opts,
                   _n_choices(0, prompt, params, body.n), body, tool_mode=mode)

    # -- running --

    async def start(self, source: Source) -> None:
        """Open every choice's stream and wait for its first piece: a refusal (the source's exception) raises
        here, before anything is answered."""
        self.streams = [source(c) for c in self.choices]
        if len(self.streams) == 1:
            results: list = []
            try:
                results.append(await self.streams[0].__anext__())
            except BaseException as e:  # noqa: BLE001 - re-raised below after closing
                results.append(e)
        else:
            results = await asyncio.gather(*(s.__anext__() for s in self.streams), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.aclose()
            real = [e for e in failed if not isinstance(e, StopAsyncIteration)]
            raise (real or failed)[0]
        self.firsts = results

    async def aclose(self) -> None:
        for i, s in enumerate(self.streams):
            if s is not None:
                self.streams[i] = None
                await s.aclose()

    async def _deltas(self) -> AsyncIterator[tuple[int, _Delta]]:
        """(choice position, delta) as pieces arrive, the choices interleaved."""
        nexts: dict[asyncio.Future, int] = {}
        try:
            for i, piece in enumerate(self.firsts):
                yield i, await self._push(i, piece)
            live = [i for i, c in enumerate(self.choices) if not c.done]
            if len(live) == 1:  # one stream: read it directly
                i = live[0]
                while not self.choices[i].done:
                    yield i, await self._push(i, await self._next(i))
                return
            nexts = {asyncio.ensure_future(self._next(i)): i for i in live}
            while nexts:
                done, _ = await asyncio.wait(nexts, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = nexts.pop(task)
                    yield i, await self._push(i, task.result())
                    if not self.choices[i].done:
                        nexts[asyncio.ensure_future(self._next(i))] = i
        finally:
            for task in nexts:
                task.cancel()
            if nexts:
                await asyncio.wait(nexts)

    async def _next(self, i: int) -> Piece:
        try:
            return await self.streams[i].__anext__()
        except StopAsyncIteration:  # a source that ended without a finish reason
            raise RuntimeError("the token stream ended before its last token") from None

    async def _push(self, i: int, piece: Piece) -> _Delta:
        c = self.choices[i]
        if piece.prompt_logprobs is not None:
            c.prompt_logprobs = piece.prompt_logprobs
        if not c.tokens and piece.cached_tokens:
            c.cached_tokens = piece.cached_tokens
        d = self.texts[i].push(piece)
        c.finish_reason = d.finish_reason
        if c.done and self.streams[i] is not None:  # e.g. a stop string: closing the stream ends the work
            stream, self.streams[i] = self.streams[i], None
            await stream.aclose()
        return d

    # -- rendering --

    def usage(self) -> dict[str, Any]:
        prompt = sum(len(c.prompt) for c in self.choices if c.first_of_prompt)
        completion = sum(len(c.tokens) for c in self.choices)
        cached = sum(c.cached_tokens for c in self.choices if c.first_of_prompt)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _base(self, final: bool) -> dict[str, Any]:
        obj = ("chat.completion" if final else "chat.completion.chunk") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _completion_piece(self, i: int, d: _Delta) -> dict[str, Any]:
        """A completions choice chunk: its text (the echoed prompt first) and its tokens' logprobs."""
        c = self.choices[i]
        text, logprobs = d.text, None
        echo_now = self.echo and d.first
        if echo_now:
            text = self.tokenizer.decode(c.prompt) + text
        if self.want_logprobs:
            ids, entries = list(d.ids), list(d.logprobs or [])
            if echo_now:
                prompt_entries = c.prompt_logprobs or [None] * len(c.prompt)
                ids, entries = c.prompt + ids, list(prompt_entries) + entries
            logprobs, self.offsets[i] = completion_logprobs(entries, ids, self.text_of, self.offsets[i])
        out = {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": d.finish_reason}
        if d.first and c.prompt_logprobs is not None and c.params.prompt_logprobs is not None \
                and self.body.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs_body(c.prompt_logprobs, self.text_of)
        return out

    def _chat_logprobs(self, d: _Delta) -> dict | None:
        if not self.want_logprobs:
            return None
        return {"content": chat_logprobs(d.logprobs or [], self.text_of, self.body.top_logprobs or 0)}

    @staticmethod
    def _call_json(delta) -> dict[str, Any]:
        out: dict[str, Any] = {"index": delta.index}
        if delta.id is not None:
            out["id"], out["type"] = delta.id, "function"
        fn: dict[str, Any] = {}
        if delta.name is not None:
            fn["name"] = delta.name
        fn["arguments"] = delta.arguments_delta or ""
        out["function"] = fn
        return out

    async def events(self, include_usage: bool | None = None) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer: chunks with each choice's index, then usage, [DONE]."""
        include_usage = self.body.include_usage if include_usage is None else include_usage
        async for i, d in self._deltas():
            c = self.choices[i]
            if self.chat:
                delta: dict[str, Any] = {}
                if d.first:
                    delta["role"] = "assistant"
                if d.text:
                    delta["content"] = d.text
                if d.reasoning:
                    delta["reasoning_content"] = d.reasoning
                if d.calls:
                    delta["tool_calls"] = [self._call_json(x) for x in d.calls]
                lp = self._chat_logprobs(d)
                if not delta and d.finish_reason is None and not (lp and lp["content"]):
                    continue
                choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
                if d.first and i == 0:  # the answer's prompt logprobs, on its first chunk (choice 0's role)
                    yield sse({**self._base(False), "choices": [choice], **self._chat_prompt_logprobs()})
                    continue
            else:
                choice = self._completion_piece(i, d)
                if not choice["text"] and d.finish_reason is None and not choice["logprobs"] \
                        and "prompt_logprobs" not in choice:
                    continue
            yield sse({**self._base(False), "choices": [choice]})
        if include_usage:
            yield sse({**self._base(False), "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"

    async def whole(self) -> dict[str, Any]:
        """The whole (non-streamed) answer."""
        parts: list[dict[str, Any]] = [{"text": [], "reasoning": [], "calls": {}, "logprobs": None}
                                       for _ in self.choices]
        async for i, d in self._deltas():
            part = parts[i]
            if self.chat:
                part["text"].append(d.text)
                part["reasoning"].append(d.reasoning)
                for x in d.calls:
                    call = part["calls"].setdefault(x.index, {"id": None, "type": "function",
                                                              "function": {"name": "", "arguments": ""}})
                    call["id"] = call["id"] or x.id
                    call["function"]["name"] += x.name or ""
                    call["function"]["arguments"] += x.arguments_delta or ""
                if self.want_logprobs:
                    part["logprobs"] = part["logprobs"] or {"content": []}
                    part["logprobs"]["content"] += self._chat_logprobs(d)["content"]
            else:
                chunk = self._completion_piece(i, d)
                part["text"].append(chunk["text"])
                if "prompt_logprobs" in chunk:
                    part["prompt_logprobs"] = chunk["prompt_logprobs"]
                if chunk["logprobs"] is not None:
                    lp = part["logprobs"] = part["logprobs"] or {k: [] for k in chunk["logprobs"]}
                    for k, v in chunk["logprobs"].items():
                        lp[k] += v
        choices = []
        for c, part in zip(self.choices, parts):
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": "".join(part["text"]) or None}
                reasoning = "".join(part["reasoning"])
                if reasoning:
                    message["reasoning_content"] = reasoning
                if part["calls"]:
                    message["tool_calls"] = [part["calls"][k] for k in sorted(part["calls"])]
                elif message["content"] is None:
                    message["content"] = ""
                choices.append({"index": c.index, "message": message, "logprobs": part["logprobs"],
                                "finish_reason": c.finish_reason})
            else:
                choice = {"index": c.index, "text": "".join(part["text"]), "logprobs": part["logprobs"],
                          "finish_reason": c.finish_reason}
                if "prompt_logprobs" in part:
                    choice["prompt_logprobs"] = part["prompt_logprobs"]
                choices.append(choice)
        return {**self._base(True), "choices": choices, "usage": self.usage(),
                **(self._chat_prompt_logprobs() if self.chat else {})}

    def _chat_prompt_logprobs(self) -> dict[str, Any]:
        """{"prompt_logprobs": ...} when asked: a chat answer carries them once (the choices share the prompt)."""
        if self.body.prompt_logprobs is None or self.choices[0].prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": prompt_logprobs_body(self.choices[0].prompt_logprobs, self.text_of)}


def _n_choices(first_index: int, prompt: list[int], params: SamplingParams, n: int) -> list[Choice]:
    """Choices first_index .. first_index + n - 1 of one prompt: choice j samples with choice_seed(seed, j)."""
    out = []
    for j in range(n):
        seed = params.seed if params.seed is None else choice_seed(params.seed, j)
        out.append(Choice(first_index + j, prompt, replace(params, seed=seed), first_of_prompt=j == 0))
    return out

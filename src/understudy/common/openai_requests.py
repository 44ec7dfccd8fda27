"""OpenAI request bodies -> what the engine runs: the cross-field checks, the structured-output and tool-choice
fields -> a StructuredSpec, every sampling field -> SamplingParams (generation_config.json's defaults filling the
omitted ones), and the log line naming ignored fields. Each refusal is a FieldError (an OpenAI-style 400)."""

from __future__ import annotations

import json
import logging

from understudy.common import tools
from understudy.common.api import ChatCompletionRequest, CompletionRequest
from understudy.common.openai_options import OpenAIOptions
from understudy.common.params import SamplingParams, StructuredSpec
from understudy.logs import log

logger = logging.getLogger("understudy.openai")


class FieldError(ValueError):
    """A request field we cannot serve as asked: an OpenAI-style 400 naming it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# -- request fields -> SamplingParams ------------------------------------------------------------------

def _structured(body) -> tuple[str, StructuredSpec] | None:
    """(the field that asked, the spec) for the structured-output fields; several at once is a 400."""
    asked: list[tuple[str, StructuredSpec | None]] = []
    rf = body.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            asked.append(("response_format", StructuredSpec("json_object", "")))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise FieldError("response_format", "response_format json_schema needs json_schema.schema (an object)")
            asked.append(("response_format", StructuredSpec("json_schema", json.dumps(schema))))
        elif kind != "text":
            raise FieldError("response_format", "response_format.type must be text, json_object or json_schema")
    if body.guided_json is not None:
        schema = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        asked.append(("guided_json", StructuredSpec("json_schema", schema)))
    if body.guided_regex is not None:
        asked.append(("guided_regex", StructuredSpec("regex", body.guided_regex)))
    if body.guided_choice is not None:
        asked.append(("guided_choice", StructuredSpec("choice", json.dumps(body.guided_choice))))
    if body.guided_grammar is not None:
        asked.append(("guided_grammar", StructuredSpec("grammar", body.guided_grammar)))
    so = body.structured_outputs
    if so is not None:
        kinds = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                 "json_object": "json_object"}
        given = [k for k in so if so[k] is not None and k in kinds]
        unknown = sorted(set(so) - set(kinds))
        if unknown:
            raise FieldError("structured_outputs", f"structured_outputs: unsupported keys {', '.join(unknown)}")
        if len(given) != 1:
            raise FieldError("structured_outputs", "structured_outputs needs exactly one of json, regex, choice, "
                                                   "grammar, json_object")
        key, value = given[0], so[given[0]]
        if key == "json_object":
            spec = StructuredSpec("json_object", "")
        elif key in ("json", "choice"):
            spec = StructuredSpec(kinds[key], value if isinstance(value, str) else json.dumps(value))
        else:
            if not isinstance(value, str):
                raise FieldError("structured_outputs", f"structured_outputs.{key} must be a string")
            spec = StructuredSpec(kinds[key], value)
        asked.append(("structured_outputs", spec))
    if len(asked) > 1:
        raise FieldError(asked[1][0], f"only one structured output at a time: {asked[0][0]} and {asked[1][0]} given")
    return (asked[0][0], asked[0][1]) if asked else None


def tool_mode_of(body: ChatCompletionRequest, opts: OpenAIOptions) -> str | None:
    """How the output is read for tool calls: None (no tools), "none", "auto" (a parser finds calls in
    free text) or "constrained" (required / named: the grammar makes the output the call JSON)."""
    if not body.tools:
        return None
    choice = body.tool_choice or "auto"
    if choice == "none":
        return "none"
    if choice == "auto":
        if not (opts.enable_auto_tool_choice and opts.tool_call_parser):
            raise FieldError("tool_choice", 'tool_choice "auto" needs the server started with '
                                            "--enable-auto-tool-choice and --tool-call-parser")
        return "auto"
    return "constrained"


def check_request(body) -> None:
    """Cross-field checks (each names the field): pydantic's field validators did the rest."""
    if isinstance(body, CompletionRequest):
        if body.best_of is not None and body.best_of != body.n:
            raise FieldError("best_of", "best_of above n is not supported: send n candidates and rank them")
        if body.max_tokens == 0 and not (body.echo or body.prompt_logprobs is not None):
            raise FieldError("max_tokens", "max_tokens 0 (score the prompt) needs echo or prompt_logprobs")
        if body.stream and body.max_tokens == 0:
            raise FieldError("max_tokens", "max_tokens 0 cannot be streamed")
    else:
        if body.top_logprobs is not None and not body.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        names = {t["function"]["name"] for t in body.tools or ()}
        if isinstance(body.tool_choice, dict) and body.tool_choice["function"]["name"] not in names:
            raise FieldError("tool_choice", f"tool_choice names {body.tool_choice['function']['name']!r}, "
                                            f"which is not in tools")
        if body.tool_choice == "required" and not body.tools:
            raise FieldError("tool_choice", "tool_choice required needs tools")


def sampling_params(body, opts: OpenAIOptions, prompt_len: int, max_model_len: int | None,
                    default_max_tokens: int | None = None) -> SamplingParams:
    """The request's SamplingParams (choice 0's; Answer derives the others' seeds). generation_config.json's
    defaults (and --seed) fill only the fields the request omitted; an omitted max_tokens is the rest of the
    context (at most --default-max-tokens when that is set)."""
    given = body.model_fields_set

    def value(name: str):
        if name not in given and name in opts.sampling_defaults:
            return opts.sampling_defaults[name]
        return getattr(body, name)

    chat = isinstance(body, ChatCompletionRequest)
    max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None and "max_tokens" in opts.sampling_defaults and not (
            chat and "max_completion_tokens" in given):
        max_tokens = opts.sampling_defaults["max_tokens"]
    if max_tokens is None:  # OpenAI's and vLLM's default: the rest of the context (None: the engine's, which
        # knows its KV cache too; the frontend sends None)
        rest = max(1, max_model_len - prompt_len) if max_model_len else None
        candidates = [m for m in (rest, default_max_tokens) if m is not None]
        max_tokens = min(candidates) if candidates else None
    if chat:
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = body.prompt_logprobs
    else:
        logprobs = body.logprobs
        prompt_logprobs = body.prompt_logprobs
        if body.echo and (body.logprobs is not None or body.max_tokens == 0):  # the echoed prompt's logprobs
            prompt_logprobs = max(prompt_logprobs or 0, body.logprobs or 0)
    structured = _structured(body)
    spec = structured[1] if structured else None
    if chat and tool_mode_of(body, opts) == "constrained":
        if spec is not None:
            raise FieldError("tool_choice", f"a required or named tool_choice cannot be combined with {structured[0]}")
        try:
            spec = tools.tool_call_spec(body.tools, body.tool_choice, body.parallel_tool_calls)
        except ValueError as e:
            raise FieldError("tool_choice", str(e)) from None
    bias = tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items())
    return SamplingParams(
        max_tokens=max_tokens, temperature=value("temperature"), top_p=value("top_p"), top_k=value("top_k"),
        seed=value("seed"), stop_token_ids=tuple(body.stop_token_ids), ignore_eos=body.ignore_eos,
        stop=tuple(body.stop or ()), presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=value("repetition_penalty"),
        logit_bias=bias, min_p=value("min_p"), min_tokens=body.min_tokens,
        allowed_token_ids=None if body.allowed_token_ids is None else tuple(body.allowed_token_ids),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, structured=spec)


def log_ignored(body, request_id: str) -> None:
    """One line naming the fields no schema we serve has (they are ignored, as vLLM does)."""
    if body.ignored_fields:
        log(logger, "ignored_fields", logging.WARNING, request_id=request_id, fields=body.ignored_fields)

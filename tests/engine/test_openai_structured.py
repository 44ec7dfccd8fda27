"""Structured output and tools through the official openai client against a real engine process (a tiny
random Llama on the CPU, so only the grammar makes the output valid): response_format json_schema /
json_object, vLLM's guided_* and structured_outputs, tool_choice required / named, and the chat history's
tool calls and tool results in the template."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from understudy.common.api import ChatCompletionRequest
from understudy.common.openai_prompts import chat_prompt
from understudy.common.tokenizer import Tokenizer
from tests.helpers.openai_tiny import MISTRAL_CALL, MISTRAL_GRAMMAR, TinyServer, write_mistral_model

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                                           "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = TinyServer(tiny_model_dir)
    yield s
    s.close()


def _chat(server, **kw):
    return server.client.chat.completions.create(**{"model": server.model, "messages": ASK, "max_tokens": 60,
                                                    "temperature": 0, **kw})


def test_json_schema_output_validates(server):
    r = _chat(server, response_format={"type": "json_schema",
                                       "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}})
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    # the same through vLLM's spelling, sampled
    r = server.client.completions.create(model=server.model, prompt="Weather:", max_tokens=60, temperature=0.8,
                                         seed=1, extra_body={"structured_outputs": {"json": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_guided_choice_regex_and_json_object(server):
    r = server.client.completions.create(model=server.model, prompt="Pick:", max_tokens=10, temperature=0,
                                         extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")
    r = server.client.completions.create(model=server.model, prompt="Code:", max_tokens=10, temperature=0,
                                         extra_body={"guided_regex": "[A-C][0-9]{3}"})
    assert len(r.choices[0].text) == 4 and r.choices[0].text[0] in "ABC" and r.choices[0].text[1:].isdigit()
    r = _chat(server, response_format={"type": "json_object"}, max_tokens=40)
    if r.choices[0].finish_reason == "stop":  # a random model may not close the object within 40 tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_two_structured_fields_at_once_are_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=server.model, prompt="x", max_tokens=2,
                                         extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    assert e.value.body["param"] in ("guided_regex", "guided_choice")


def test_tool_choice_named_and_required_give_parsed_calls(server):
    r = _chat(server, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    [call] = msg.tool_calls
    assert call.function.name == "get_weather" and call.id and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    r = _chat(server, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    # streamed: the call arrives as deltas with its index, id and name
    deltas = [tc for ch in server.client.chat.completions.create(
        model=server.model, messages=ASK, max_tokens=60, temperature=0, stream=True, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
        if ch.choices for tc in ch.choices[0].delta.tool_calls or ()]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].index == 0
    args = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_auto_tool_choice_needs_a_parser(server):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server, tools=[WEATHER])
    assert e.value.body["param"] == "tool_choice"
    r = _chat(server, tools=[WEATHER], tool_choice="none", max_tokens=3)
    assert r.choices[0].message.tool_calls is None


def test_history_tool_calls_and_results_reach_the_template(tiny_model_dir):
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    body = ChatCompletionRequest.model_validate({"messages": [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "tools": [WEATHER],
        "chat_template_kwargs": {"enable_thinking": False}})
    text = tok.decode(chat_prompt(tok, body), skip_special_tokens=False)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "sunny [call_1]" in text
    assert '"get_weather"' in text.split("<|im_start|>user")[0]  # the tools, before the conversation
    assert text.endswith("<think></think>")  # chat_template_kwargs reached the template


@pytest.fixture(scope="module")
def parsing_server(tiny_model_dir):
    """An engine with the hermes tool-call parser (auto tool choice) and the qwen3 reasoning parser."""
    s = TinyServer(tiny_model_dir, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                   "--reasoning-parser", "qwen3")
    yield s
    s.close()


# What a Qwen model writes when it thinks, then calls a tool; a regex makes the tiny model write exactly it.
THOUGHT_AND_CALL = r'<think>Paris\.</think>\n\n<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>'


def test_auto_tool_calls_and_reasoning_are_parsed_from_the_text(parsing_server):
    s = parsing_server
    kw = dict(model=s.model, messages=ASK, max_tokens=120, temperature=0, tools=[WEATHER],
              extra_body={"guided_regex": THOUGHT_AND_CALL})
    r = s.client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    assert msg.model_extra["reasoning_content"] == "Paris."
    [call] = msg.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert not (msg.content or "").strip()
    # streamed: reasoning deltas, then the call as deltas
    reasoning, calls, finish = "", [], None
    for ch in s.client.chat.completions.create(**kw, stream=True):
        for c in ch.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert reasoning == "Paris." and finish == "tool_calls"
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}


@pytest.fixture(scope="module")
def mistral_server(tmp_path_factory):
    """An engine with the mistral tool-call parser, whose tokenizer has `[TOOL_CALLS]` (id 256) and `</s>`
    (id 257) as special tokens, as Mistral's has."""
    d = write_mistral_model(tmp_path_factory.mktemp("tiny-mistral") / "model")
    s = TinyServer(d, "--enable-auto-tool-choice", "--tool-call-parser", "mistral")
    yield s
    s.close()


def test_a_marker_that_is_a_special_token_reaches_the_tool_parser(mistral_server):
    s = mistral_server
    assert s.tokenizer.encode("[TOOL_CALLS]</s>", add_special_tokens=False) == [256, 257]
    kw = dict(model=s.model, messages=ASK, max_tokens=120, temperature=0, tools=[WEATHER],
              extra_body={"guided_grammar": MISTRAL_GRAMMAR})
    r = s.client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    assert msg.content == "Sure."  # no marker, and the other special token skipped as ever
    [got] = msg.tool_calls
    assert got.function.name == "get_weather" and json.loads(got.function.arguments) == {"city": "Paris"}
    content, calls, finish = "", [], None
    for ch in s.client.chat.completions.create(**kw, stream=True):
        for c in ch.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert content == "Sure." and finish == "tool_calls"
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}
    # without tools no parser reads the text: special tokens are skipped as before
    plain = s.client.chat.completions.create(**{**kw, "tools": None})
    assert plain.choices[0].message.content == "Sure." + MISTRAL_CALL and plain.choices[0].finish_reason == "stop"


def test_tokenize_renders_chat_messages_as_the_chat_route(parsing_server):
    """/tokenize counts the prompt the chat route makes: the same tool-call arguments (a JSON string becomes
    an object for the template), tool results, tools and chat_template_kwargs."""
    s = parsing_server
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    kwargs = {"enable_thinking": False}
    r = s.http.post("/tokenize", json={"messages": messages, "tools": [WEATHER], "chat_template_kwargs": kwargs})
    assert r.status_code == 200, r.text
    text = s.tokenizer.decode(r.json()["tokens"], skip_special_tokens=False)
    assert '"arguments": {"city": "Paris"}}</tool_call>' in text and text.endswith("<think></think>")
    chat = s.client.chat.completions.create(model=s.model, messages=messages, tools=[WEATHER], max_tokens=1,
                                            extra_body={"chat_template_kwargs": kwargs})
    assert chat.usage.prompt_tokens == r.json()["count"]
    # continue_final_message: the prompt ends inside the last message, on both routes
    partial = [*ASK, {"role": "assistant", "content": "The weath"}]
    r = s.http.post("/tokenize", json={"messages": partial, "add_generation_prompt": False,
                                       "continue_final_message": True})
    assert s.tokenizer.decode(r.json()["tokens"]).endswith("<|im_start|>assistant\nThe weath")
    chat = s.client.chat.completions.create(model=s.model, messages=partial, max_tokens=1, extra_body={
        "add_generation_prompt": False, "continue_final_message": True})
    assert chat.usage.prompt_tokens == r.json()["count"]
    # the chat route's message checks too
    bad = s.http.post("/tokenize", json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"

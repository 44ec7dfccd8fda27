"""Tool calls and reasoning in text (common/tools.py): each family's parser on whole outputs and on outputs
streamed one character at a time (tags split anywhere); the schema tool_choice makes validates the calls."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from understudy.common.tools import (ReasoningParser, ToolCall, ToolCallParser, parse_constrained, parse_reasoning,
                                     parse_tool_calls, tool_call_spec)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "today's weather",
           "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                          "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: no arguments

# (family, output, content, [(name, arguments as an object)])
CASES = [
    ("hermes", 'Let me look.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})]),
    ("hermes", '<tool_call>\n{"arguments": {"city": "a \\"<tool_call>\\" }{"}, "name": "get_weather"}\n</tool_call>',
     "", [("get_weather", {"city": 'a "<tool_call>" }{'})]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag.  ", "No tools needed: 2 < 3 and <tool is not a tag.  ",
     []),
    ("hermes", "<tool_call>\nnot json\n</tool_call> ok", "<tool_call>\nnot json\n</tool_call> ok", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}', "",  # EOS before the close tag
     [("get_weather", {"city": "Oslo"})]),
    ("hermes", '<tool_call>\n{"name": "get_time"}\n</tool_call>\nDone. \n', "\nDone.", [("get_time", {})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Rome"}}', "", [("get_weather", {"city": "Rome"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
                    '{"name": "get_time", "parameters": {}}', "",
     [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ("llama3_json", '{"answer": {"a": 1}} is it', '{"answer": {"a": 1}} is it', []),
    ("llama3_json", "The weather is {unknown}.", "The weather is {unknown}.", []),
    ("mistral", 'Sure [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Nice"}}, '
                '{"name": "get_time", "arguments": {}}]', "Sure",
     [("get_weather", {"city": "Nice"}), ("get_time", {})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon", "unit": "F"}[TOOL_CALLS]get_time[ARGS]{}', "",
     [("get_weather", {"city": "Lyon", "unit": "F"}), ("get_time", {})]),
    ("mistral", "[TOOL no, just brackets [1, 2]", "[TOOL no, just brackets [1, 2]", []),
]


def stream(parser: ToolCallParser, text: str, step: int = 1) -> tuple[str, list]:
    pieces = [parser.push(text[i:i + step]) for i in range(0, len(text), step)] + [parser.finish()]
    return "".join(c for c, _ in pieces), [d for _, ds in pieces for d in ds]


def assemble(deltas) -> list[ToolCall]:
    """What a client (e.g. the openai library) builds from the deltas."""
    calls: dict[int, dict] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id and d.id.startswith("call_") and d.name, "a call's first delta carries its id and name"
            calls[d.index] = {"id": d.id, "name": d.name, "arguments": ""}
        else:
            assert d.id is None and d.name is None
        calls[d.index]["arguments"] += d.arguments_delta
    assert sorted(calls) == list(range(len(calls)))
    return [ToolCall(**calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("family, output, content, expected", CASES)
def test_parser_whole_and_streamed(family, output, content, expected):
    whole_content, whole_calls = parse_tool_calls(family, output)
    assert whole_content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole_calls] == expected
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in whole_calls)
    for step in (1, 3, 7):
        parser = ToolCallParser(family)
        streamed_content, deltas = stream(parser, output, step)
        assert streamed_content == content
        calls = assemble(deltas)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
        assert calls == parser.tool_calls


def test_arguments_stream_as_they_are_generated():
    parser = ToolCallParser("hermes")
    content, deltas = parser.push('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert content == "" and deltas[0].name == "get_weather"
    assert "".join(d.arguments_delta for d in deltas) == '{"city": "Pa'
    _, more = parser.push('ris"}}\n</tool_call>')
    assert "".join(d.arguments_delta for d in more) == 'ris"}'


def test_no_piece_of_a_tag_leaks_into_content():
    for family, tag in (("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]")):
        for cut in range(1, len(tag)):
            parser = ToolCallParser(family)
            content, _ = parser.push("hello " + tag[:cut])
            assert content == "hello"  # the space waits too: it may only separate content from a call
            rest, deltas = parser.push(tag[cut:] + ('{"name": "f", "arguments": {}}' if family == "hermes"
                                                    else '[{"name": "f", "arguments": {}}]'))
            assert rest == "" and deltas[0].name == "f"


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown tool call parser 'pythonic'"):
        ToolCallParser("pythonic")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ReasoningParser("o1")


# ----------------------------------------------------------------------------------- tool_choice


def calls_as_output(calls: list[tuple[str, dict]], parallel: bool) -> str:
    objs = [{"name": n, "arguments": a} for n, a in calls]
    return json.dumps(objs if parallel else objs[0])


def test_required_and_named_schemas_validate_the_calls():
    tools = [WEATHER, TIME]
    spec = tool_call_spec(tools, "required", True)
    schema = json.loads(spec.value)
    assert spec.kind == "tool_call"
    good = calls_as_output([("get_weather", {"city": "Paris"}), ("get_time", {})], True)
    jsonschema.validate(json.loads(good), schema)
    assert [(c.name, json.loads(c.arguments)) for c in parse_constrained(good)] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "nope", "arguments": {}}],
                {"name": "get_time", "arguments": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)

    single = json.loads(tool_call_spec(tools, "required", False).value)
    one = calls_as_output([("get_weather", {"city": "Oslo", "unit": "F"})], False)
    jsonschema.validate(json.loads(one), single)
    assert [c.name for c in parse_constrained(one)] == ["get_weather"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([json.loads(one)], single)

    named = json.loads(tool_call_spec(tools, {"type": "function", "function": {"name": "get_time"}}, True).value)
    jsonschema.validate({"name": "get_time", "arguments": {}}, named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"city": "x"}}, named)


def test_auto_and_none_need_no_constraint_and_bad_choices_are_refused():
    assert tool_call_spec([WEATHER], "auto", True) is None
    assert tool_call_spec([WEATHER], "none", True) is None
    assert tool_call_spec([WEATHER], None, True) is None
    with pytest.raises(ValueError, match="tool_choice names function 'nope', which is not in tools"):
        tool_call_spec([WEATHER], {"type": "function", "function": {"name": "nope"}}, True)
    with pytest.raises(ValueError, match="needs at least one tool"):
        tool_call_spec([], "required", True)
    with pytest.raises(ValueError, match=r"tools\[0\] must be"):
        tool_call_spec([{"type": "function"}], "required", True)
    with pytest.raises(ValueError, match="tool_choice must be"):
        tool_call_spec([WEATHER], "always", True)


# ----------------------------------------------------------------------------------- reasoning

REASONING = [
    ("qwen3", "", "<think>\nThe user wants a number.\n</think>\n\n42", "\nThe user wants a number.\n", "42"),
    ("qwen3", "", "42, no thinking", None, "42, no thinking"),  # enable_thinking false: no think block
    ("qwen3", "", "<think>\nstill going", "\nstill going", ""),  # cut by max_tokens
    ("qwen3", "<|im_start|>assistant\n<think>\n", "opened by the prompt</think>\n\nok", "opened by the prompt", "ok"),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "just content", None, "just content"),
    ("deepseek_r1", "", "Let me see. 1 < 2 </thin king</think>Yes.", "Let me see. 1 < 2 </thin king", "Yes."),
    ("deepseek_r1", "", "<think>a</think>b", "a", "b"),
]


@pytest.mark.parametrize("family, prompt, output, reasoning, content", REASONING)
def test_reasoning_whole_and_streamed(family, prompt, output, reasoning, content):
    assert parse_reasoning(family, output, prompt) == (reasoning, content)
    for step in (1, 2, 5):
        parser = ReasoningParser(family, prompt)
        pieces = [parser.push(output[i:i + step]) for i in range(0, len(output), step)] + [parser.finish()]
        assert "".join(r for r, _ in pieces) == (reasoning or "")
        assert "".join(c for _, c in pieces) == content

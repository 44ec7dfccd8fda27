"""Tool calls and reasoning in model output: text-level, torch-free (the engine's HTTP layer and the frontend).

- `tool_call_spec`: tool_choice "required" / a named function -> a structured-output spec (a JSON schema) that
  makes the output exactly the call(s) as JSON; `parse_constrained` reads that output back.
- `ToolCallParser(family)`: tool_choice "auto": the calls a model writes in its own format, found in streamed
  text ("hermes": Qwen2.5 / Qwen3 `<tool_call>{...}</tool_call>`; "llama3_json": Llama 3.x `{"name": ...,
  "parameters": {...}}`, maybe after `<|python_tag|>`; "mistral": `[TOOL_CALLS][{...}, ...]` or
  `[TOOL_CALLS]name[ARGS]{...}`). A call's name goes out once known, its arguments as they are generated.
- `ReasoningParser(family)`: "qwen3" / "deepseek_r1" `<think>...</think>` -> reasoning_content.

Streaming parsers never let a piece of a tag out as content: text that could still become a tag is held back
until the next delta decides it. Text is what the detokenizer produced with special tokens kept where a
family's markers are special tokens (`<|python_tag|>`, `[TOOL_CALLS]`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from understudy.common.params import StructuredSpec


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of tool call `index` in a stream: the first one of a call carries its id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments_delta: str = ""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------------------------- constrained calls


def tool_call_spec(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any = None,
                   parallel_tool_calls: bool = True) -> StructuredSpec | None:
    """The structured-output spec for tool_choice "required" or {"type": "function", "function": {"name":
    ...}}: the output is {"name": ..., "arguments": {...}} (the arguments per the tool's `parameters` schema),
    or a non-empty array of those for "required" with parallel calls. "auto", "none" (and no choice): None.
    `tools` and `tool_choice` are as in the request's JSON. ValueError names the field at fault."""
    functions = _functions(tools or [])
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        if not functions:
            raise ValueError("tool_choice 'required' needs at least one tool in tools")
        one = {"anyOf": [_call_schema(n, p) for n, p in functions.items()]} if len(functions) > 1 \
            else _call_schema(*next(iter(functions.items())))
        schema = {"type": "array", "items": one, "minItems": 1} if parallel_tool_calls else one
        return StructuredSpec("tool_call", json.dumps(schema))
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in functions:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
        return StructuredSpec("tool_call", json.dumps(_call_schema(name, functions[name])))
    raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                     f"{{'name': ...}}}}, got {tool_choice!r}")


def parse_constrained(text: str) -> list[ToolCall]:
    """The calls in the output of a request constrained by tool_call_spec (an object or an array of them)."""
    value = json.loads(text)
    calls = value if isinstance(value, list) else [value]
    return [ToolCall(new_call_id(), c["name"], json.dumps(c.get("arguments", {}), ensure_ascii=False))
            for c in calls]


def _functions(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """name -> parameters schema of each function tool."""
    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn, Mapping) \
                or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        params = fn.get("parameters")
        if params is None:  # OpenAI: leaving parameters out defines a function with no arguments
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out[fn["name"]] = dict(params)
    return out


def _call_schema(name: str, parameters: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


# ----------------------------------------------------------------------------------- reading JSON as it streams

_SPACE = " \t\r\n"


class _ObjectScan:
    """What is known so far of the JSON object a text starts with ("{"), read incrementally: scan() again with
    the same text grown longer reads only what was added (a long argument costs linear time, not quadratic)."""

    def __init__(self, args_keys: tuple[str, ...] = ("arguments", "parameters")):
        self.args_keys = args_keys
        self.end: int | None = None  # index just past its closing brace, once there is one
        self.name: str | None = None  # its top-level "name" string, once complete
        self.args = ""  # its arguments member's text so far (an object or array shows before it is complete)
        self.args_done = False
        self._pos, self._depth, self._in_string, self._escaped = 0, 0, False, False
        self._expect_key, self._key, self._key_start, self._value_start = False, None, 0, None

    def scan(self, text: str) -> "_ObjectScan":
        i = self._pos
        while self.end is None and i < len(text):
            self._char(text, i)
            i += 1
        self._pos = i
        start = self._value_start
        if not self.args_done and self._key in self.args_keys and start is not None and text[start] in "{[":
            self.args = text[start:]
        return self

    def _close_args(self, value: str) -> None:
        if self._key in self.args_keys and self._value_start is not None and not self.args_done:
            self.args, self.args_done = value, True

    def _char(self, text: str, i: int) -> None:
        c = text[i]
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif c == "\\":
                self._escaped = True
            elif c == '"':
                self._in_string = False
                if self._depth == 1 and self._expect_key:
                    self._key, self._expect_key = json.loads(text[self._key_start:i + 1]), False
                elif self._depth == 1 and self._value_start is not None:  # a string value is complete
                    if self._key == "name":
                        self.name = json.loads(text[self._value_start:i + 1])
                    self._close_args(text[self._value_start:i + 1])
            return
        if c in _SPACE or self._depth == 1 and c == ":":
            return
        if self._depth == 1 and c == ",":
            self._close_args(text[self._value_start:i].strip() if self._value_start is not None else "")
            self._expect_key, self._key, self._value_start = True, None, None
            return
        if self._depth == 1 and not self._expect_key and self._key is not None and self._value_start is None \
                and c != "}":
            self._value_start = i
        if c == '"':
            self._in_string, self._key_start = True, i
        elif c in "{[":
            self._depth += 1
            self._expect_key = self._expect_key or self._depth == 1
        elif c in "}]":
            self._depth -= 1
            if self._depth == 1:
                self._close_args(text[self._value_start:i + 1])
            elif self._depth == 0:
                self._close_args(text[self._value_start:i].strip() if self._value_start is not None else "")
                self.end = i + 1


def _held_tail(text: str, tags: Sequence[str]) -> int:
    """How many characters at the end of text could be the start of one of the tags (they wait)."""
    for n in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def _arguments_text(raw: str) -> str:
    """OpenAI's arguments are JSON text; a model that wrote them as a JSON string means the string's content."""
    if raw.startswith('"'):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


class _Call:
    """A call being read: what of it went out in deltas so far."""

    def __init__(self, name: str | None = None, opened_by: str = ""):
        self.id, self.name = new_call_id(), name
        self.index: int | None = None  # given when its name is known and its first delta goes out
        self.sent = ""  # the arguments text sent so far
        self.opened_by = opened_by  # the tag before it: given back with its text if it turns out not a call
        self.scan: _ObjectScan | None = None  # reads its JSON as it grows


# ----------------------------------------------------------------------------------- tool call parsers


class ToolCallParser:
    """Tool calls in a model's streamed text: push() each text delta, finish() once at the end.

    Both return (content_delta, [ToolCallDelta]); `tool_calls` lists the complete calls at the end. Text
    around the calls is content, except whitespace that only separates or trails calls."""

    FAMILIES = ("hermes", "llama3_json", "mistral")
    HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
    PYTHON_TAG = "<|python_tag|>"
    MISTRAL_TAG, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
    # each family's marker texts: where one is a special token, the text the parser reads must keep it
    MARKERS = {"hermes": (HERMES_OPEN, HERMES_CLOSE), "llama3_json": (PYTHON_TAG,),
               "mistral": (MISTRAL_TAG, MISTRAL_ARGS)}

    def __init__(self, family: str):
        if family not in self.FAMILIES:
            raise ValueError(f"unknown tool call parser {family!r} (one of {', '.join(self.FAMILIES)})")
        self.family = family
        self.buffer = ""  # text not decided yet
        self.calls: list[_Call] = []  # the calls that went out (named), in order
        self.current: _Call | None = None  # the call being read
        self.in_calls = False  # inside a family's call section (hermes: a <tool_call> block)
        self.mistral_array: bool | None = None  # [TOOL_CALLS][...] (True) or [TOOL_CALLS]name[ARGS]{...}
        # llama3_json: all the text while it may still turn out not to be calls (None once that is decided)
        self.llama_text: str | None = "" if family == "llama3_json" else None
        self.held_space = ""

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(c.id, c.name, c.sent) for c in self.calls]

    def push(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        if self.llama_text is not None:
            self.llama_text += delta
        self.buffer += delta
        return self._parse(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self._parse(final=True)

    def _parse(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        step = {"hermes": self._hermes, "llama3_json": self._llama3, "mistral": self._mistral}[self.family]
        while step(final, content, deltas):
            pass
        if final:
            if self.current is not None and self.current.index is None:  # never became a call: it was text
                content.append(self.current.opened_by + self.buffer)
            elif not self.in_calls:
                content.append(self.buffer)
            self.buffer, self.current = "", None
        return self._content("".join(content), final), deltas

    def _content(self, text: str, final: bool) -> str:
        """Whitespace at the end of content waits for what follows: more text takes it along, calls drop it
        (streamed or whole, the same content comes out)."""
        text = self.held_space + text
        kept = text.rstrip(_SPACE)
        self.held_space = "" if final else text[len(kept):]
        return text if final and not self.calls else kept

    def _follow(self, call: _Call, body: str, deltas: list[ToolCallDelta], bare_args: bool = False) -> int | None:
        """Read the call's JSON at the start of body (its {"name", "arguments"} object, or with bare_args
        just the arguments object): new deltas; where the object ends, once it has."""
        call.scan = call.scan or _ObjectScan(() if bare_args else ("arguments", "parameters"))
        scan = call.scan.scan(body)
        if bare_args:
            end = scan.end
            name, args, done = None, body[:end] if end else body, end is not None
        else:
            end, name, args, done = scan.end, scan.name, scan.args, scan.args_done
            if end is not None and not done:
                args, done = "{}", True  # {"name": "f"}: a call with no arguments
        call.name = call.name or name
        if call.name is None:
            return end
        if call.index is None:
            call.index = len(self.calls)
            self.calls.append(call)
            deltas.append(ToolCallDelta(call.index, call.id, call.name, ""))
        text = _arguments_text(args) if done else args
        if len(text) > len(call.sent) and text.startswith(call.sent):
            deltas.append(ToolCallDelta(call.index, arguments_delta=text[len(call.sent):]))
            call.sent = text
        return end

    def _text_until(self, tag: str, final: bool, content: list[str]) -> bool:
        """Outside calls: content up to `tag` (True: found, buffer now starts after it)."""
        i = self.buffer.find(tag)
        if i < 0:
            keep = 0 if final else _held_tail(self.buffer, [tag])
            content.append(self.buffer[:len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return False
        content.append(self.buffer[:i])
        self.buffer = self.buffer[i + len(tag):]
        return True

    # -- hermes: text <tool_call>{"name": ..., "arguments": {...}}</tool_call> ... ------------------------
    def _hermes(self, final: bool, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        if not self.in_calls:
            if not self._text_until(self.HERMES_OPEN, final, content):
                return False
            self.in_calls, self.current = True, _Call(opened_by=self.HERMES_OPEN)
            return True
        end_tag = self.buffer.find(self.HERMES_CLOSE)
        body = (self.buffer if end_tag < 0 else self.buffer[:end_tag]).lstrip(_SPACE)
        if body.startswith("{") and self.current is not None:
            self._follow(self.current, body, deltas)
        if end_tag < 0:
            return False
        block = self.buffer[:end_tag + len(self.HERMES_CLOSE)]
        self.buffer = self.buffer[end_tag + len(self.HERMES_CLOSE):]
        if self.current is not None and self.current.index is None:  # the block held no call: it is text
            content.append(self.HERMES_OPEN + block)
        self.in_calls, self.current = False, None
        return True

    # -- llama3_json: [<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}] --------------------------
    def _llama3(self, final: bool, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        if not self.in_calls and self.llama_text is not None:  # is the output calls? its start decides
            head = self.buffer.lstrip(_SPACE)
            if head.startswith(self.PYTHON_TAG):
                head = head[len(self.PYTHON_TAG):].lstrip(_SPACE)
            elif not final and self.PYTHON_TAG.startswith(head):
                return False  # nothing yet, or a piece of the tag
            if not head and not final:
                return False
            if head.startswith("{"):
                self.in_calls, self.buffer = True, head
                return True
            self.llama_text = None  # plain text
        if not self.in_calls:
            content.append(self.buffer)
            self.buffer = ""
            return False
        rest = self.buffer.lstrip(";" + _SPACE)
        if not rest.startswith("{"):
            if rest and self.calls:  # text after the calls
                self.in_calls, self.buffer = False, rest
                return True
            return False
        self.current = self.current or _Call()
        end = self._follow(self.current, rest, deltas)
        if end is None:
            return False
        if self.current.index is None and not self.calls:  # an object, but not a call: all of it is text
            content.append(self.llama_text)
            self.in_calls, self.buffer = False, ""
        else:
            self.buffer = rest[end:]
        self.llama_text = None
        self.current = None
        return True

    # -- mistral: text[TOOL_CALLS][{...}, {...}]  or  text[TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]... ------
    def _mistral(self, final: bool, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        if not self.in_calls:
            if not self._text_until(self.MISTRAL_TAG, final, content):
                return False
            self.in_calls, self.mistral_array = True, None
            return True
        rest = self.buffer.lstrip(_SPACE)
        if self.mistral_array is None:
            if not rest:
                return False
            self.mistral_array = rest.startswith("[")
            self.buffer = rest[1:] if self.mistral_array else rest
            return True
        if self.mistral_array:
            rest = self.buffer.lstrip("," + _SPACE)
            if rest.startswith("]"):
                self.buffer, self.in_calls = rest[1:], False
                return True
            if not rest.startswith("{"):
                return False
            self.current = self.current or _Call()
            end = self._follow(self.current, rest, deltas)
            if end is None:
                return False
            self.buffer, self.current = rest[end:], None
            return True
        if rest.startswith(self.MISTRAL_TAG):
            self.buffer = rest[len(self.MISTRAL_TAG):]
            return True
        if self.current is None:
            j = self.buffer.find(self.MISTRAL_ARGS)
            if j < 0:
                return False
            self.current = _Call(self.buffer[:j].strip())
            self.buffer = self.buffer[j + len(self.MISTRAL_ARGS):]
        body = self.buffer.lstrip(_SPACE)
        if not body.startswith("{"):
            return False
        end = self._follow(self.current, body, deltas, bare_args=True)
        if end is None:
            return False
        self.buffer, self.current = body[end:], None
        return True


def parse_tool_calls(family: str, text: str) -> tuple[str, list[ToolCall]]:
    """A whole output: (content, calls)."""
    parser = ToolCallParser(family)
    content = parser.push(text)[0] + parser.finish()[0]
    return content, parser.tool_calls


# ----------------------------------------------------------------------------------- reasoning


class ReasoningParser:
    """`<think>...</think>` at the start of an output -> reasoning; the rest -> content.

    "qwen3": reasoning only when the output opens with <think> (Qwen3 with enable_thinking false writes no
    think block: all of it is content). "deepseek_r1": the output starts inside the reasoning (R1's template
    opens <think> in the prompt; a <think> written anyway is dropped) and leaves it at </think>. `prompt`: the
    rendered prompt, when known: one that ends inside an open <think> (Qwen3 thinking-2507) starts there too.
    A reasoning the output never closes (max_tokens) is all reasoning."""

    FAMILIES = ("qwen3", "deepseek_r1")
    OPEN, CLOSE = "<think>", "</think>"
    MARKERS = (OPEN, CLOSE)  # as ToolCallParser.MARKERS

    def __init__(self, family: str, prompt: str = ""):
        if family not in self.FAMILIES:
            raise ValueError(f"unknown reasoning parser {family!r} (one of {', '.join(self.FAMILIES)})")
        opened_in_prompt = prompt.rfind(self.OPEN) > prompt.rfind(self.CLOSE)
        self.thinking = family == "deepseek_r1" or opened_in_prompt
        self.reasoned = self.thinking  # whether there was a reasoning part at all
        self.at_start = True  # a <think> at the very start is a marker, not text
        self.after_close = False  # content starts after the blank lines that follow </think>
        self.buffer = ""

    def push(self, delta: str) -> tuple[str, str]:
        """(reasoning_delta, content_delta) for one text delta."""
        self.buffer += delta
        return self._parse(final=False)

    def finish(self) -> tuple[str, str]:
        return self._parse(final=True)

    def _parse(self, final: bool) -> tuple[str, str]:
        reasoning = ""
        if self.at_start:
            head = self.buffer.lstrip(_SPACE)
            if head.startswith(self.OPEN):
                self.buffer, self.thinking, self.reasoned = head[len(self.OPEN):], True, True
            elif not final and self.OPEN.startswith(head):
                return "", ""  # nothing but whitespace, or a piece of <think>, so far
            self.at_start = False
        if self.thinking:
            i = self.buffer.find(self.CLOSE)
            if i < 0:
                keep = 0 if final else _held_tail(self.buffer, [self.CLOSE])
                reasoning, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return reasoning, ""
            reasoning, self.buffer = self.buffer[:i], self.buffer[i + len(self.CLOSE):]
            self.thinking, self.after_close = False, True
        if self.after_close:
            self.buffer = self.buffer.lstrip(_SPACE)
            if not self.buffer:
                return reasoning, ""
            self.after_close = False
        content, self.buffer = self.buffer, ""
        return reasoning, content


def parse_reasoning(family: str, text: str, prompt: str = "") -> tuple[str | None, str]:
    """A whole output: (the reasoning, None when there was none; the content)."""
    parser = ReasoningParser(family, prompt)
    r1, c1 = parser.push(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.reasoned else None), c1 + c2

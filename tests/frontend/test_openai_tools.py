"""Text-level OpenAI serving through the frontend (real processes on the CPU: a memory server, one engine, the
frontend, the official openai client): the frontend detokenizes and parses what the engine sends with its own
tokenizer, so a tool-call marker that is a special token must reach its parser too; and an answer carries the
served name its request used."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers.frontend import BACKEND, Engine, Frontend, ServerProcess
from tests.helpers.openai_tiny import MISTRAL_CALL, MISTRAL_GRAMMAR, write_mistral_model

NAMES = ("tiny", "tiny-alias")
ASK = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    model = write_mistral_model(tmp_path_factory.mktemp("fe-mistral") / "model")
    d = Path(tempfile.mkdtemp(prefix="us-fot-", dir="/tmp"))
    mem = ServerProcess.start(BACKEND, d)
    frontend = Frontend("--model", str(model), "--served-model-name", *NAMES, "--enable-auto-tool-choice",
                        "--tool-call-parser", "mistral")
    engine = None
    try:
        engine = Engine(d, "--model", str(model), "--dtype", "float32", "--served-model-name", *NAMES,
                        register=(frontend.url,))
        engine.wait_serving()
        frontend.wait_ready()
        yield frontend
    finally:
        if engine is not None:
            engine.close()
        frontend.close()
        mem.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_a_special_token_marker_reaches_the_frontends_parser(stack):
    kw = dict(model=NAMES[1], messages=ASK, max_tokens=120, temperature=0, tools=[WEATHER],
              extra_body={"guided_grammar": MISTRAL_GRAMMAR})
    r = stack.client.chat.completions.create(**kw)
    assert r.model == NAMES[1]  # the name the request used, not the first
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "Sure."
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    content, calls, models = "", [], set()
    for ch in stack.client.chat.completions.create(**kw, stream=True):
        models.add(ch.model)
        for c in ch.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
    assert models == {NAMES[1]} and content == "Sure."
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}
    plain = stack.client.chat.completions.create(**{**kw, "model": NAMES[0], "tools": None})
    assert plain.model == NAMES[0] and plain.choices[0].message.content == "Sure." + MISTRAL_CALL

"""Every request field of OpenAI's completions and chat completions is supported or refused by name.

The official `openai` package's request types are walked, so a field OpenAI adds fails here until
common/openai_fields.py (and docs/engine.md's table) says how it is served. Against a real engine process
(a tiny random Llama on the CPU): every refused field is a 400 naming it, a field no schema has is logged as
ignored, and each sampling field changes the output as its spec says.
"""

from __future__ import annotations

import json
import typing

import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from understudy.common import openai_fields
from understudy.common.api import ChatCompletionRequest, CompletionRequest
from tests.helpers.openai_tiny import TinyServer


def _openai_fields(module) -> set[str]:
    names: set[str] = set()
    for typed in (module.CompletionCreateParamsNonStreaming, module.CompletionCreateParamsStreaming):
        names |= set(typed.__required_keys__) | set(typed.__optional_keys__) | set(typing.get_type_hints(typed))
    return names


@pytest.mark.parametrize("module, table, model", [
    (completion_create_params, openai_fields.COMPLETIONS, CompletionRequest),
    (chat_create_params, openai_fields.CHAT, ChatCompletionRequest)], ids=["completions", "chat"])
def test_every_openai_field_is_supported_or_refused(module, table, model):
    missing = _openai_fields(module) - set(table)
    assert not missing, f"OpenAI request fields with no line in common/openai_fields.py: {sorted(missing)}"
    # and every line is a field our request body reads (not an extra that would be logged as ignored)
    assert set(table) <= set(model.model_fields), sorted(set(table) - set(model.model_fields))
    for name, (status, how) in table.items():
        assert status in (openai_fields.SUPPORTED, openai_fields.REFUSED) and how, name


def test_the_docs_carry_the_tables():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    for table in (openai_fields.COMPLETIONS, openai_fields.CHAT):
        for name in table:
            assert f"`{name}`" in doc, name


# -- against a real engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = TinyServer(tiny_model_dir)
    yield s
    s.close()


REFUSED = sorted(openai_fields.REFUSED_EXAMPLES)


@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_field_is_a_400_naming_it(server, name):
    chat = name in openai_fields.CHAT and name not in openai_fields.COMPLETIONS
    body = ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    r = server.http.post("/v1/chat/completions" if chat else "/v1/completions",
                         json={**body, "max_tokens": 2, name: openai_fields.REFUSED_EXAMPLES[name]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == name, r.json()


@pytest.mark.parametrize("name, value", [("store", False), ("service_tier", "auto"), ("modalities", ["text"]),
                                         ("metadata", {}), ("prompt_cache_key", "k"), ("safety_identifier", "u")])
def test_a_value_asking_for_nothing_is_served(server, name, value):
    r = server.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2, name: value})
    assert r.status_code == 200, r.text


def test_an_unknown_field_is_logged_as_ignored(server):
    r = server.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "frobnicate": 3},
                         headers={"X-Request-Id": "ignored-1"})
    assert r.status_code == 200, r.text
    e = server.wait_for(lambda l: '"ignored_fields"' in l and "ignored-1" in l)
    assert e["fields"] == ["frobnicate"]


PROMPT = "Once upon a time"


def _text(server, **kw) -> str:
    r = server.client.completions.create(model=server.model, prompt=PROMPT, temperature=0, **kw)
    return r.choices[0].text


def test_logit_bias_and_allowed_token_ids_pick_the_tokens(server):
    plain = _text(server, max_tokens=4)
    zid = server.tokenizer.encode("Z", add_special_tokens=False)[0]
    assert _text(server, max_tokens=4, logit_bias={str(zid): 100}) == "ZZZZ" != plain
    assert _text(server, max_tokens=3, extra_body={"allowed_token_ids": [zid]}) == "ZZZ"
    for bad in ({"x": 1}, {str(zid): 101}):
        with pytest.raises(openai.BadRequestError) as e:
            _text(server, max_tokens=1, logit_bias=bad)
        assert e.value.body["param"].startswith("logit_bias"), e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        _text(server, max_tokens=1, logit_bias={"100000": 1})
    assert "logit_bias" in e.value.body["message"]


def test_penalties_change_greedy_output(server):
    plain = _text(server, max_tokens=12)
    assert _text(server, max_tokens=12, frequency_penalty=2.0) != plain or len(set(plain)) == len(plain)
    assert _text(server, max_tokens=12, extra_body={"repetition_penalty": 2.0}) != plain


def test_min_tokens_masks_the_stop_tokens(server):
    r = server.http.post("/engine/generate", json={"token_ids": server.tokenizer.encode(PROMPT),
                                                   "sampling": {"max_tokens": 1, "temperature": 0}})
    first = json.loads(r.text.splitlines()[0])["token_ids"][0]  # the greedy first token
    # a stop token that is the greedy first token ends the answer at once, unless min_tokens holds it back
    stopped = server.client.completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=6,
                                               extra_body={"stop_token_ids": [first]})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = server.client.completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=6,
                                            extra_body={"stop_token_ids": [first], "min_tokens": 4})
    assert held.usage.completion_tokens >= 4


def test_omitted_max_tokens_is_the_rest_of_the_context(server):
    prompt_ids = server.tokenizer.encode(PROMPT)
    # the engine checks prompt + max_tokens against its context: the default fills it exactly
    r = server.client.completions.create(model=server.model, prompt=PROMPT, temperature=0,
                                         extra_body={"ignore_eos": True, "stop": ["\n", "a", "e", "o", " "]})
    assert r.choices[0].finish_reason in ("stop", "length")
    assert server.max_model_len - len(prompt_ids) >= r.usage.completion_tokens


def test_seed_gives_the_same_tokens_and_n_choices_differ(server):
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0.8, seed=7)
    a = server.client.completions.create(**kw, n=3)
    b = server.client.completions.create(**kw, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1
    one = server.client.completions.create(**kw)
    assert one.choices[0].text == a.choices[0].text  # choice 0 keeps the request's seed
    assert a.usage.completion_tokens == 3 * 8  # summed over the choices (the tiny model has no EOS)
    assert a.usage.prompt_tokens == len(server.tokenizer.encode(PROMPT))  # the prompt once


# A value of each supported field (valid with max_tokens 1 on the tiny model); the field-specific tests above
# and in test_openai_logprobs.py / test_openai_structured.py check what each does.
SUPPORTED_EXAMPLES = {
    "model": None, "max_tokens": 1, "temperature": 0.5, "top_p": 0.9, "n": 2, "seed": 3, "stop": ["\n"],
    "stream": False, "stream_options": None, "presence_penalty": 0.5, "frequency_penalty": 0.5,
    "logit_bias": {"65": 1.0}, "user": "u", "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
    "min_tokens": 1, "stop_token_ids": [10], "ignore_eos": True, "allowed_token_ids": [65, 66],
    "prompt_logprobs": 1, "response_format": {"type": "text"}, "guided_json": None, "guided_regex": "[ab]",
    "guided_choice": ["a"], "guided_grammar": None, "structured_outputs": None,
    "prompt": "hi", "echo": True, "logprobs": 1, "best_of": 2,
    "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1, "top_logprobs": None,
    "tools": None, "tool_choice": "none", "parallel_tool_calls": False,
    "chat_template_kwargs": {"enable_thinking": False}, "add_generation_prompt": True, "prompt_cache_key": "k",
    "safety_identifier": "s", "service_tier": "auto", "store": False, "metadata": {}, "modalities": ["text"],
    "prompt_cache_retention": "in_memory", "continue_final_message": True,
}
_SUPPORTED = sorted({(table, name) for table, fields in (("completions", openai_fields.COMPLETIONS),
                                                         ("chat", openai_fields.CHAT))
                     for name, (status, _) in fields.items() if status == openai_fields.SUPPORTED})


@pytest.mark.parametrize("endpoint, name", _SUPPORTED, ids=[f"{e}-{n}" for e, n in _SUPPORTED])
def test_a_supported_field_is_read_not_ignored(server, endpoint, name):
    body = ({"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat" else {"prompt": "hi"})
    body["max_tokens"] = 1
    value = True if (endpoint, name) == ("chat", "logprobs") else SUPPORTED_EXAMPLES[name]
    if value is None:  # fields whose example needs the others: a whole request of their own
        value = {"model": server.model, "stream_options": {"include_usage": True},
                 "guided_json": {"type": "boolean"}, "guided_grammar": 'start: "yes" | "no"',
                 "structured_outputs": {"choice": ["x", "y"]}, "top_logprobs": 2,
                 "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}[name]
    extra = {"stream_options": {"stream": True}, "top_logprobs": {"logprobs": True},
             "best_of": {"n": 2}, "tools": {"tool_choice": "none"},
             "continue_final_message": {"add_generation_prompt": False}}.get(name, {})
    body.update({name: value, **extra})
    rid = f"supported-{endpoint}-{name}"
    r = server.http.post(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", json=body,
                         headers={"X-Request-Id": rid})
    assert r.status_code == 200, r.text
    server.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "zz_marker": 1},
                     headers={"X-Request-Id": rid + "-marker"})  # a line that comes after any about rid
    server.wait_for(lambda l: '"ignored_fields"' in l and rid + "-marker" in l)
    assert not [l for l in server.proc.lines if '"ignored_fields"' in l and f'"{rid}"' in l]

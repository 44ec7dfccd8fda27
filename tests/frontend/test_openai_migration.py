"""OpenAI fields through the frontend, across a SIGKILL of the engine serving them: real processes on the CPU
(a tiny random Llama; node A: a memory server, engine A1 active and A2 its shadow), the official openai client.

A seeded temperature-0.8 request with n = 2 and logprobs, and a seeded chat stream with a stop string, a
penalty and min_tokens, are streamed while A1 is SIGKILLed: each choice migrates on its own to A2 and the answers equal the
undisturbed run's, token for token, with each token's logprob sent once."""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest

from tests.helpers.frontend import BACKEND, Engine, Frontend, ServerProcess, is_event

MAX_TOKENS = 200  # long enough that the kill lands mid-stream (asserted: they still run on A1)
FEW = 3  # chunks each stream has before the kill


@pytest.fixture(scope="module")
def node(tiny_model_dir):
    d = Path(tempfile.mkdtemp(prefix="us-fom-", dir="/tmp"))
    mem = ServerProcess.start(BACKEND, d)
    frontend = Frontend("--model", str(tiny_model_dir))
    engines = []
    try:
        model = ["--model", str(tiny_model_dir), "--dtype", "float32", "--max-model-len", "1024"]
        a1 = Engine(d, *model, "--role", "primary", register=(frontend.url,))
        engines.append(a1)
        a1.wait_for(is_event("weights_ready"), timeout=240)  # it holds node A's failover lock by now
        a2 = Engine(d, *model, "--role", "shadow", register=(frontend.url,))
        engines.append(a2)
        for e in engines:
            e.wait_serving()
        a2.wait_for(is_event("waiting_for_failover_lock"))
        for e in engines:
            e.wait_for(is_event("registered"))
        frontend.wait_ready()
        yield frontend, a1, a2
    finally:
        for e in engines:
            e.close()
        frontend.close()
        mem.stop()
        shutil.rmtree(d, ignore_errors=True)


COMPLETION = dict(prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0.8, seed=11, n=2, logprobs=1)
CHAT = dict(messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=MAX_TOKENS, temperature=0.8,
            seed=5, frequency_penalty=0.5, stop=["zz"], extra_body={"min_tokens": 150})  # counted from the start


def _completion_stream(client, model, chunks_seen: threading.Event | None = None):
    texts: dict[int, str] = {}
    logprobs: dict[int, list[float]] = {}
    finish: dict[int, str] = {}
    count = 0
    for ch in client.completions.create(model=model, stream=True, **COMPLETION):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs if c.logprobs else [])
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        count += 1
        if chunks_seen is not None and count == FEW * 2:
            chunks_seen.set()
    return texts, logprobs, finish


def _chat_stream(client, model):
    text, finish = "", None
    for ch in client.chat.completions.create(model=model, stream=True, **CHAT):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    return text, finish


def test_n_choices_and_a_seeded_chat_stream_migrate_exactly(node):
    frontend, a1, a2 = node
    client, model = frontend.client, a1.model
    want_completion = _completion_stream(client, model)
    want_chat = _chat_stream(client, model)
    assert set(want_completion[0]) == {0, 1} and want_completion[0][0] != want_completion[0][1]

    got: dict[str, object] = {}
    seen = threading.Event()
    chat_thread = threading.Thread(target=lambda: got.update(chat=_chat_stream(client, model)))
    completion_thread = threading.Thread(target=lambda: got.update(completion=_completion_stream(client, model,
                                                                                                 seen)))
    chat_thread.start()
    completion_thread.start()
    assert seen.wait(120), "the stream did not start"
    assert a1.health()["running"] >= 2  # both choices (and the chat) are still running on A1
    a1.kill(signal.SIGKILL)
    completion_thread.join(300)
    chat_thread.join(300)

    texts, logprobs, finish = got["completion"]
    assert texts == want_completion[0]  # each choice continued exactly where it broke
    assert {i: len(v) for i, v in logprobs.items()} == {i: len(v) for i, v in want_completion[1].items()}
    assert all(abs(a - b) < 1e-3 for i in logprobs for a, b in zip(logprobs[i], want_completion[1][i]))
    assert finish == want_completion[2]
    assert got["chat"] == want_chat
    moves = frontend.events("migrating")
    assert len(moves) >= 2 and all(m["target"] == a2.id for m in moves), moves
    frontend.assert_clean_log()

"""`understudy serve` end to end: real engine processes over HTTP, on the CPU, with the official openai client.

One memory server for the module; engine A serves most tests. Engine B is started after A has been
SIGKILLed, against the same memory server: it imports A's weights and adopts A's KV pool (the pool has
one exclusive owner, so B could not take it while A lived). B runs with --max-num-seqs 1 --max-waiting 1
for the load-shedding test and is SIGTERMed mid-stream at the end.

The tests run in file order (A's tests, then B's). Each engine start costs seconds, hence the module
fixtures. Generated token counts are kept small: SmolLM2-135M makes ~10-20 tokens/s on a CPU core.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from understudy.common.auth import admin_headers

from tests.helpers.procs import ServerProcess, free_port, serve_process

BACKEND = "host"  # CPU by design (UNDERSTUDY_TEST_BACKEND does not apply): the sizes below assume float32
PARIS_PROMPT = "The capital of France is"
PARIS_IDS = [504, 3575, 282, 4649, 314]  # SmolLM2's token ids of PARIS_PROMPT
PARIS_TOKENS = 8
KV_MEMORY = "16MiB"  # 22 blocks of 16 tokens (352 tokens) in float32 on the CPU
MAX_MODEL_LEN = 512  # above the KV capacity, so "does not fit the KV cache" and "too long" are distinct
MAX_REQUEST_BYTES = 32768
ENGINE_ARGS = ["--kv-cache-memory", KV_MEMORY, "--max-model-len", str(MAX_MODEL_LEN),
               "--max-request-bytes", str(MAX_REQUEST_BYTES)]
# One intra-op thread: on a small shared CPU box, torch's spinning OpenMP threads slow a step down up to
# 40x whenever another process competes for a core; one thread is as fast here and steady.
ENGINE_ENV = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
LONG_TEXT = ("Once upon a time, in a quiet village by the sea, there lived an old fisherman who mended his nets "
             "every morning and told stories to the children every evening about storms, whales and lighthouses.")


class Engine:
    """An `understudy serve` process with JSON logs on stderr, and clients for it."""

    def __init__(self, socket_dir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = serve_process(socket_dir, self.port, *extra, env=ENGINE_ENV, backend=BACKEND)

    def wait_ready(self) -> "Engine":
        self.serving = json.loads(self.proc.wait_line(lambda l: '"event": "serving"' in l, timeout=180))
        self.model = self.serving["model"]
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=self.url, timeout=60, headers=admin_headers())
        return self

    def event(self, name: str) -> dict:
        [e] = [json.loads(l) for l in self.proc.lines if f'"event": "{name}"' in l]
        return e

    def health(self) -> dict:
        r = self.http.get("/health")
        assert r.status_code == 200, r.text
        return r.json()

    def metrics(self) -> dict[str, float]:
        r = self.http.get("/metrics")
        assert r.status_code == 200
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def wait_idle(self, deadline_s: float = 15.0) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits and no KV block is in use (the idle value, 0)."""
        end = time.monotonic() + deadline_s
        while True:
            m = self.metrics()
            if (m["understudy_engine_running_requests"], m["understudy_engine_waiting_requests"],
                    m["understudy_engine_kv_cache_usage"]) == (0, 0, 0):
                return m
            assert time.monotonic() < end, f"engine still busy after {deadline_s}s: {self.health()}"
            time.sleep(0.05)

    def assert_clean_log(self) -> None:
        bad = [l for l in self.proc.lines if "Traceback" in l or "Exception in ASGI" in l or '"error"' in l]
        assert not bad, "engine logged errors:\n" + "\n".join(self.proc.lines[-60:])

    def close(self) -> None:
        if self.proc.proc.poll() is None:
            self.proc.kill(signal.SIGKILL)
        for c in ("client", "http"):
            if hasattr(self, c):
                getattr(self, c).close()


def requests_total(m: dict[str, float], outcome: str, endpoint: str = "completions") -> float:
    return m.get(f'understudy_engine_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}}', 0.0)


def ndjson(r: httpx.Response) -> list[dict]:
    return [json.loads(l) for l in r.text.splitlines() if l]


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(_tokenizer_future):
    return _tokenizer_future.result(timeout=120)


@pytest.fixture(scope="module")
def mem():
    d = Path(tempfile.mkdtemp(prefix="us-http-", dir="/tmp"))  # short: unix socket paths are limited
    srv = ServerProcess.start(BACKEND, d)
    srv.dir = d
    yield srv
    srv.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def engine_a(_tokenizer_future, mem):
    eng = Engine(mem.dir, *ENGINE_ARGS)
    try:
        yield eng.wait_ready()
    finally:
        eng.close()


@pytest.fixture(scope="module")
def paris(engine_a):
    """Engine A's greedy completion of PARIS_PROMPT: the reference several tests compare with."""
    return engine_a.client.completions.create(model=engine_a.model, prompt=PARIS_PROMPT,
                                              max_tokens=PARIS_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def engine_b(mem, engine_a, paris):
    """Engine A SIGKILLed, then a second engine against the same memory server."""
    engine_a.proc.kill(signal.SIGKILL)
    eng = Engine(mem.dir, *ENGINE_ARGS, "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        yield eng.wait_ready()
    finally:
        eng.close()


# -- engine A: the OpenAI API ----------------------------------------------------------------------

def test_health_live_and_models(engine_a):
    assert engine_a.http.get("/live").json() == {"status": "alive"}
    h = engine_a.health()
    assert h["status"] == "ok" and h["state"] == "ACTIVE" and h["routable"] is True
    assert (h["weights"], h["kv_adopted"]) == ("published", False)  # the first engine of a fresh service
    assert (h["running"], h["waiting"], h["kv_cache_usage"], h["kv_blocks"]) == (0, 0, 0, 22)
    models = engine_a.client.models.list().data
    assert [m.id for m in models] == [engine_a.model] and "SmolLM2" in engine_a.model
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_completion_greedy_paris_usage_and_length(engine_a, paris):
    [choice] = paris.choices
    assert "Paris" in choice.text
    assert choice.finish_reason == "length"  # greedy: " Paris.\n\nThe answer is..." has no EOS early
    u = paris.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (5, PARIS_TOKENS, 5 + PARIS_TOKENS)
    # The prompt as token ids gives the same answer.
    again = engine_a.client.completions.create(model=engine_a.model, prompt=PARIS_IDS, max_tokens=PARIS_TOKENS,
                                               temperature=0)
    assert again.choices[0].text == choice.text


def test_streaming_completion_matches_and_reports_usage(engine_a, paris):
    chunks = list(engine_a.client.completions.create(
        model=engine_a.model, prompt=PARIS_PROMPT, max_tokens=PARIS_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks
    assert len(text_chunks) > 1  # really streamed
    assert "".join(c.choices[0].text for c in text_chunks) == paris.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == 5 and usage_chunk.usage.completion_tokens == PARIS_TOKENS
    assert usage_chunk.usage.total_tokens == 5 + PARIS_TOKENS


def test_chat_completions_streaming_and_not(engine_a):
    ask = dict(model=engine_a.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
               max_tokens=10, temperature=0)
    r = engine_a.client.chat.completions.create(**ask)
    [choice] = r.choices
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 20 and 0 < r.usage.completion_tokens <= 10  # the system prompt is templated in
    chunks = list(engine_a.client.chat.completions.create(**ask, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_max_completion_tokens_gives_length(engine_a):
    r = engine_a.client.chat.completions.create(
        model=engine_a.model, messages=[{"role": "user", "content": "Tell me a long story."}],
        max_completion_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_stop_strings_cut_before_the_stop(engine_a, paris):
    ref = paris.choices[0].text  # " Paris.\n\nThe answer is..."
    assert "." in ref and "The ans" in ref
    before = engine_a.metrics()
    # Non-streaming; the earliest stop string wins.
    r = engine_a.client.completions.create(model=engine_a.model, prompt=PARIS_PROMPT, max_tokens=PARIS_TOKENS,
                                           temperature=0, stop=["ans", "."])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (ref.split(".")[0], "stop")
    # Streaming, same stop: same text; no usage chunk without stream_options.
    chunks = list(engine_a.client.completions.create(model=engine_a.model, prompt=PARIS_PROMPT,
                                                     max_tokens=PARIS_TOKENS, temperature=0, stop=["ans", "."],
                                                     stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.split(".")[0]
    assert chunks[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in chunks)
    # A stop string spanning several tokens (held back while it may still match), given as a plain string.
    chunks = list(engine_a.client.completions.create(model=engine_a.model, prompt=PARIS_PROMPT,
                                                     max_tokens=PARIS_TOKENS, temperature=0, stop="The ans",
                                                     stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == ref.split("The ans")[0] and "The" not in text
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The engine stopped computing for them, and counts them as stopped, not as cancelled.
    after = engine_a.wait_idle()
    assert requests_total(after, "stop") - requests_total(before, "stop") == 3
    assert requests_total(after, "cancelled") == requests_total(before, "cancelled")


def test_seeded_sampling_is_reproducible(engine_a):
    ask = dict(model=engine_a.model, prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=1234,
               extra_body={"ignore_eos": True})
    a = engine_a.client.completions.create(**ask)
    b = engine_a.client.completions.create(**ask)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 10


def test_invalid_payloads_get_openai_errors(engine_a):
    c, m = engine_a.client, engine_a.model

    def bad(call, **kw) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as e:
            call(**kw)
        err = e.value
        assert err.status_code == 400 and err.type == "invalid_request_error" and err.body["message"]
        return err

    post = lambda body, path="/completions": c.post(path, cast_to=object, body=body)  # noqa: E731
    assert "prompt" in bad(post, body={"model": m, "max_tokens": 4}).body["message"]  # missing prompt
    assert bad(c.completions.create, model=m, prompt="x", max_tokens=0).param == "max_tokens"
    assert bad(c.completions.create, model=m, prompt="x", temperature=-1).param == "temperature"
    assert bad(c.completions.create, model=m, prompt="x", n=1000).param == "n"  # above 64 choices
    assert bad(c.completions.create, model=m, prompt="x", suffix="!").param == "suffix"  # refused, not ignored
    bad(c.completions.create, model=m, prompt="x", stop=[f"s{i}" for i in range(17)])
    bad(c.completions.create, model=m, prompt=[])
    bad(c.completions.create, model=m, prompt=[1, 10**7])  # token id outside the vocabulary
    bad(c.completions.create, model=m, prompt=[-1])
    # Wrong types.
    assert bad(post, body={"model": m, "prompt": "x", "max_tokens": "many"}).param == "max_tokens"
    bad(post, body={"model": m, "prompt": 123})
    bad(post, body={"model": m, "prompt": "x", "stream": "sometimes"})
    bad(post, body={"model": m, "messages": "hello"}, path="/chat/completions")
    bad(post, body={"model": m, "messages": []}, path="/chat/completions")
    bad(post, body={"model": m, "messages": [{"role": "wizard", "content": "hi"}]}, path="/chat/completions")
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.status_code == 404 and e.value.param == "model" and "no-such-model" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    # Malformed JSON, and JSON that is not an object.
    for raw in (b'{"prompt": "x", ', b"[1, 2]", b"not json at all"):
        r = engine_a.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["code"] == 400
    # The token-level endpoint validates too.
    for body in ({"token_ids": []}, {"token_ids": [1], "sampling": {"max_tokens": 0}},
                 {"token_ids": [1], "surprise": True}, {"token_ids": [10**7]}, {"token_ids": "1 2 3"}):
        r = engine_a.http.post("/engine/generate", json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (body, r.text)
    assert engine_a.wait_idle(deadline_s=5)


def test_oversized_body_gets_413(engine_a):
    body = json.dumps({"model": engine_a.model, "prompt": "a " * MAX_REQUEST_BYTES, "max_tokens": 1}).encode()
    r = engine_a.http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    # The same without a Content-Length (chunked transfer encoding).
    chunks = (body[i:i + 4096] for i in range(0, len(body), 4096))
    r = engine_a.http.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    # Small chunked bodies still work.
    small = json.dumps({"model": engine_a.model, "prompt": "Hi", "max_tokens": 1}).encode()
    r = engine_a.http.post("/v1/completions", content=iter([small[:10], small[10:]]),
                           headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_requests_that_cannot_fit_get_400_not_a_hang(engine_a):
    c = engine_a.client.with_options(timeout=10)  # a hang would time out instead
    with pytest.raises(openai.BadRequestError, match="KV cache"):
        c.completions.create(model=engine_a.model, prompt=PARIS_PROMPT, max_tokens=400)  # 405 > 352 KV tokens
    with pytest.raises(openai.BadRequestError, match="maximum context length of 512"):
        c.completions.create(model=engine_a.model, prompt=PARIS_PROMPT, max_tokens=600)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.completions.create(model=engine_a.model, prompt="word " * 600, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.chat.completions.create(model=engine_a.model, messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=1000)
    r = engine_a.http.post("/engine/generate", json={"token_ids": PARIS_IDS, "sampling": {"max_tokens": 400}},
                           timeout=10)
    assert r.status_code == 400 and "KV cache" in r.json()["error"]["message"]
    assert engine_a.wait_idle(deadline_s=5)


def test_token_endpoint_matches_text_api(engine_a, paris, tokenizer):
    assert tokenizer.encode(PARIS_PROMPT) == PARIS_IDS
    r = engine_a.http.post("/engine/generate",
                           json={"token_ids": PARIS_IDS, "sampling": {"max_tokens": PARIS_TOKENS, "temperature": 0}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(r)
    assert all(set(l) == {"token_ids", "finish_reason", "prompt_tokens", "cached_tokens", "error"} for l in lines)
    assert [l["finish_reason"] for l in lines] == [None] * (len(lines) - 1) + ["length"]
    assert all(l["prompt_tokens"] == 5 and l["error"] is None for l in lines)
    ids = [t for l in lines for t in l["token_ids"]]
    assert len(ids) == PARIS_TOKENS
    assert tokenizer.decode(ids) == paris.choices[0].text  # the text API's tokens, exactly
    again = ndjson(engine_a.http.post("/engine/generate", json={"token_ids": PARIS_IDS,
                                                                "sampling": {"max_tokens": 3, "temperature": 0}}))
    assert [t for l in again for t in l["token_ids"]] == ids[:3]


def test_repeated_long_prompt_hits_the_prefix_cache(engine_a, tokenizer):
    ids = tokenizer.encode(LONG_TEXT)
    assert len(ids) > 40
    body = {"token_ids": ids, "sampling": {"max_tokens": 4, "temperature": 0}}
    before = engine_a.metrics()
    first = ndjson(engine_a.http.post("/engine/generate", json=body))
    second = ndjson(engine_a.http.post("/engine/generate", json=body))
    assert first[-1]["cached_tokens"] == 0
    cached = second[-1]["cached_tokens"]
    assert cached == (len(ids) - 1) // 16 * 16 > 0  # every full block but the one holding the last token
    assert [t for l in second for t in l["token_ids"]] == [t for l in first for t in l["token_ids"]]
    after = engine_a.metrics()
    assert after["understudy_engine_cached_prompt_tokens_total"] - before[
        "understudy_engine_cached_prompt_tokens_total"] == cached
    # The text API reports it as OpenAI does, and answers the same.
    r = engine_a.client.completions.create(model=engine_a.model, prompt=LONG_TEXT, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.prompt_tokens_details.cached_tokens == cached
    assert r.choices[0].text == tokenizer.decode([t for l in first for t in l["token_ids"]])


def test_stream_disconnect_cancels_engine_work(engine_a):
    before = engine_a.wait_idle()
    stream = engine_a.client.completions.create(model=engine_a.model, prompt="Count: 1, 2, 3,", max_tokens=300,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
    got = [next(stream) for _ in range(3)]
    assert all(c.choices[0].finish_reason is None for c in got)
    assert engine_a.health()["running"] == 1
    stream.close()
    after = engine_a.wait_idle(deadline_s=10)  # 300 tokens would take far longer
    assert requests_total(after, "cancelled") == requests_total(before, "cancelled") + 1
    generated = after["understudy_engine_generation_tokens_total"] - before["understudy_engine_generation_tokens_total"]
    assert 3 <= generated < 150
    engine_a.assert_clean_log()


def test_nonstreaming_client_timeout_cancels_engine_work(engine_a):
    before = engine_a.wait_idle()
    with pytest.raises(openai.APITimeoutError):
        engine_a.client.with_options(timeout=1.5).completions.create(
            model=engine_a.model, prompt="Count: 1, 2, 3,", max_tokens=300, temperature=0,
            extra_body={"ignore_eos": True})
    after = engine_a.wait_idle(deadline_s=10)
    assert requests_total(after, "cancelled") == requests_total(before, "cancelled") + 1
    generated = after["understudy_engine_generation_tokens_total"] - before["understudy_engine_generation_tokens_total"]
    assert 1 <= generated < 150
    engine_a.assert_clean_log()


def test_metrics_and_health(engine_a):
    before = engine_a.metrics()
    engine_a.client.completions.create(model=engine_a.model, prompt="Hi", max_tokens=2, temperature=0,
                                       extra_body={"ignore_eos": True})
    r = engine_a.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = engine_a.metrics()
    delta = lambda key: m[key] - before.get(key, 0.0)  # noqa: E731
    ttft = "understudy_engine_time_to_first_token_seconds"
    assert delta(f"{ttft}_count") == 1 and delta(f"{ttft}_sum") > 0
    assert m[f'{ttft}_bucket{{le="+Inf"}}'] == m[f"{ttft}_count"]
    assert m[f'{ttft}_bucket{{le="10.24"}}'] <= m[f"{ttft}_count"]
    assert delta("understudy_engine_inter_token_latency_seconds_count") == 1
    assert requests_total(m, "length") - requests_total(before, "length") == 1
    assert delta("understudy_engine_generation_tokens_total") == 2
    assert delta("understudy_engine_prompt_tokens_total") == 1  # "Hi" is one token
    assert m["understudy_engine_kv_cache_blocks"] == 22 and m["understudy_engine_kv_cache_usage"] == 0
    assert m["understudy_engine_running_requests"] == 0 and m["understudy_engine_waiting_requests"] == 0
    assert m['understudy_engine_state{state="ACTIVE"}'] == 1 and m['understudy_engine_state{state="DEAD"}'] == 0
    assert "understudy_engine_preemptions" in m
    assert engine_a.http.get("/health").status_code == 200 and engine_a.http.get("/live").status_code == 200
    engine_a.assert_clean_log()


def test_a_kv_budget_that_holds_no_block_is_refused_with_the_reason(mem, engine_a):
    """Bad configuration gets one line that says what to change, not a traceback (a shadow: it takes no lock)."""
    eng = Engine(mem.dir, *ENGINE_ARGS, "--role", "shadow", "--kv-cache-memory", "1KiB")
    try:
        rc = eng.proc.wait(timeout=120)
        out = "\n".join(eng.proc.lines + eng.proc.other)
        assert rc == 1 and "holds no block" in out and "raise --kv-cache-memory" in out, out
        assert "Traceback" not in out, out
    finally:
        eng.close()


# -- engine B: after A's SIGKILL, on the same memory server -----------------------------------------

def test_restarted_engine_imports_weights_and_adopts_kv(mem, engine_b, paris):
    h = engine_b.health()
    assert (h["weights"], h["kv_adopted"], h["state"], h["routable"]) == ("imported", True, "ACTIVE", True)
    ready = engine_b.event("weights_ready")
    assert ready["source"] == "imported"  # mapped from the memory service: no checkpoint read, no copy
    assert not [l for l in engine_b.proc.lines if "weights_published" in l]
    assert engine_b.event("engine_ready")["kv_adopted"] is True
    # The memory service's own account: the weights were allocated and committed once (by A); B got them
    # read-only, and got A's kv allocation instead of a new one.
    assert [e["pool"] for e in mem.events("allocated")] == ["weights", "kv"]
    assert len(mem.events("committed")) == 1
    granted = {(e["pool"], e["mode"]) for e in mem.events("granted") if e["pid"] == engine_b.proc.pid}
    assert granted == {("weights", "ro"), ("kv", "rw")}
    r = engine_b.client.completions.create(model=engine_b.model, prompt=PARIS_PROMPT, max_tokens=PARIS_TOKENS,
                                           temperature=0)
    assert r.choices[0].text == paris.choices[0].text
    assert r.usage.completion_tokens == paris.usage.completion_tokens


def test_load_shedding_answers_503_with_retry_after(engine_b):
    body = {"model": engine_b.model, "prompt": "Count: 1, 2, 3,", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True}

    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=engine_b.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(n)))

    before = engine_b.metrics()
    responses = asyncio.run(burst(5))
    statuses = sorted(r.status_code for r in responses)
    # One runs (--max-num-seqs 1), at most one waits (--max-waiting 1): the rest are shed at once.
    assert set(statuses) == {200, 503} and 1 <= statuses.count(200) <= 2, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 16
    after = engine_b.wait_idle()
    assert requests_total(after, "rejected") - requests_total(before, "rejected") == statuses.count(503)


def test_sigterm_drains_inflight_stream_then_exits_0(engine_b):
    stream = engine_b.client.completions.create(model=engine_b.model, prompt="Count: 1, 2, 3,", max_tokens=40,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
    first = next(stream)
    assert first.choices[0].finish_reason is None
    engine_b.proc.proc.send_signal(signal.SIGTERM)
    # New connections are refused at once (the listener closes)...
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(f"{engine_b.url}/live", timeout=2)  # a new connection each time
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "still accepting connections 10s after SIGTERM"
        time.sleep(0.02)
    # ...while the request in flight runs to its end.
    *text_chunks, usage_chunk = [first, *stream]
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.usage.completion_tokens == 40
    assert engine_b.proc.wait(timeout=60) == 0
    engine_b.assert_clean_log()

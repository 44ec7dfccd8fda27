"""Logprobs, echo, prompt_logprobs, n > 1 and prompt lists through the official openai client against a real
engine process (a tiny random Llama on the CPU); the values are checked against transformers' own float32
log_softmax of the same checkpoint (as lm-evaluation-harness would score with it)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.openai_tiny import TinyServer

PROMPT = "The capital of France is"
TOL = 1e-2


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = TinyServer(tiny_model_dir)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """token ids -> transformers' log_softmax [len, vocab] (position i: the distribution of token i + 1)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()

    def log_softmax(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return log_softmax


def _ids(server, text: str) -> list[int]:
    return server.tokenizer.encode(text)


def test_completion_logprobs_equal_transformers(server, reference):
    r = server.client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    prompt, generated = _ids(server, PROMPT), []
    for _ in range(6):  # transformers' greedy continuation
        generated.append(int(reference(prompt + generated)[-1].argmax()))
    assert lp.tokens == [server.tokenizer.decode([t], skip_special_tokens=False) for t in generated]
    ref = reference(prompt + generated)
    for i, token in enumerate(generated):
        row = ref[len(prompt) - 1 + i]
        assert abs(lp.token_logprobs[i] - row[token].item()) < TOL, (i, lp.token_logprobs[i], row[token].item())
        assert token == int(row.argmax())  # greedy: the most likely one
        # the top 5 by their text (tokens that are parts of a character share the text U+FFFD: one key)
        want = {server.tokenizer.decode([t], skip_special_tokens=False) for t in row.topk(5).indices.tolist()}
        assert set(lp.top_logprobs[i]) == want
        assert abs(max(lp.top_logprobs[i].values()) - row.max().item()) < TOL
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens) == r.choices[0].text


def test_echo_with_max_tokens_0_scores_the_prompt(server, reference):
    """lm-evaluation-harness' log-likelihood request: echo, max_tokens 0, logprobs."""
    prompt = _ids(server, PROMPT)
    r = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                         temperature=0)
    c = r.choices[0]
    assert c.text == PROMPT and r.usage.completion_tokens == 0
    ref = reference(prompt)
    assert c.logprobs.token_logprobs[0] is None
    want = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    got = c.logprobs.token_logprobs[1:]
    assert len(got) == len(want) and all(abs(a - b) < TOL for a, b in zip(got, want)), (got, want)
    assert abs(sum(got) - sum(want)) < TOL * len(want)


def test_echo_then_completion_streamed_equals_whole(server):
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=2)
    whole = server.client.completions.create(**kw).choices[0]
    chunks = list(server.client.completions.create(**kw, stream=True))
    assert whole.text.startswith(PROMPT)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.text
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs


def test_prompt_logprobs_extension(server, reference):
    prompt = _ids(server, PROMPT)
    r = server.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                                   "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    plp = r.json()["choices"][0]["prompt_logprobs"]
    ref = reference(prompt)
    assert plp[0] is None and len(plp) == len(prompt)
    for i in range(1, len(prompt)):
        entry = plp[i][str(prompt[i])]
        assert abs(entry["logprob"] - ref[i - 1, prompt[i]].item()) < TOL
        assert entry["rank"] == 1 + int((ref[i - 1] > ref[i - 1, prompt[i]]).sum())


def test_chat_prompt_logprobs_whole_and_streamed(server):
    """vLLM's prompt_logprobs on a chat answer; streamed, on the first chunk (once)."""
    kw = dict(model=server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
              n=2, extra_body={"prompt_logprobs": 1})
    r = server.client.chat.completions.create(**kw)
    whole = r.model_extra["prompt_logprobs"]
    assert whole[0] is None and len(whole) == r.usage.prompt_tokens
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    carried = [ch.model_extra["prompt_logprobs"] for ch in chunks if ch.model_extra.get("prompt_logprobs")]
    assert carried == [whole] and chunks[0].model_extra.get("prompt_logprobs") == whole


def test_chat_logprobs_and_top_logprobs(server):
    kw = dict(model=server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
              logprobs=True, top_logprobs=3)
    r = server.client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6  # greedy: the most likely
        assert e.bytes == list(e.token.encode("utf-8"))
    streamed = [e for ch in server.client.chat.completions.create(**kw, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    assert all(math.isfinite(e.logprob) for e in content)


def test_prompt_lists_and_n_choices(server):
    prompts = [_ids(server, "One"), _ids(server, "Two words")]
    singles = [server.client.completions.create(model=server.model, prompt=p, max_tokens=4, temperature=0.8,
                                                seed=3, n=2) for p in prompts]
    r = server.client.completions.create(model=server.model, prompt=prompts, max_tokens=4, temperature=0.8, seed=3,
                                         n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [c.text for s in singles for c in s.choices]
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 16
    # as strings too, and streamed: the chunks carry their choice's index, interleaved
    texts = ["One", "Two words"]
    streamed: dict[int, str] = {}
    for ch in server.client.completions.create(model=server.model, prompt=texts, max_tokens=4, temperature=0.8,
                                               seed=3, n=2, stream=True):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(4)] == [c.text for c in r.choices]


def test_best_of_above_n_is_refused(server):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=server.model, prompt="x", max_tokens=1, best_of=2)
    assert e.value.body["param"] == "best_of"
    ok = server.client.completions.create(model=server.model, prompt="x", max_tokens=1, best_of=2, n=2)
    assert len(ok.choices) == 2


def test_smollm2_echo_scores_equal_transformers():
    """lm-evaluation-harness' log-likelihood request (echo, max_tokens 0, logprobs) on the real default model,
    SmolLM2-135M-Instruct (its Q4_1 GGUF expanded to float32 by both), against transformers reading the same
    GGUF file."""
    import transformers

    from understudy.common.default_model import default_model_path

    path = default_model_path()
    server = TinyServer(path)
    try:
        text = "The capital of France is Paris, and the capital of Italy is Rome."
        r = server.client.completions.create(model=server.model, prompt=text, max_tokens=0, echo=True, logprobs=1,
                                             temperature=0)
        lp = r.choices[0].logprobs
        ids = server.tokenizer.encode(text)
        assert r.choices[0].text == text and len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < TOL, (lp.token_logprobs[1:], want)
        assert sum(want) < -5  # a real model's score, not zeros
    finally:
        server.close()

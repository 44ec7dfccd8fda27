"""Logprobs and prompt logprobs: the model's own float32 log_softmax, as transformers computes it."""

from __future__ import annotations

import pytest
import torch

from understudy.common.params import SamplingParams
from understudy.engine.core.kv_cache import KVCache, KVSpec
from understudy.engine.core.llm_engine import EngineLimits, LLMEngine, StepOutput
from understudy.engine.model.loader import load_model

PROMPT = [17, 200, 3, 99, 45, 45, 128, 7, 250, 31, 64, 12, 5]


@pytest.fixture(scope="module")
def models(hf_model_dir):
    hf, path = hf_model_dir("llama")
    return hf, load_model(path, dtype=torch.float32)


def make_engine(model, **limits) -> LLMEngine:
    spec = KVSpec.for_budget(model.config, 1 << 20, 4, torch.float32)
    return LLMEngine(model, KVCache.local(spec, "cpu"), limits=EngineLimits(max_model_len=256, **limits))


def outputs(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[StepOutput]]:
    out: dict[str, list[StepOutput]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_work:
        for o in engine.step():
            out[o.request_id].append(o)
    return out


def reference(hf, tokens: list[int]) -> torch.Tensor:
    """transformers' float32 log_softmax at every position [len(tokens), V]."""
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


def check(entry, ref_row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert abs(entry.logprob - ref_row[token].item()) < 1e-4
    assert entry.rank == int((ref_row > ref_row[token]).sum()) + 1
    top = ref_row.topk(k)
    assert [t for t, _ in entry.top] == top.indices.tolist()
    assert max(abs(lp - v) for (_, lp), v in zip(entry.top, top.values.tolist())) < 1e-4 if k else entry.top == ()


def test_sampled_token_logprobs_match_transformers(models):
    hf, ours = models
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=5, logprobs=5, presence_penalty=1.0)
    out = outputs(make_engine(ours), {"a": (PROMPT, params),
                                      "b": (PROMPT[:5], SamplingParams(max_tokens=8, temperature=0, logprobs=0)),
                                      "c": (PROMPT[3:], SamplingParams(max_tokens=8, temperature=0))})
    for rid, prompt, k in (("a", PROMPT, 5), ("b", PROMPT[:5], 0)):
        tokens = [t for o in out[rid] for t in o.new_token_ids]
        ref = reference(hf, prompt + tokens)
        entries = [e for o in out[rid] for e in o.logprobs]
        assert len(entries) == len(tokens) == 8
        for i, (entry, token) in enumerate(zip(entries, tokens)):
            check(entry, ref[len(prompt) + i - 1], token, k)  # raw: before temperature and the penalty
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in out["c"])


def test_prompt_logprobs_every_position_chunked_and_uncached(models):
    hf, ours = models
    ref = reference(hf, PROMPT)
    engine = make_engine(ours, max_num_batched_tokens=5)  # the prompt comes in three chunks
    greedy = SamplingParams(max_tokens=2, temperature=0)
    outputs(engine, {"warm": (PROMPT, greedy)})  # the prompt's blocks are in the prefix cache now
    out = outputs(engine, {"p": (PROMPT, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))})["p"]
    first = out[0]
    assert first.cached_tokens == 0  # scored requests skip the prefix cache: every position is computed
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(PROMPT)
    for j in range(1, len(PROMPT)):
        check(first.prompt_logprobs[j], ref[j - 1], PROMPT[j], 3)
    assert all(o.prompt_logprobs is None for o in out[1:])


def test_max_tokens_zero_scores_the_prompt_only(models):
    """lm-eval's loglikelihood requests: echo + max_tokens 0."""
    hf, ours = models
    ref = reference(hf, PROMPT)
    engine = make_engine(ours)
    out = outputs(engine, {"s": (PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=0)),
                           "g": (PROMPT[:4], SamplingParams(max_tokens=3, temperature=0))})
    (only,) = out["s"]
    assert only.new_token_ids == [] and only.finish_reason == "length" and only.completion_tokens == 0
    assert [e.token_id for e in only.prompt_logprobs[1:]] == PROMPT[1:]
    total = sum(e.logprob for e in only.prompt_logprobs[1:])
    want = sum(ref[j - 1, PROMPT[j]].item() for j in range(1, len(PROMPT)))
    assert abs(total - want) < 1e-3
    assert len([t for o in out["g"] for t in o.new_token_ids]) == 3 and not engine.has_work
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("z", PROMPT, SamplingParams(max_tokens=0))


def test_prompt_logprobs_survive_preemption(models):
    """A cache too small for both requests: the later one is preempted and recomputed from scratch; its
    prompt logprobs are still one per position, each scored once."""
    from dataclasses import replace

    hf, ours = models
    spec = replace(KVSpec.for_budget(ours.config, 1 << 20, 4, torch.float32), num_blocks=10)
    engine = LLMEngine(ours, KVCache.local(spec, "cpu"), limits=EngineLimits(max_model_len=256,
                                                                              max_num_batched_tokens=5))
    other = PROMPT[::-1]
    scored = SamplingParams(max_tokens=10, temperature=0, prompt_logprobs=1, ignore_eos=True)
    out = outputs(engine, {"a": (PROMPT, scored), "b": (other, scored)})
    assert engine.scheduler.preemptions > 0
    for rid, prompt in (("a", PROMPT), ("b", other)):
        entries = out[rid][0].prompt_logprobs
        ref = reference(hf, prompt)
        assert len(entries) == len(prompt) and entries[0] is None
        for j in range(1, len(prompt)):
            check(entries[j], ref[j - 1], prompt[j], 1)
        assert sum(len(o.new_token_ids) for o in out[rid]) == 10

"""The engine loop on the default model: batching, caching, cancelling, sampling, limits."""

from __future__ import annotations

import pytest
import torch

from understudy.common.default_model import default_model_path
from understudy.engine.core.llm_engine import EngineLimits, LLMEngine
from understudy.engine.core.kv_cache import KVCache, KVSpec
from understudy.engine.model.loader import load_config, iter_weights
from understudy.engine.model.decoder import CausalLM
from understudy.engine.core.sampling import SamplingParams
from understudy.engine.core.scheduler import QueueFull
from understudy.common.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def smol():
    path = default_model_path()
    config = load_config(path)
    with torch.device("meta"):
        model = CausalLM(config)
    model.load_weights(iter_weights(path, torch.float32))
    return model, Tokenizer.from_pretrained(path)


def make_engine(smol, kv_bytes=64 << 20, **limits) -> LLMEngine:
    model, _ = smol
    spec = KVSpec.for_budget(model.config, kv_bytes, 16, torch.float32)
    return LLMEngine(model, KVCache.local(spec, "cpu"), eos_token_ids=model.config.eos_token_ids,
                     limits=EngineLimits(**limits))


PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "def fibonacci(n):",
           "The three primary colors are", "1, 2, 3, 4,", "My favourite food is", "Water boils at",
           "The quick brown fox"]


def test_default_model_says_paris(smol):
    _, tok = smol
    out = make_engine(smol).generate([tok.encode("The capital of France is")], GREEDY)[0]
    assert "Paris" in tok.decode(out)


def test_32_concurrent_requests_match_one_at_a_time(smol):
    _, tok = smol
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))) for i in range(32)]
    engine = make_engine(smol)
    together = engine.generate(prompts, GREEDY)
    alone = [make_engine(smol).generate([p], GREEDY)[0] for p in prompts[:8]]
    assert together[:8] == alone
    assert len({tuple(p) for p in prompts}) == 32 and all(len(o) == 12 for o in together)


def test_chunked_prefill_and_preemption_give_the_same_tokens(smol):
    _, tok = smol
    prompts = [tok.encode(p * 4) for p in PROMPTS]
    reference = make_engine(smol).generate(prompts, GREEDY)
    chunked = make_engine(smol, max_num_batched_tokens=7).generate(prompts, GREEDY)
    assert chunked == reference
    # Room for about three sequences: growing ones preempt others, which are recomputed later.
    tight = make_engine(smol, kv_bytes=8 * 720 * 1024)
    assert tight.generate(prompts, GREEDY) == reference
    assert tight.scheduler.preemptions > 0


def test_prefix_cache_hits_give_the_same_outputs_as_misses(smol):
    _, tok = smol
    long_prompt = tok.encode("You are a helpful assistant. " * 8 + "Question: what is the capital of France?")
    engine = make_engine(smol)
    miss = engine.generate([long_prompt], GREEDY)[0]
    hits_before = engine.blocks.prefix_hits
    hit = engine.generate([long_prompt], GREEDY)[0]
    cached = engine.blocks.prefix_hits - hits_before
    assert cached >= len(long_prompt) - 16 and cached % 16 == 0
    assert hit == miss
    # a different continuation of the same prefix shares the cached blocks too
    other = engine.generate([long_prompt[:-3] + tok.encode(" Germany?")], GREEDY)[0]
    assert engine.blocks.prefix_hits - hits_before > cached and other


def test_cancelling_frees_kv_blocks_at_once(smol):
    _, tok = smol
    engine = make_engine(smol)
    free = engine.blocks.num_free
    engine.add_request("a", tok.encode(PROMPTS[1] * 6), SamplingParams(max_tokens=100, temperature=0))
    engine.step()
    engine.step()
    assert engine.blocks.num_free < free
    assert engine.abort("a")
    assert engine.blocks.num_free == free and not engine.has_work
    assert engine.step() == []


def test_sampling_seeded_is_reproducible_and_stops_work(smol):
    _, tok = smol
    prompt = tok.encode("Tell me a story:")
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = make_engine(smol).generate([prompt], seeded)[0]
    b = make_engine(smol).generate([prompt, prompt], seeded)
    assert a == b[0] == b[1]
    c = make_engine(smol).generate([prompt], SamplingParams(**{**vars(seeded), "seed": 99}))[0]
    assert c != a
    greedy = make_engine(smol).generate([prompt], GREEDY)[0]
    stop_at = greedy[3]
    stopped = make_engine(smol).generate([prompt], SamplingParams(max_tokens=12, temperature=0,
                                                                  stop_token_ids=(stop_at,)))[0]
    assert stopped == greedy[: greedy.index(stop_at) + 1]


def test_limits_give_clear_errors(smol):
    _, tok = smol
    engine = make_engine(smol, kv_bytes=8 * 720 * 1024, max_waiting=2, max_model_len=512)
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request("big", tok.encode("hi"), SamplingParams(max_tokens=400))
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("long", tok.encode("hi"), SamplingParams(max_tokens=600))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("zero", tok.encode("hi"), SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("oov", [10**9], SamplingParams())
    engine.add_request("q1", tok.encode("hi"), SamplingParams())
    engine.add_request("q2", tok.encode("hi"), SamplingParams())
    with pytest.raises(QueueFull):
        engine.add_request("q3", tok.encode("hi"), SamplingParams())

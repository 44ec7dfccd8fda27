"""Overlapped decoding (LLMEngine.overlap_decode): a decode step is queued on the device behind the one
before it, with that one's sampled tokens as inputs, before the host reads them. The tokens, logprobs and
finish reasons must be exactly those of the engine that reads every step first, whatever ends a request
(length, a stop token found only when read, an abort while a step is queued) and whatever joins it."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from understudy.common.params import StructuredSpec
from understudy.common.tokenizer import Tokenizer
from understudy.engine.core.constraints import Constraints
from understudy.engine.core.kv_cache import KVCache, KVSpec
from understudy.engine.core.llm_engine import EngineLimits, LLMEngine
from understudy.engine.core.sampling import SamplingParams
from understudy.engine.model.decoder import CausalLM
from understudy.engine.model.loader import iter_weights, load_config
from tests.helpers.tiny_model import make_tiny_llama


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def model(request, tmp_path_factory):
    """The tiny model on the CPU (eager steps), and on a GPU with the Triton attention, so that steps replay
    CUDA graphs and the copies around them are the asynchronous ones."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from understudy.engine.layers.triton_attention import attention_for

    path = make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=3)
    config = load_config(path)
    with torch.device("meta"):
        m = CausalLM(config, attention_for("triton")) if request.param == "cuda" else CausalLM(config)
    m.load_weights(iter_weights(path, torch.float32), device=request.param)
    m.path = path  # (its byte-level tokenizer: the grammar test's)
    return m


def engine(model, overlap: bool, num_blocks: int | None = None) -> LLMEngine:
    device = model.lm_head.weight.device
    spec = KVSpec.for_budget(model.config, 8 << 20, 16, torch.float32)
    if num_blocks is not None:
        spec = dataclasses.replace(spec, num_blocks=num_blocks)
    e = LLMEngine(model, KVCache.local(spec, device.type), eos_token_ids=(), limits=EngineLimits(max_num_seqs=16),
                  device=device)
    if device.type == "cuda":
        e.enable_cuda_graphs(mixed_steps=True)
    e.overlap_decode = overlap
    return e


def run(e: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], abort_at: dict[str, int] = {}
        ) -> dict[str, list]:
    """Step to the end; every output per request (token ids, finish reason, logprobs). abort_at: abort a request
    once it has that many tokens. Also records, per step, whether a step was left queued."""
    for rid, (prompt, params) in requests.items():
        e.add_request(rid, prompt, dataclasses.replace(params))
    got: dict[str, list] = {rid: [] for rid in requests}
    e.queued_after = []
    while e.has_work:
        for o in e.step():
            got[o.request_id].append((o.new_token_ids, o.finish_reason,
                                      None if o.logprobs is None else [(lp.token_id, round(lp.logprob, 4))
                                                                       for lp in o.logprobs]))
            if len(got[o.request_id]) == abort_at.get(o.request_id):
                assert e.abort(o.request_id)
        e.queued_after.append(e._queued is not None)
    return got


def both(model, requests, **kw):
    a, b = engine(model, True), engine(model, False)
    got_a, got_b = run(a, requests, **kw), run(b, requests, **kw)
    for e in (a, b):  # nothing leaks: every block is back, the queue is empty
        assert not e.has_work and e._queued is None
        assert e.blocks.num_free == e.blocks.capacity
    return got_a, got_b, a


def prompt(i: int, n: int = 7) -> list[int]:
    return [(31 * i + 7 * j) % 256 for j in range(n)]


def test_it_is_on_by_default_only_where_steps_run_asynchronously(model):
    # (on the CPU a step computes while it is launched: queueing the next one would only delay each token)
    device = model.lm_head.weight.device
    e = LLMEngine(model, KVCache.local(KVSpec.for_budget(model.config, 1 << 20, 16, torch.float32), device.type),
                  device=device)
    assert e.overlap_decode == (device.type == "cuda")


def test_greedy_seeded_and_logprob_requests_give_the_same_outputs(model):
    requests = {
        "greedy": (prompt(0), SamplingParams(max_tokens=20, temperature=0)),
        "seeded": (prompt(1), SamplingParams(max_tokens=17, temperature=0.9, top_p=0.9, seed=11)),
        "topk": (prompt(2), SamplingParams(max_tokens=9, temperature=1.3, top_k=5, seed=5, logprobs=3)),
        "bias": (prompt(3), SamplingParams(max_tokens=12, temperature=0, logit_bias=((17, 5.0),))),
        "min_tokens": (prompt(4), SamplingParams(max_tokens=15, temperature=0, min_tokens=6,
                                                 stop_token_ids=(17,), logit_bias=((17, 50.0),))),
        # The penalties count the latest token too, which a queued step has only on the device. Unpenalised,
        # this prompt's greedy tokens repeat one token three times in a row: the penalties must see it.
        "presence": (prompt(8), SamplingParams(max_tokens=16, temperature=0, presence_penalty=2.0)),
        "frequency": (prompt(8), SamplingParams(max_tokens=16, temperature=0, frequency_penalty=2.0)),
        "repetition": (prompt(8), SamplingParams(max_tokens=16, temperature=0, repetition_penalty=2.0)),
        "seeded_penalty": (prompt(8), SamplingParams(max_tokens=16, temperature=0.8, seed=3, frequency_penalty=1.5)),
    }
    overlapped, plain, e = both(model, requests)
    assert overlapped == plain
    assert [len(v) for v in overlapped.values()] == [20, 17, 9, 12, 7, 16, 16, 16, 16]  # min_tokens: 6, then 17
    assert overlapped["min_tokens"][-1] == ([17], "stop", None)
    assert sum(e.queued_after) > 10  # the decode steps were queued ahead


def test_a_stop_token_seen_late_drops_the_queued_row(model):
    """Greedy tokens of a request run without a stop, then again with its 5th token as a stop token: the
    step queued behind the one that samples it computes one more row, which must not come out."""
    free = run(engine(model, True), {"r": (prompt(5), SamplingParams(max_tokens=12, temperature=0))})["r"]
    stop = free[4][0][0]
    first = next(i for i, (ids, _, _) in enumerate(free) if ids[0] == stop)
    requests = {"r": (prompt(5), SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,))),
                "other": (prompt(6), SamplingParams(max_tokens=12, temperature=0))}
    overlapped, plain, _ = both(model, requests)
    assert overlapped == plain
    assert len(overlapped["r"]) == first + 1 and overlapped["r"][-1][1] == "stop"
    assert len(overlapped["other"]) == 12


def test_an_abort_while_a_step_is_queued_loses_nothing_else(model):
    requests = {f"r{i}": (prompt(10 + i), SamplingParams(max_tokens=14, temperature=0)) for i in range(3)}
    overlapped, plain, _ = both(model, requests, abort_at={"r1": 4})
    assert overlapped == plain
    assert len(overlapped["r1"]) == 4 and len(overlapped["r0"]) == len(overlapped["r2"]) == 14


def test_arrivals_and_grammars_wait_for_the_host_and_penalties_do_not(model):
    e = engine(model, True)
    e.add_request("a", prompt(20), SamplingParams(max_tokens=30, temperature=0))
    for _ in range(3):
        e.step()
    assert e._queued is not None  # plain decoding: the next step is queued
    e.add_request("b", prompt(21), SamplingParams(max_tokens=4, temperature=0))
    e.step()  # completes the queued step; "b" waits to be admitted, so nothing is queued behind it
    assert e._queued is None
    while e.has_work:
        e.step()
    e.add_request("c", prompt(22), SamplingParams(max_tokens=30, temperature=0.5, seed=1, presence_penalty=0.5))
    for _ in range(4):
        e.step()
    assert e._queued is not None  # the penalty reads the queued-behind token on the device
    while e.has_work:
        e.step()
    # a grammar advances over each token on the host before its next bitmask: never queued ahead
    tokenizer = Tokenizer.from_pretrained(model.path)
    e.constraints = Constraints(tokenizer, model.config.vocab_size, (), device=e.device)
    e.add_request("d", prompt(23), SamplingParams(max_tokens=12, temperature=0,
                                                  structured=StructuredSpec("regex", "[a-z]{12}")))
    text = []
    while e.has_work:
        text += [t for o in e.step() for t in o.new_token_ids]
        assert e._queued is None
    assert re.fullmatch("[a-z]{12}", tokenizer.decode(text)), text


def test_the_kv_cache_running_out_stops_queueing_and_preempts_as_before(model):
    """A cache of a few blocks: the scheduler preempts; queued steps must neither take blocks the plain engine
    would not have nor change any token."""
    requests = {f"r{i}": (prompt(30 + i, 20), SamplingParams(max_tokens=24, temperature=0)) for i in range(4)}
    outs = []
    for overlap in (True, False):
        e = engine(model, overlap, num_blocks=12)
        outs.append(run(e, requests))
        assert e.blocks.num_free == e.blocks.capacity and e.scheduler.preemptions > 0
    assert outs[0] == outs[1]
    assert all(len(v) == 24 for v in outs[0].values())

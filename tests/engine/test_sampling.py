"""The sampler: each transform against a plain reference of its published formula, seeded draws that do
not depend on the batch or on a migration, n > 1 choices sharing the prompt's KV blocks."""

from __future__ import annotations

import math

import pytest
import torch

from understudy.common.params import SamplingParams, StructuredSpec, choice_seed
from understudy.engine.core.kv_cache import KVCache, KVSpec
from understudy.engine.core.llm_engine import EngineLimits, LLMEngine
from understudy.engine.core.sampling import apply_transforms, filtered_probs, sample
from understudy.engine.core.sequence import Sequence
from understudy.engine.model.loader import load_model

VOCAB = 256
BLOCK = 4


@pytest.fixture(scope="module")
def tiny(hf_model_dir):
    _, path = hf_model_dir("llama")
    return load_model(path, dtype=torch.float32)


def make_engine(model, eos=(), **limits) -> LLMEngine:
    spec = KVSpec.for_budget(model.config, 1 << 20, BLOCK, torch.float32)
    return LLMEngine(model, KVCache.local(spec, "cpu"), eos_token_ids=eos,
                     limits=EngineLimits(max_model_len=256, **limits))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Add the requests, step until the engine is idle: every request's tokens (those added before too)."""
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_work:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def seq(params: SamplingParams, prompt=(1, 2, 3), output=(), seed=0) -> Sequence:
    s = Sequence("r", list(prompt), params, seed=seed)
    s.output = list(output)
    return s


# -- each transform against a reference ---------------------------------------------------------------------

def reference_transforms(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int],
                         eos: set[int]) -> list[float]:
    """One row, plain Python: vLLM's / HF's / OpenAI's formulas in the documented order."""
    out = list(logits)
    for t, b in p.logit_bias:
        out[t] += b
    if p.allowed_token_ids is not None:
        out = [x if t in p.allowed_token_ids else -math.inf for t, x in enumerate(out)]
    generated = prompt[len(prompt) - p.resumed_tokens:] + output
    if len(generated) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else eos):
            out[t] = -math.inf
    if p.repetition_penalty != 1.0:  # HF RepetitionPenaltyLogitsProcessor / vLLM
        for t in set(prompt + output):
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(generated):  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        out[t] -= generated.count(t) * p.frequency_penalty + p.presence_penalty
    return out


CASES = [
    SamplingParams(logit_bias=((5, 3.5), (9, -100.0))),
    SamplingParams(allowed_token_ids=(3, 7, 11)),
    SamplingParams(min_tokens=4, stop_token_ids=(12,)),
    SamplingParams(min_tokens=4, stop_token_ids=(12,), ignore_eos=True),
    SamplingParams(min_tokens=3, resumed_tokens=2, stop_token_ids=(12,)),  # 2 resumed + 1 output: masking ends
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6),
    SamplingParams(presence_penalty=1.5, frequency_penalty=0.7),
    SamplingParams(presence_penalty=-0.5, frequency_penalty=2.0, resumed_tokens=3),
    SamplingParams(presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.3, logit_bias=((4, 2.0),),
                   min_tokens=8, stop_token_ids=(6,)),
]


def test_each_transform_matches_its_formula():
    torch.manual_seed(0)
    logits = torch.randn(len(CASES), 32) * 3
    prompt, output, eos = [4, 5, 6, 5, 7, 8], [5, 9, 5, 12], {2}
    seqs = [seq(p, prompt, output) for p in CASES]
    got = apply_transforms(logits, seqs, eos_token_ids=tuple(eos))
    for i, p in enumerate(CASES):
        want = torch.tensor(reference_transforms(logits[i].tolist(), p, prompt, output, eos))
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5, msg=f"{p}")
    assert not torch.equal(got, logits)  # every case changed something


def reference_filter(logits: list[float], p: SamplingParams) -> list[float]:
    """temperature -> top_k -> top_p -> min_p (HF's warpers), unnormalised probabilities."""
    z = [x / p.temperature for x in logits]
    order = sorted(range(len(z)), key=lambda t: -z[t])
    keep = set(order[:p.top_k] if p.top_k > 0 else order)
    m = max(z)
    w = {t: math.exp(z[t] - m) for t in keep}
    total, acc, kept = sum(w.values()), 0.0, set()
    for t in order:
        if t in keep and (acc < p.top_p or not kept):
            kept.add(t)
            acc += w[t] / total
    total = sum(w[t] for t in kept)
    probs = [w[t] / total if t in kept else 0.0 for t in range(len(z))]
    floor = p.min_p * max(probs)
    probs = [x if x >= floor else 0.0 for x in probs]
    return [x / sum(probs) for x in probs]


def test_temperature_top_k_top_p_min_p_match_the_reference():
    torch.manual_seed(1)
    params = [SamplingParams(temperature=0.7), SamplingParams(top_k=5), SamplingParams(top_p=0.8, temperature=1.3),
              SamplingParams(top_k=10, top_p=0.6), SamplingParams(min_p=0.2), SamplingParams(min_p=0.05, top_k=20)]
    logits = torch.randn(len(params), 40) * 2
    got = filtered_probs(logits, params)
    for i, p in enumerate(params):
        want = torch.tensor(reference_filter(logits[i].tolist(), p))
        torch.testing.assert_close(got[i] / got[i].sum(), want, atol=1e-5, rtol=1e-4, msg=f"{p}")


def test_the_race_draws_tokens_with_their_probabilities():
    """argmax(p / E) over hashed exponential noise: over 4000 (seed, position) pairs each token comes up
    as often as its probability says."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(500, 1)
    probs = logits[0].softmax(-1)
    counts = torch.zeros(6)
    for seed in range(8):
        rows = [seq(SamplingParams(temperature=1.0), output=[0] * pos, seed=seed) for pos in range(500)]
        counts += torch.bincount(sample(logits, rows).token_ids, minlength=6)
    freq = counts / counts.sum()
    assert (freq - probs).abs().max() < 0.025, (freq, probs)


def test_greedy_rows_take_the_argmax_of_the_transformed_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    p = SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    assert sample(logits, [seq(p, output=[1, 1])]).token_ids.tolist() == [3]  # 5 - 2*2 - 2 = -1 < 2
    assert sample(logits, [seq(SamplingParams(temperature=0))]).token_ids.tolist() == [1]


def test_bitmask_allows_only_its_tokens():
    logits = torch.randn(2, 70)
    mask = torch.zeros(2, 3, dtype=torch.int32)
    mask[0, 0] = 1 << 5
    mask[1, 2] = 1 << 3  # token 67
    mask[1, 1] = -(1 << 31)  # bit 31 of word 1: token 63 (the sign bit)
    params = SamplingParams(temperature=1.0)
    for seed in range(5):
        got = sample(logits, [seq(params, seed=seed), seq(params, seed=seed)], bitmask=mask).token_ids.tolist()
        assert got[0] == 5 and got[1] in (63, 67)


# -- through the engine ---------------------------------------------------------------------------------------

PROMPTS = [[17, 200, 3, 99, 45, 45, 128, 7, 250], [5, 6, 7], [101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111],
           [42] * 6]


def test_seeded_sampling_is_the_same_alone_in_batches_and_resumed(tiny):
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=1234)
    alone = run(make_engine(tiny), {"a": (PROMPTS[0], seeded)})["a"]
    others = {f"o{i}": (p, SamplingParams(max_tokens=7 + i, temperature=0.9 if i % 2 else 0.0, top_k=40))
              for i, p in enumerate(PROMPTS[1:])}
    together = run(make_engine(tiny), {**others, "a": (PROMPTS[0], seeded)})["a"]
    # ...and arriving late, into a running batch of other requests
    engine = make_engine(tiny)
    for rid, (p, params) in others.items():
        engine.add_request(rid, p, params)
    engine.step(), engine.step()
    late = run(engine, {"a": (PROMPTS[0], seeded)})["a"]
    assert alone == together == late
    unseeded = {tuple(run(make_engine(tiny), {"u": (PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.8))})["u"])
                for _ in range(4)}
    other_seed = run(make_engine(tiny), {"a": (PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.8,
                                                                           seed=99))})["a"]
    assert other_seed != alone and len(unseeded) > 1  # the draws do depend on the seed
    for k in (1, 5):  # a migration: prompt + the first k tokens, the rest continues the same
        resumed = SamplingParams(max_tokens=12 - k, temperature=0.8, seed=1234, resumed_tokens=k)
        assert run(make_engine(tiny), {"a": (PROMPTS[0] + alone[:k], resumed)})["a"] == alone[k:]


def test_penalised_sampling_resumes_the_same(tiny):
    """Penalties and min_tokens count the resumed tokens as output: a resumed request continues exactly."""
    p = dict(temperature=0.8, seed=7, presence_penalty=1.2, frequency_penalty=0.8, repetition_penalty=1.3,
             min_tokens=10, logit_bias=((3, 2.0),))
    eos = (PROMPTS[1][0],)
    alone = run(make_engine(tiny, eos), {"a": (PROMPTS[1], SamplingParams(max_tokens=14, **p))})["a"]
    resumed = SamplingParams(max_tokens=10, resumed_tokens=4, **p)
    assert run(make_engine(tiny, eos), {"a": (PROMPTS[1] + alone[:4], resumed)})["a"] == alone[4:]


def test_min_tokens_masks_eos_and_stop_ids(tiny):
    first = run(make_engine(tiny), {"g": (PROMPTS[0], SamplingParams(max_tokens=8, temperature=0))})["g"]
    eos = (first[0],)
    assert run(make_engine(tiny, eos), {"g": (PROMPTS[0], SamplingParams(max_tokens=8, temperature=0))})["g"] == \
        first[:1]  # the eos ends it at once
    out = run(make_engine(tiny, eos), {"g": (PROMPTS[0], SamplingParams(max_tokens=8, temperature=0,
                                                                        min_tokens=5))})["g"]
    assert len(out) >= 5 and eos[0] not in out[:5]
    stop = run(make_engine(tiny), {"g": (PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, min_tokens=4,
                                                                    stop_token_ids=(first[0],)))})["g"]
    assert len(stop) >= 4 and first[0] not in stop[:4]


def test_logit_bias_and_allowed_token_ids_in_the_engine(tiny):
    out = run(make_engine(tiny), {
        "bias": (PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.8, seed=3, logit_bias=((77, 100.0),))),
        "allowed": (PROMPTS[2], SamplingParams(max_tokens=6, temperature=1.0, seed=3, allowed_token_ids=(10, 20))),
    })
    assert out["bias"] == [77] * 6
    assert set(out["allowed"]) <= {10, 20} and len(out["allowed"]) == 6
    with pytest.raises(ValueError, match="logit_bias"):
        make_engine(tiny).add_request("x", [1], SamplingParams(logit_bias=((VOCAB, 1.0),)))


def test_structured_requests_are_refused_without_a_grammar_engine(tiny):
    with pytest.raises(ValueError, match="structured"):
        make_engine(tiny).add_request("x", [1, 2], SamplingParams(structured=StructuredSpec("json_object")))


def test_params_validation_names_the_field():
    for field, value in [("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
                         ("min_p", 1.5), ("min_tokens", -1), ("logprobs", 21), ("prompt_logprobs", -1),
                         ("logit_bias", ((1, 101.0),)), ("allowed_token_ids", ()), ("resumed_tokens", -1)]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value}).validate()
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0).validate()
    SamplingParams(max_tokens=0, prompt_logprobs=0).validate()
    assert choice_seed(5, 0) == 5 and len({choice_seed(5, j) for j in range(8)}) == 8


# -- n > 1: the choices share the prompt's blocks -------------------------------------------------------------

def test_n_choices_compute_the_prompt_once(tiny):
    prompt = list(range(30, 30 + 3 * BLOCK + 1))  # three full blocks and one token
    engine = make_engine(tiny)
    requests = {f"c{j}": (prompt, SamplingParams(max_tokens=5, temperature=0.8, seed=choice_seed(11, j)))
                for j in range(4)}
    out = run(engine, requests)
    assert engine.prompt_tokens_computed == len(prompt) + 3  # each other choice computes only the last token
    assert len({tuple(o) for o in out.values()}) > 1 and all(len(o) == 5 for o in out.values())
    alone = run(make_engine(tiny), {"c2": requests["c2"]})["c2"]
    assert out["c2"] == alone  # sharing changes nothing in what a choice samples


def test_waiting_for_a_shared_prefill_neither_deadlocks_nor_starves(tiny):
    """Twins of a prompt being prefilled wait for its blocks; a request behind them is not held up; a
    prefill spread over several steps keeps them waiting, and aborting it lets them go."""
    prompt = list(range(60, 60 + 6 * BLOCK + 2))
    greedy = SamplingParams(max_tokens=3, temperature=0)
    engine = make_engine(tiny, max_num_batched_tokens=40)
    for rid, p in (("first", prompt), ("twin1", prompt), ("twin2", prompt), ("other", [9, 8, 7])):
        engine.add_request(rid, p, greedy)
    first_step = {o.request_id for o in engine.step()}
    assert first_step == {"first", "other"}  # "other" went ahead of the waiting twins
    assert [s.request_id for s in engine.scheduler.waiting] == ["twin1", "twin2"]
    out = run(engine, {})
    assert not engine.has_work and engine.sequences == {}
    assert engine.prompt_tokens_computed == len(prompt) + 3 + 2 * 2  # the twins: their last two tokens each

    engine = make_engine(tiny, max_num_batched_tokens=8)  # "first" takes four steps to prefill
    for rid in ("first", "twin"):
        engine.add_request(rid, prompt, greedy)
    engine.step(), engine.step()
    assert [s.request_id for s in engine.scheduler.waiting] == ["twin"]
    engine.abort("first")
    out = {}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id] = out.get(o.request_id, []) + o.new_token_ids
    assert len(out["twin"]) == 3 and engine.sequences == {}
    assert engine.blocks.prefix_hits == 4 * BLOCK  # the four blocks "first" sealed before it was aborted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_samples_what_eager_steps_sample(hf_model_dir):
    """The graphs give the logits, the sampler runs after them: same seeded tokens, same logprobs."""
    from understudy.engine.layers.triton_attention import attention_for
    from understudy.engine.model.decoder import CausalLM
    from understudy.engine.model.loader import iter_weights, load_config

    _, path = hf_model_dir("llama")
    config = load_config(path)
    weights = dict(iter_weights(path, torch.float32))
    requests = {f"r{i}": (p, SamplingParams(max_tokens=16, temperature=0.8, seed=i, logprobs=3, top_p=0.9,
                                            presence_penalty=0.5, repetition_penalty=1.2, min_tokens=4))
                for i, p in enumerate(PROMPTS)}
    results = []
    for graphs in (False, True):
        with torch.device("meta"):
            model = CausalLM(config, attention_for("triton"))
        model.load_weights(weights.items(), device="cuda")
        spec = KVSpec.for_budget(config, 16 << 20, 16, torch.float32)
        engine = LLMEngine(model, KVCache.local(spec, "cuda"), limits=EngineLimits(max_num_seqs=8,
                           max_model_len=256), device="cuda")
        if graphs:
            engine.enable_cuda_graphs()
        out = {rid: [] for rid in requests}
        for rid, (prompt, params) in requests.items():
            engine.add_request(rid, prompt, params)
        while engine.has_work:
            for o in engine.step():
                out[o.request_id] += [(t, lp.logprob) for t, lp in zip(o.new_token_ids, o.logprobs)]
        results.append(out)
    for rid in requests:
        assert [t for t, _ in results[0][rid]] == [t for t, _ in results[1][rid]]
        assert max(abs(a - b) for (_, a), (_, b) in zip(results[0][rid], results[1][rid])) < 1e-4

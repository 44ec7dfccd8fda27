"""The CUDA path against the reference path (runs on a GPU only; skipped without one)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("group,block_size,dtype", [(1, 16, torch.float32), (4, 16, torch.bfloat16),
                                                    (8, 32, torch.float16), (3, 16, torch.float32)])
def test_triton_decode_matches_reference_attention(group, block_size, dtype):
    from understudy.engine.layers.attention import AttentionMetadata, reference_attention, store_kv
    from understudy.engine.layers.triton_attention import fast_attention

    torch.manual_seed(0)
    hkv, d, num_blocks = 2, 64, 64
    ctx = [1, 15, 16, 17, 100, 300]
    tables = [list(torch.randperm(num_blocks - 1)[: -(-c // block_size)].add(1).tolist()) for c in ctx]
    kc = torch.randn(num_blocks, block_size, hkv, d, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(len(ctx), hkv * group, d, device="cuda", dtype=dtype)
    k = torch.randn(len(ctx), hkv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    meta = AttentionMetadata.build([1] * len(ctx), ctx, tables, block_size, device="cuda")
    store_kv(k, v, kc, vc, meta.slot_mapping)  # the model's RoPE step stores them (fused.rope_and_store)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = reference_attention(q, k, v, kc, vc, meta, d ** -0.5)
    out = fast_attention(q, k, v, kc2, vc2, meta, d ** -0.5)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # attention only reads the caches
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("prefill", ["reference", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_graphs_and_triton_give_the_reference_greedy_tokens(family, prefill, hf_model_dir):
    from understudy.engine.core.llm_engine import EngineLimits, LLMEngine
    from understudy.engine.core.kv_cache import KVCache, KVSpec
    from understudy.engine.model.loader import iter_weights, load_config
    from understudy.engine.model.decoder import CausalLM
    from understudy.engine.core.sampling import SamplingParams
    from understudy.engine.layers.triton_attention import attention_for

    from tests.helpers.engine import hf_greedy

    hf, path = hf_model_dir(family)
    config = load_config(path)
    weights = dict(iter_weights(path, torch.float32))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (3, 17, 40, 5)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = []
    for fast in (False, True):
        with torch.device("meta"):
            model = CausalLM(config, attention_for(prefill)) if fast else CausalLM(config)
        model.load_weights(weights.items(), device="cuda")
        spec = KVSpec.for_budget(config, 16 << 20, 16, torch.float32)
        engine = LLMEngine(model, KVCache.local(spec, "cuda"), limits=EngineLimits(max_num_seqs=8,
                           max_model_len=256), device="cuda")
        if fast:  # mixed steps too where the prefill attention is the Triton kernel
            engine.enable_cuda_graphs(mixed_steps=prefill == "triton")
        outs.append(engine.generate(prompts, params))
    assert outs[0] == outs[1]
    expected = hf_greedy(hf, prompts[1], 24)  # transformers may stop early at its eos
    assert expected and outs[1][1][: len(expected)] == expected

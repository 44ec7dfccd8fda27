"""Mistral, Gemma 2, Gemma 3, Phi-3 and the yarn / dynamic / longrope RoPE variants, served by the one decoder:
tiny random transformers models saved as HF directories, our engine against transformers in float32.

Each model is small enough that a mistake in a family flag changes the logits: windows shorter than the
prompts, soft-caps low enough to bite, contexts that cross the RoPE variants' thresholds.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.helpers.engine import TINY, greedy_generate, hf_greedy
from understudy.engine.layers.attention import AttentionMetadata
from understudy.engine.model.config import ModelConfig, UnsupportedModelError
from understudy.engine.model.loader import load_config, load_model
from tests.helpers.interpreter import INTERPRETING, run_interpreted_tests

NEW_TOKENS = 12
PROMPT = [17, 200, 3, 99, 45, 45, 128, 7, 250, 31, 64, 5, 81, 190, 2, 33, 140, 9, 77]  # 19 tokens


def _phi3_factors(n):
    return dict(type="longrope", short_factor=[1.0 + 0.3 * i for i in range(n)],
                long_factor=[1.5 + 2.0 * i for i in range(n)])


# name -> (config class, model class, config kwargs); each covers the features named in its comment
MODELS = {
    # every layer slides over 5 tokens
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    # soft-capped scores and logits, sliding / global layers, query_pre_attn_scalar, sandwich norms, GELU
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0, tie_word_embeddings=False)),
    # q/k norms, local layers with their own RoPE base, linear scaling on the global ones
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, sliding_window=5, sliding_window_pattern=2, rope_theta=10000.0,
                    rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                    query_pre_attn_scalar=16, final_logit_softcapping=4.0, tie_word_embeddings=False)),
    # fused qkv / gate_up, longrope (short factors here, long ones in the test past 40 tokens), partial rotary
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(max_position_embeddings=64, original_max_position_embeddings=40, partial_rotary_factor=0.5,
                  rope_scaling=_phi3_factors(4), pad_token_id=None)),
    # yarn with an attention factor
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})),
    # dynamic NTK past max_position_embeddings (16); Qwen2's sliding layers from max_window_layers on
    "qwen2-dynamic": ("Qwen2Config", "Qwen2ForCausalLM",
                      dict(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                           use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    # GLM-4.5: a dense first layer, then experts chosen by DeepSeek-V3's router (the top 1 of 2 groups),
    # shared experts, q/k/v biases, q/k norms, RoPE on half of each head (tests/engine/test_moe.py: more)
    "glm4-moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.0,
                      attention_bias=True, use_qk_norm=True)),
}


def build(name: str, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    # Eager attention: the reference implementation. Gemma 2's soft-capped scores are skipped by SDPA, the
    # default of some transformers versions (the GPU machine's: its Gemma 2 greedy tokens were not ours).
    model = getattr(transformers, model_cls)._from_config(config, attn_implementation="eager")
    model = model.eval().to(torch.float32)
    with torch.no_grad():  # norms and biases off their init, so a weight under the wrong name shows
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.normal_(0.0 if "gemma" in name else 1.0, 0.2)
            elif pname.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            hf = build(name)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path, safe_serialization=True)
            cache[name] = (hf, path, load_model(path, dtype=torch.float32))
        return cache[name]

    return get


def fresh(hf):
    """transformers' dynamic and longrope RoPE keep state between calls: each reference gets a new copy."""
    return copy.deepcopy(hf)


def hf_logits(hf, prompt):
    with torch.no_grad():
        return fresh(hf)(torch.tensor([prompt])).logits[0]


def our_logits(model, prompt, block_size=4):
    n_blocks = -(-len(prompt) // block_size)
    meta = AttentionMetadata.build([len(prompt)], [len(prompt)], [list(range(1, n_blocks + 1))[::-1]], block_size)
    shape = (n_blocks + 1, block_size, model.config.num_key_value_heads, model.config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.config.num_hidden_layers)]
    return model(torch.tensor(prompt), meta.positions(), meta, caches, logits_indices=torch.arange(len(prompt)))


def test_configs_read_the_family_flags(family):
    mistral = load_config(family("mistral")[1])
    assert (mistral.sliding_window, mistral.sliding_layers) == (5, (0, 1))
    gemma2 = load_config(family("gemma2")[1])
    assert gemma2.sliding_layers == (0,) and gemma2.attn_logit_softcap == 2.0 and gemma2.final_logit_softcap == 3.0
    assert gemma2.norm_offset and gemma2.sandwich_norms and gemma2.hidden_act == "gelu_pytorch_tanh"
    assert gemma2.attention_scale == 24 ** -0.5 and gemma2.embed_scale == 64 ** 0.5
    gemma3 = load_config(family("gemma3")[1])
    assert gemma3.qk_norm and gemma3.local_rope_theta == 100.0 and gemma3.attn_logit_softcap is None
    assert gemma3.rope_theta == 10000.0 and gemma3.rope_scaling["rope_type"] == "linear"
    phi3 = load_config(family("phi3")[1])
    assert phi3.fused_checkpoint and phi3.fuse_qkv and phi3.rotary_dim == 8 and phi3.rope_scaling["rope_type"] == "longrope"
    assert phi3.rope_scaling["original_max_position_embeddings"] == 40
    qwen2 = load_config(family("qwen2-dynamic")[1])
    assert (qwen2.sliding_window, qwen2.sliding_layers) == (6, (1,))


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(family, name):
    hf, _, ours = family(name)
    # past every threshold: the 5/6-token windows, yarn's 8, dynamic's 16 (longrope's 40: the test below)
    expected = hf_logits(hf, PROMPT)
    torch.testing.assert_close(our_logits(ours, PROMPT), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_transformers(family, name):
    hf, _, ours = family(name)
    expected = hf_greedy(fresh(hf), PROMPT, NEW_TOKENS)
    assert len(set(expected)) > 1, "degenerate reference: the comparison would prove little"
    assert greedy_generate(ours, [PROMPT], NEW_TOKENS) == [expected]


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_windows_in_chunked_and_mixed_batches(family, name):
    """A prefill chunk that starts mid-window and decode rows beside it see exactly their own windows."""
    hf, _, ours = family(name)
    prompts = [PROMPT, [5, 9, 200], PROMPT[3:]]
    singles = [hf_greedy(fresh(hf), p, NEW_TOKENS) for p in prompts]
    assert greedy_generate(ours, prompts, NEW_TOKENS, chunk_size=7, block_size=3) == singles


def test_longrope_switches_to_long_factors_past_the_original_context(family):
    """A prompt longer than original_max_position_embeddings rotates with the long factors from the start.
    (transformers' Phi-3 recomputes its whole cache with them when generation crosses that length; we rotate
    only the tokens computed from then on: docs/engine.md.)"""
    hf, _, ours = family("phi3")
    long_prompt = PROMPT * 2 + PROMPT[:8]  # 46 > 40
    assert greedy_generate(ours, [long_prompt], 4) == [hf_greedy(fresh(hf), long_prompt, 4)]
    torch.testing.assert_close(our_logits(ours, long_prompt), hf_logits(hf, long_prompt), atol=1e-4, rtol=1e-4)


def _config(**d):
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    return ModelConfig.from_hf_dict({**base, **d})


def test_refusals_name_what_is_unsupported():
    with pytest.raises(UnsupportedModelError, match="'mrope'.*supported: default, linear"):
        _config(model_type="qwen2", rope_scaling={"type": "mrope", "mrope_section": [1, 1]})
    with pytest.raises(UnsupportedModelError, match="hidden_act 'relu2'"):
        _config(model_type="mistral", hidden_act="relu2")
    with pytest.raises(UnsupportedModelError, match="longrope.*short_factor"):
        _config(model_type="phi3", rope_scaling={"type": "longrope", "long_factor": [1.0]})
    with pytest.raises(UnsupportedModelError, match="'gemma3'.*not supported"):  # the vision-language wrapper
        _config(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"])
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        _config(model_type="gemma3_text", use_bidirectional_attention=True)


def test_old_style_config_keys():
    """Files written before transformers 5: Gemma 3's rope_local_base_freq / sliding_window_pattern, Phi-3's
    "su" scaling with original_max_position_embeddings at top level."""
    gemma3 = _config(model_type="gemma3_text", num_hidden_layers=6, rope_theta=1e6, rope_local_base_freq=1e4,
                     sliding_window=512, sliding_window_pattern=6, rope_scaling={"rope_type": "linear", "factor": 8})
    assert gemma3.sliding_layers == (0, 1, 2, 3, 4) and gemma3.local_rope_theta == 1e4
    assert gemma3.rope_theta == 1e6 and gemma3.rope_scaling == {"rope_type": "linear", "factor": 8}
    phi3 = _config(model_type="phi3", original_max_position_embeddings=4096, max_position_embeddings=131072,
                   rope_scaling={"type": "su", "short_factor": [1.0, 1.0], "long_factor": [2.0, 2.0]})
    assert phi3.rope_scaling["rope_type"] == "longrope"
    assert phi3.rope_scaling["original_max_position_embeddings"] == 4096
    qwen = _config(model_type="qwen2", sliding_window=4096, use_sliding_window=False)
    assert qwen.sliding_window is None and qwen.sliding_layers == ()
    assert json.dumps(phi3.rope_scaling)  # plain JSON, part of the weights' identity (model/weights.py)


# ------------------------------------------------------------------------------------------
# Sliding windows and soft-capping in the Triton paged-attention kernels, against the reference
# ------------------------------------------------------------------------------------------

# (window, softcap): a window shorter than a block, one longer than a kernel tile (64), soft-capping alone and with
# a window
MASKING = [(5, None), (70, None), (None, 1.5), (9, 2.0)]


def test_triton_windows_and_softcap_in_the_interpreter():
    """The interpreter must be on before Triton is first imported, so these run in a child pytest."""
    run_interpreted_tests(__file__, timeout=900)


def _check_masked_attention(dtype, group, block_size, q_lens, ctx, window, softcap, device="cpu", d=16):
    from tests.engine.test_fused import TOL, _attention_case
    from understudy.engine.layers.attention import reference_attention, store_kv
    from understudy.engine.layers.triton_attention import fast_attention

    torch.manual_seed(group * block_size + len(q_lens) + (window or 0))
    q, k, v, kc, vc, meta = _attention_case(dtype, group, block_size, q_lens, ctx, device, d=d)
    q = q * 3  # scores large enough for the soft-cap to bite
    store_kv(k, v, kc, vc, meta.slot_mapping)  # the model's RoPE step stores them (fused.rope_and_store)
    kc2, vc2 = kc.clone(), vc.clone()
    scale = d ** -0.5
    masking = dict(sliding_window=window, softcap=softcap)
    ref = reference_attention(q, k, v, kc, vc, meta, scale, **masking)
    out = fast_attention(q, k, v, kc2, vc2, meta, scale, prefill_kernel=True, **masking)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    plain = reference_attention(q, k, v, kc.clone(), vc.clone(), meta, scale)
    assert not torch.allclose(plain, ref, **TOL[dtype])  # the masking did act


# each masking once, over GQA groups 1 / 3 / 4, blocks of 4 and 16 tokens, fp32 and fp16, and a head size the
# kernels pad (24 -> 32, as Phi-3-mini's 96 -> 128) (the interpreter is slow)
@pytest.mark.parametrize("window,softcap,group,block_size,dtype,d", [
    (5, None, 3, 4, torch.float32, 16), (70, None, 1, 16, torch.float32, 16), (None, 1.5, 4, 16, torch.float32, 16),
    (9, 2.0, 3, 4, torch.float16, 16), (9, None, 2, 16, torch.float32, 24)])
def test_interpreted_prefill_kernel_windows_and_softcap(dtype, group, block_size, window, softcap, d):
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_windows_and_softcap_in_the_interpreter")
    # a mixed batch (prefill over a cached prefix, a decode row, whole prompts) and a prefill past one tile
    for q_lens, ctx in (([4, 1, 17, 30], [4, 20, 17, 100]), ([70, 3], [90, 200])):
        _check_masked_attention(dtype, group, block_size, q_lens, ctx, window, softcap, d=d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("window,softcap", MASKING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_lens,ctx", [([1, 1, 1], [1, 17, 300]), ([4, 1, 17, 30], [4, 20, 17, 100]),
                                        ([4, 9], [3000, 1500])])
@pytest.mark.parametrize("d", [128, 96])
def test_cuda_kernels_windows_and_softcap(dtype, q_lens, ctx, window, softcap, d):
    _check_masked_attention(dtype, 4, 16, q_lens, ctx, window, softcap, device="cuda", d=d)


@pytest.mark.parametrize("per_token", [False, True])
def test_interpreted_rope_kernel_partial_scaled_per_token(per_token):
    """The Triton RoPE with partial rotary (Phi-4-mini), yarn / longrope's mscale, per-token frequencies."""
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_windows_and_softcap_in_the_interpreter")
    from understudy.engine.layers import fused

    torch.manual_seed(1)
    T, D, R = 5, 32, 16
    q, k = torch.randn(T, 4, D), torch.randn(T, 2, D)
    positions = torch.tensor([0, 3, 17, 40, 41])
    inv_freq = torch.rand(T, R // 2) if per_token else torch.rand(R // 2)
    got = fused._apply_rope_triton(q, k, positions, inv_freq, 1.25)
    want = fused.apply_rope_ref(q, k, positions, inv_freq, 1.25)
    for g, w, x in zip(got, want, (q, k)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert torch.equal(g[..., R:], x[..., R:])  # the dims past the rotary ones pass through


def test_interpreted_gemma_norm_and_gelu_kernels():
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_windows_and_softcap_in_the_interpreter")
    from understudy.engine.layers import fused

    from tests.engine.test_fused import TOL

    torch.manual_seed(2)
    for dtype in (torch.float32, torch.float16):
        x, r, w = torch.randn(7, 96, dtype=dtype) * 3, torch.randn(7, 96, dtype=dtype), torch.randn(96, dtype=dtype)
        torch.testing.assert_close(fused._rms_norm_triton(x, w, 1e-6, offset=True),
                                   fused.offset_rms_norm_ref(x, w, 1e-6), **TOL[dtype])
        normed, res = fused._add_rms_norm_triton(x, r, w, 1e-6, offset=True)
        torch.testing.assert_close(res, r + x, **TOL[dtype])
        torch.testing.assert_close(normed, fused.offset_rms_norm_ref(r + x, w, 1e-6), **TOL[dtype])
        g, u = torch.randn(3, 1000, dtype=dtype) * 4, torch.randn(3, 1000, dtype=dtype)
        torch.testing.assert_close(fused._silu_and_mul_triton(g, u, gelu=True),
                                   fused.gelu_tanh_and_mul_ref(g, u), **TOL[dtype])


@pytest.mark.parametrize("name", ["gemma3", "phi3", "qwen2-dynamic"])
def test_interpreted_kernels_in_the_family_models(monkeypatch, family, name):
    """The whole forward with every fused op on the Triton path: Gemma's norms and GELU, per-layer RoPE,
    partial rotary with mscale, per-token (dynamic) frequencies."""
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_windows_and_softcap_in_the_interpreter")
    from understudy.engine.layers import fused

    _, _, model = family(name)
    ref = our_logits(model, PROMPT)
    monkeypatch.setattr(fused, "_use_triton", lambda x: True)
    torch.testing.assert_close(our_logits(model, PROMPT), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_graphs_and_triton_give_transformers_greedy_tokens(family, name):
    """Each family through the whole CUDA path (fused kernels, Triton decode + prefill attention, graphs)."""
    from understudy.engine.core.kv_cache import KVCache, KVSpec
    from understudy.engine.core.llm_engine import EngineLimits, LLMEngine
    from understudy.engine.core.sampling import SamplingParams
    from understudy.engine.layers.triton_attention import attention_for
    from understudy.engine.model.decoder import CausalLM
    from understudy.engine.model.loader import iter_weights

    hf, path, _ = family(name)
    config = load_config(path)
    with torch.device("meta"):
        model = CausalLM(config, attention_for("triton"))
    model.load_weights(iter_weights(path, torch.float32), device="cuda")
    spec = KVSpec.for_budget(config, 16 << 20, 16, torch.float32)
    engine = LLMEngine(model, KVCache.local(spec, "cuda"), limits=EngineLimits(max_num_seqs=4, max_model_len=64),
                       device="cuda")
    engine.enable_cuda_graphs()
    prompts = [PROMPT, PROMPT[5:]]
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    assert outs == [hf_greedy(fresh(hf), p, NEW_TOKENS) for p in prompts]

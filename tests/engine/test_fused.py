"""fused.py: the reference path against transformers, the Triton kernels against the reference.

Three groups:
  * reference (CPU): bit-for-bit what transformers computes; dispatch keeps CPU tensors there;
    the module imports and runs without Triton.
  * interpreter (CPU): the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (skipped
    when Triton is not installed). The interpreter rounds fp32->bf16 by truncation, not to
    nearest even as the GPU does, so bf16 gets a one-ulp tolerance here.
  * cuda: the compiled kernels against the reference, and inside a captured CUDA graph.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from understudy.engine.layers import fused
from tests.helpers.interpreter import INTERPRETING, run_interpreted_tests

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tolerances of the Triton path against the reference: fp32 differs only in the order of
# the sum (and RoPE rounds once instead of four times), the half types by about an ulp.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inv_freq(head_dim: int, theta: float = 500000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _rope_truth(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE in fp64 from the same fp32 angles (what the kernel approximates with one rounding)."""
    ang = (positions.float()[:, None] * inv_freq.float()[None, :]).double()
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x = x.double()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ------------------------------------------------------------------------------------------
# reference path (CPU)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_transformers_bit_for_bit(dtype):
    from transformers.models.llama import modeling_llama as hf

    torch.manual_seed(0)
    T, H, D, hidden = 5, 4, 16, 64
    x = torch.randn(T, hidden, dtype=dtype)
    r = torch.randn(T, hidden, dtype=dtype)
    norm = hf.LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(hidden, dtype=dtype)
    assert torch.equal(fused.rms_norm(x, norm.weight.data, 1e-5), norm(x))
    normed, res = fused.add_rms_norm(x, r, norm.weight.data, 1e-5)
    assert torch.equal(res, r + x) and torch.equal(normed, norm(r + x))

    q, k = torch.randn(T, H, D, dtype=dtype), torch.randn(T, 2, D, dtype=dtype)
    positions = torch.tensor([0, 1, 7, 300, 4095])
    inv_freq = _inv_freq(D, 10000.0)
    # transformers: cos/sin [1, T, D] from the batched matmul, applied to [1, H, T, D]
    freqs = (inv_freq[None, :, None] @ positions.float()[None, None, :]).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    hq, hk = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    oq, ok = fused.apply_rope(q, k, positions, inv_freq)
    assert torch.equal(oq, hq[0].transpose(0, 1)) and torch.equal(ok, hk[0].transpose(0, 1))

    g, u = torch.randn(T, 96, dtype=dtype), torch.randn(T, 96, dtype=dtype)
    assert torch.equal(fused.silu_and_mul(g, u), torch.nn.functional.silu(g) * u)


def test_cpu_tensors_never_reach_triton(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("Triton path taken for a CPU tensor")

    for name in ("_rms_norm_triton", "_add_rms_norm_triton", "_apply_rope_triton", "_silu_and_mul_triton"):
        monkeypatch.setattr(fused, name, boom)
    x = torch.randn(2, 8)
    fused.rms_norm(x, torch.ones(8), 1e-6)
    fused.add_rms_norm(x, x, torch.ones(8), 1e-6)
    fused.apply_rope(torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.arange(2), _inv_freq(8))
    fused.silu_and_mul(x, x)


def test_engine_imports_and_runs_without_triton():
    src = Path(__file__).resolve().parents[2] / "src"
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        f"sys.path.insert(0, {str(src)!r})\n"
        "import torch\n"
        "from understudy.engine.layers import fused\nfrom understudy.engine.model import decoder as model\n"
        "assert not fused.triton_available()\n"
        "x = torch.randn(3, 8)\n"
        "assert fused.rms_norm(x, torch.ones(8), 1e-6).shape == (3, 8)\n"
        "assert fused.silu_and_mul(x, x).shape == (3, 8)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (CPU)
# ------------------------------------------------------------------------------------------


# The kernels in Triton's interpreter: a child pytest (tests/helpers/interpreter.py).
def test_triton_kernels_in_the_interpreter():
    run_interpreted_tests(__file__, timeout=900)


@pytest.fixture
def interpreted(monkeypatch):
    """fused's Triton launchers on CPU tensors, with the kernels interpreted."""
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_kernels_in_the_interpreter")
    from understudy.engine.layers import _fused_kernels

    monkeypatch.setattr(fused, "_KERNELS", _fused_kernels)
    return _fused_kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 4096), (3, 4096), (7, 96), (40, 128), (5, 80)])
def test_interpreted_rms_norm(interpreted, dtype, rows, cols):
    torch.manual_seed(rows * cols)
    x = torch.randn(rows, cols, dtype=dtype) * 3
    r = torch.randn(rows, cols, dtype=dtype)
    w = torch.randn(cols, dtype=dtype)
    torch.testing.assert_close(fused._rms_norm_triton(x, w, 1e-6), fused.rms_norm_ref(x, w, 1e-6), **TOL[dtype])
    normed, res = fused._add_rms_norm_triton(x, r, w, 1e-6)
    ref_normed, ref_res = fused.add_rms_norm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(res, ref_res, **TOL[dtype])
    if dtype != torch.bfloat16:  # the interpreter's bf16 rounding is not the GPU's
        assert torch.equal(res, ref_res)
    torch.testing.assert_close(normed, ref_normed, **TOL[dtype])


def test_interpreted_rms_norm_over_heads(interpreted):
    # Qwen3's q_norm/k_norm: [T, heads, head_dim], normalized per head.
    x = torch.randn(3, 5, 32)
    w = torch.randn(32)
    out = fused._rms_norm_triton(x, w, 1e-6)
    assert out.shape == x.shape
    torch.testing.assert_close(out, fused.rms_norm_ref(x, w, 1e-6), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,hq,hkv,D", [(1, 32, 8, 128), (5, 8, 2, 64), (3, 4, 4, 16), (2, 6, 2, 80)])
def test_interpreted_rope(interpreted, dtype, T, hq, hkv, D):
    torch.manual_seed(T * D)
    q = torch.randn(T, hq, D, dtype=dtype)
    k = torch.randn(T, hkv, D, dtype=dtype)
    positions = torch.randint(0, 131072, (T,))
    positions[0] = 0
    inv_freq = _inv_freq(D)
    q0, k0 = q.clone(), k.clone()
    oq, ok = fused._apply_rope_triton(q, k, positions, inv_freq)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # out of place
    # against the truth rounded once; the reference rounds cos/sin and each product too
    torch.testing.assert_close(oq, _rope_truth(q, positions, inv_freq).to(dtype), **TOL[dtype])
    torch.testing.assert_close(ok, _rope_truth(k, positions, inv_freq).to(dtype), **TOL[dtype])
    if dtype == torch.float32:
        rq, rk = fused.apply_rope_ref(q, k, positions, inv_freq)
        torch.testing.assert_close(oq, rq, **TOL[dtype])
        torch.testing.assert_close(ok, rk, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 14336), (3, 1000), (7,)])
def test_interpreted_silu_and_mul(interpreted, dtype, shape):
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=dtype) * 4
    u = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(fused._silu_and_mul_triton(g, u), fused.silu_and_mul_ref(g, u), **TOL[dtype])


@pytest.mark.parametrize("gelu", [False, True])
def test_interpreted_silu_and_mul_reads_the_halves_of_a_fused_output_in_place(interpreted, gelu):
    """MLP.forward chunks gate_up_proj's [T, 2I] output: the kernel reads both halves as strided views."""
    torch.manual_seed(0)
    gate, up = (torch.randn(5, 2 * 300) * 4).chunk(2, dim=-1)
    assert not gate.is_contiguous()
    ref = fused.gelu_tanh_and_mul_ref(gate, up) if gelu else fused.silu_and_mul_ref(gate, up)
    torch.testing.assert_close(fused._silu_and_mul_triton(gate, up, gelu=gelu), ref, **TOL[torch.float32])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_interpreted_kernels_in_the_model(interpreted, monkeypatch, hf_model_dir, family):
    """The whole forward with every fused op on the Triton path (wiring: residual stream, q/k norm)."""
    from understudy.engine.layers.attention import AttentionMetadata
    from understudy.engine.model.loader import load_model

    _, path = hf_model_dir(family)
    model = load_model(path, dtype=torch.float32)
    prompt = [17, 200, 3, 99, 45, 45, 128]
    meta = AttentionMetadata.build([len(prompt)], [len(prompt)], [[5, 1]], block_size=4)

    def run():
        caches = [(torch.zeros(6, 4, 2, model.config.head_dim), torch.zeros(6, 4, 2, model.config.head_dim))
                  for _ in range(model.config.num_hidden_layers)]
        logits = model(torch.tensor(prompt), meta.positions(), meta, caches, torch.arange(len(prompt)))
        return logits, caches

    ref_logits, ref_caches = run()
    monkeypatch.setattr(fused, "_use_triton", lambda x: True)
    logits, caches = run()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for (k, v), (rk, rv) in zip(caches, ref_caches):
        torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)


def _attention_case(dtype, group, block_size, q_lens, ctx, device="cpu", hkv=2, d=16):
    """Random caches, queries and new K/V for sequences with these new-token and context lengths (their
    blocks disjoint), and the metadata."""
    from understudy.engine.layers.attention import AttentionMetadata

    per_seq = [-(-c // block_size) for c in ctx]
    perm = (torch.randperm(sum(per_seq) + 3) + 1).tolist()  # block 0 stays reserved
    tables = [perm[sum(per_seq[:i]):sum(per_seq[:i + 1])] for i in range(len(ctx))]
    num_blocks = max(perm) + 1
    kc = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    vc = torch.randn_like(kc)
    T = sum(q_lens)
    q = torch.randn(T, hkv * group, d, dtype=dtype, device=device)
    k, v = torch.randn(T, hkv, d, dtype=dtype, device=device), torch.randn(T, hkv, d, dtype=dtype, device=device)
    return q, k, v, kc, vc, AttentionMetadata.build(q_lens, ctx, tables, block_size, device=device)


# a mixed batch (a short prefill over a cached prefix, as after a failover, a decode, whole prompts); a
# prefill longer than one program's tile of query tokens. (A decode batch, one new token per sequence, goes to
# the decode kernel.)
PREFILL_BATCHES = [([4, 1, 17, 30], [4, 20, 17, 100]), ([70, 3], [90, 200])]
DECODE_BATCH = ([1, 1, 1], [1, 17, 40])


def _check_fast_attention(dtype, group, block_size, q_lens, ctx, device="cpu", d=16):
    from understudy.engine.layers.attention import reference_attention, store_kv
    from understudy.engine.layers.triton_attention import fast_attention

    torch.manual_seed(group * block_size + len(q_lens))
    q, k, v, kc, vc, meta = _attention_case(dtype, group, block_size, q_lens, ctx, device, d=d)
    store_kv(k, v, kc, vc, meta.slot_mapping)  # the model's RoPE step stores them (fused.rope_and_store)
    kc2, vc2 = kc.clone(), vc.clone()
    scale = q.shape[-1] ** -0.5
    ref = reference_attention(q, k, v, kc, vc, meta, scale)
    out = fast_attention(q, k, v, kc2, vc2, meta, scale, prefill_kernel=True)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # attention only reads the caches
    torch.testing.assert_close(out, ref, **TOL[dtype])


# The interpreter's tl.dot on bf16 gives garbage (numpy has no bf16); the GPU runs bf16 (test below).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,block_size", [(1, 16), (4, 16), (3, 4)])
@pytest.mark.parametrize("q_lens,ctx", PREFILL_BATCHES + [DECODE_BATCH])
def test_interpreted_paged_attention_matches_the_reference(interpreted, dtype, group, block_size, q_lens, ctx):
    _check_fast_attention(dtype, group, block_size, q_lens, ctx)


def _fp8_caches(kc, vc, kw: dict):
    """The caches in FP8 with k_scale 0.5 and v_scale 2.0 (added to the attention call's kw)."""
    from understudy.engine.layers.attention import FP8_KV, to_cache

    kw.update(k_scale=0.5, v_scale=2.0)
    return to_cache(kc * 2, FP8_KV, 0.5), to_cache(vc * 2, FP8_KV, 2.0)


def _check_prefill_configs(dtype, group, d, q_lens, ctx, device="cpu", fp8=False, **kw):
    """Every config prefill_config may pick, on one case, against the reference. fp8: an FP8 cache (k_scale
    0.5, v_scale 2.0); kw: sliding_window, softcap."""
    from understudy.engine.layers.attention import reference_attention
    from understudy.engine.layers.triton_attention import PREFILL_CONFIGS, paged_prefill_attention

    torch.manual_seed(group * d + sum(q_lens))
    q, k, v, kc, vc, meta = _attention_case(dtype, group, 16, q_lens, ctx, device, d=d)
    kc, vc = _fp8_caches(kc, vc, kw) if fp8 else (kc, vc)
    ref = reference_attention(q, k, v, kc, vc, meta, d ** -0.5, **kw)
    for _, config in PREFILL_CONFIGS:
        out = paged_prefill_attention(q, kc, vc, meta, d ** -0.5, config=config, **kw)
        torch.testing.assert_close(out, ref, **TOL[dtype], msg=lambda m: f"{config}: {m}")


# Cases that cross each config's tiles: a prompt of several programs' query tokens and key tiles (the causal
# diagonal within and across tiles, the unmasked tiles before it), a chunk after a cached prefix (context >
# query), the mixed-step layout with a decode row; GQA groups 1, 4 and 8; head_dim 64, 128 and 24 (padded).
PREFILL_CONFIG_CASES = [(1, 64, [150], [150]), (4, 128, [100], [260]), (8, 64, [3, 1, 16, 40], [3, 50, 16, 200]),
                        (4, 24, [70, 5], [70, 90])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,d,q_lens,ctx", PREFILL_CONFIG_CASES)
def test_interpreted_prefill_configs_match_the_reference(interpreted, dtype, group, d, q_lens, ctx):
    _check_prefill_configs(dtype, group, d, q_lens, ctx)


# An FP8 cache; a sliding window shorter than a program's query tokens (masked tiles only) and one longer
# (unmasked tiles between the window's edge and the diagonal), with soft-capped scores (Gemma 2).
@pytest.mark.parametrize("kw", [dict(fp8=True), dict(sliding_window=7), dict(sliding_window=100, softcap=2.0)])
def test_interpreted_prefill_configs_fp8_window_softcap(interpreted, kw):
    _check_prefill_configs(torch.float32, 4, 64, [150, 20], [180, 20], **kw)


def _check_split_decode(dtype, group, ctx, splits, split_tokens, device="cpu", d=16, fp8=False, **kw):
    """The decode kernel with each (sequence, kv head)'s context split over `splits` programs against the
    reference, twice over (the split counters must be back at zero for the second launch). fp8: an FP8 cache
    (k_scale 0.5, v_scale 2.0); kw: sliding_window, softcap."""
    from understudy.engine.layers.attention import reference_attention
    from understudy.engine.layers.triton_attention import _SPLIT_COUNTERS, paged_decode_attention

    torch.manual_seed(len(ctx) * splits + split_tokens)
    q, k, v, kc, vc, meta = _attention_case(dtype, group, 16, [1] * len(ctx), ctx, device, d=d)
    kc, vc = _fp8_caches(kc, vc, kw) if fp8 else (kc, vc)
    ref = reference_attention(q, k, v, kc, vc, meta, d ** -0.5, **kw)
    for _ in range(2):
        out = paged_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, d ** -0.5, splits=splits,
                                     split_tokens=split_tokens, **kw)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        assert not _SPLIT_COUNTERS[q.device].any()


# Contexts of one tile, of a split's minimum and of many tiles (uneven runs: 300 keys in tiles of 64 over 4
# splits), GQA groups 1 and 4, more splits asked than the context can fill.
SPLIT_DECODE_CASES = [(4, [1, 31, 32, 300], 4, 32), (1, [700, 64], 16, 64), (4, [129], 3, 16)]


# ... and an FP8 cache, sliding windows that start inside the first split and past it, soft-capped scores, a
# head of 24 (padded to 32: its padded columns are neither stored nor merged).
SPLIT_DECODE_KW = [dict(fp8=True), dict(sliding_window=90), dict(sliding_window=200, softcap=2.0), dict(d=24)]


@pytest.mark.parametrize("dtype,group,ctx,splits,split_tokens,kw",
                         [(dtype, *case, {}) for dtype in (torch.float32, torch.float16) for case in SPLIT_DECODE_CASES]
                         + [(torch.float32, 4, [300, 5], 4, 32, kw) for kw in SPLIT_DECODE_KW])
def test_interpreted_split_decode_matches_the_reference(interpreted, dtype, group, ctx, splits, split_tokens, kw):
    _check_split_decode(dtype, group, ctx, splits, split_tokens, **kw)


def _check_split_prefill(dtype, group, d, q_lens, ctx, splits, split_tokens, device="cpu", fp8=False, **kw):
    """The prefill kernel, every config, with each program's keys split over `splits` programs, against the
    reference, twice over (the split counters back at zero after each). fp8, kw: as _check_prefill_configs.
    The reference runs in fp32 and is rounded once: in fp16 its own roundings were as far from that as the
    tolerance (a case with soft-capped scores, on an H200), and both kernels compute in fp32."""
    from understudy.engine.layers.attention import reference_attention
    from understudy.engine.layers.triton_attention import PREFILL_CONFIGS, _SPLIT_COUNTERS, paged_prefill_attention

    torch.manual_seed(group * d + sum(q_lens) + splits)
    q, k, v, kc, vc, meta = _attention_case(dtype, group, 16, q_lens, ctx, device, d=d)
    kc, vc = _fp8_caches(kc, vc, kw) if fp8 else (kc, vc)
    wide = (lambda t: t) if fp8 else (lambda t: t.float())
    ref = reference_attention(q.float(), k.float(), v.float(), wide(kc), wide(vc), meta, d ** -0.5, **kw).to(dtype)
    for _, config in PREFILL_CONFIGS:
        for _ in range(2):
            out = paged_prefill_attention(q, kc, vc, meta, d ** -0.5, config=config, splits=splits,
                                          split_tokens=split_tokens, **kw)
            torch.testing.assert_close(out, ref, **TOL[dtype], msg=lambda m: f"{config}: {m}")
            assert not _SPLIT_COUNTERS[q.device].any()


# A short chunk over a long cached prefix (the case splitting is for: a follow-up turn), a whole prompt (on its
# causal diagonal a split can hold keys that some of a program's rows do not see yet: those rows weigh nothing
# in that split), a mixed step with decode rows and a context shorter than one split; uneven runs, more splits
# asked than the keys fill.
SPLIT_PREFILL_CASES = [(4, 64, [20], [700], 4, 64), (1, 64, [150], [150], 3, 32),
                       (4, 32, [1, 9, 1], [300, 9, 1], 16, 32)]
SPLIT_PREFILL_KW = [dict(fp8=True), dict(sliding_window=90), dict(sliding_window=200, softcap=2.0)]


@pytest.mark.parametrize("dtype,group,d,q_lens,ctx,splits,split_tokens,kw",
                         [(dtype, *case, {}) for dtype in (torch.float32, torch.float16)
                          for case in SPLIT_PREFILL_CASES]
                         + [(torch.float32, 4, 24, [30, 2], [400, 70], 4, 32, kw) for kw in SPLIT_PREFILL_KW])
def test_interpreted_split_prefill_matches_the_reference(interpreted, dtype, group, d, q_lens, ctx, splits,
                                                         split_tokens, kw):
    _check_split_prefill(dtype, group, d, q_lens, ctx, splits, split_tokens, **kw)


def test_split_decode_refuses_more_pairs_than_its_counters():
    from understudy.engine.layers.triton_attention import MAX_SPLIT_PAIRS, _split_counters

    with pytest.raises(ValueError, match=f"at most {MAX_SPLIT_PAIRS}"):
        _split_counters(torch.device("cpu"), MAX_SPLIT_PAIRS + 1)


def test_split_count_fills_the_gpu_only_for_small_launches():
    from understudy.engine.layers.triton_attention import MAX_PREFILL_SPLITS, MAX_SPLITS, split_count

    assert split_count(8, torch.device("cpu")) == 1  # the interpreter: no multiprocessors to fill
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cuda = torch.device("cuda", 0)
        for batch in (1, 4, 16):
            splits = split_count(batch * 8, cuda)
            assert splits & (splits - 1) == 0 and splits <= MAX_SPLITS  # a power of two
            assert splits == MAX_SPLITS or splits * batch * 8 >= 1.4 * sms  # about two programs per multiprocessor
        assert split_count(sms, cuda) == 1
        assert split_count(16, cuda, MAX_PREFILL_SPLITS) == MAX_PREFILL_SPLITS  # a prefill's cap (16 on an H200)


# ------------------------------------------------------------------------------------------
# compiled kernels (CUDA)
# ------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,block_size", [(1, 16), (4, 16), (8, 32), (3, 16)])
@pytest.mark.parametrize("q_lens,ctx", [([1, 1, 1], [1, 17, 40])] + PREFILL_BATCHES + [([4, 9], [3000, 1500])])
def test_cuda_paged_attention_matches_the_reference(dtype, group, block_size, q_lens, ctx):
    _check_fast_attention(dtype, group, block_size, q_lens, ctx, device="cuda", d=128)


# The split counts split_count gives a decode batch of 1 on an H200 (16), with contexts from one tile to 8000 keys.
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,ctx,splits,split_tokens", SPLIT_DECODE_CASES + [(4, [8000, 1, 257, 2048], 16, 128)])
@pytest.mark.parametrize("kw", [{}, dict(fp8=True), dict(sliding_window=1000, softcap=30.0)])
def test_cuda_split_decode_matches_the_reference(dtype, group, ctx, splits, split_tokens, kw):
    _check_split_decode(dtype, group, ctx, splits, split_tokens, device="cuda", d=128, **kw)


# The split count split_count gives a 64-token chunk on an H200 (8), and 16 (more than it gives a prefill).
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,d,q_lens,ctx,splits,split_tokens", SPLIT_PREFILL_CASES
                         + [(4, 128, [64], [8000], 8, 128), (4, 128, [16, 1, 40], [4000, 3000, 40], 16, 128)])
@pytest.mark.parametrize("kw", [{}, dict(fp8=True), dict(sliding_window=1000, softcap=30.0)])
def test_cuda_split_prefill_matches_the_reference(dtype, group, d, q_lens, ctx, splits, split_tokens, kw):
    _check_split_prefill(dtype, group, d, q_lens, ctx, splits, split_tokens, device="cuda", **kw)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,d,q_lens,ctx", PREFILL_CONFIG_CASES + [(4, 128, [1500], [1500]),
                                                                       (8, 128, [1100, 7], [3000, 40])])
@pytest.mark.parametrize("kw", [{}, dict(fp8=True), dict(sliding_window=100, softcap=2.0)])
def test_cuda_prefill_configs_match_the_reference(dtype, group, d, q_lens, ctx, kw):
    _check_prefill_configs(dtype, group, d, q_lens, ctx, device="cuda", **kw)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 4096), (7, 4096), (33, 4096), (5, 5120), (96, 128), (13, 80)])
def test_cuda_rms_norm(dtype, rows, cols):
    assert fused._use_triton(torch.empty(1, device="cuda"))
    torch.manual_seed(rows + cols)
    x = torch.randn(rows, cols, dtype=dtype, device="cuda") * 3
    r = torch.randn(rows, cols, dtype=dtype, device="cuda")
    w = torch.randn(cols, dtype=dtype, device="cuda")
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), fused.rms_norm_ref(x, w, 1e-6), **TOL[dtype])
    normed, res = fused.add_rms_norm(x, r, w, 1e-6)
    ref_normed, ref_res = fused.add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(res, ref_res)  # one rounding of the sum, as torch
    torch.testing.assert_close(normed, ref_normed, **TOL[dtype])
    heads = x.view(rows, -1, 64) if cols % 64 == 0 else x.view(rows, 1, cols)  # per-head norm (Qwen3)
    torch.testing.assert_close(fused.rms_norm(heads, w[: heads.shape[-1]], 1e-6),
                               fused.rms_norm_ref(heads, w[: heads.shape[-1]], 1e-6), **TOL[dtype])


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,hq,hkv,D", [(1, 32, 8, 128), (7, 32, 8, 128), (33, 16, 2, 64), (3, 12, 4, 64),
                                        (5, 8, 8, 80), (129, 28, 4, 128)])
def test_cuda_rope(dtype, T, hq, hkv, D):
    torch.manual_seed(T * D)
    q = torch.randn(T, hq, D, dtype=dtype, device="cuda")
    k = torch.randn(T, hkv, D, dtype=dtype, device="cuda")
    positions = torch.randint(0, 131072, (T,), device="cuda")
    positions[0] = 0
    inv_freq = _inv_freq(D).cuda()
    oq, ok = fused.apply_rope(q, k, positions, inv_freq)
    torch.testing.assert_close(oq, _rope_truth(q, positions, inv_freq).to(dtype), **TOL[dtype])
    torch.testing.assert_close(ok, _rope_truth(k, positions, inv_freq).to(dtype), **TOL[dtype])
    rq, rk = fused.apply_rope_ref(q, k, positions, inv_freq)
    loose = dict(rtol=TOL[dtype]["rtol"] * 2, atol=TOL[dtype]["atol"] * 2)  # the reference rounds 4 times
    torch.testing.assert_close(oq, rq, **loose)
    torch.testing.assert_close(ok, rk, **loose)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 14336), (7, 14336), (33, 11008), (3, 1000)])
def test_cuda_silu_and_mul(dtype, shape):
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=dtype, device="cuda") * 4
    u = torch.randn(shape, dtype=dtype, device="cuda")
    torch.testing.assert_close(fused.silu_and_mul(g, u), fused.silu_and_mul_ref(g, u), **TOL[dtype])
    gate, up = (torch.randn(shape[0], 2 * shape[-1], dtype=dtype, device="cuda") * 4).chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(gate, up), fused.silu_and_mul_ref(gate, up), **TOL[dtype])


@cuda_only
def test_cuda_kernels_replay_in_a_graph():
    torch.manual_seed(0)
    dtype, T, hidden, hq, hkv, D = torch.bfloat16, 4, 4096, 32, 8, 128
    x = torch.randn(T, hidden, dtype=dtype, device="cuda")
    r = torch.randn_like(x)
    w = torch.randn(hidden, dtype=dtype, device="cuda")
    q = torch.randn(T, hq, D, dtype=dtype, device="cuda")
    k = torch.randn(T, hkv, D, dtype=dtype, device="cuda")
    pos = torch.arange(T, device="cuda")
    inv_freq = _inv_freq(D).cuda()
    g = torch.randn(T, 14336, dtype=dtype, device="cuda")
    u = torch.randn_like(g)

    def step():
        return (fused.rms_norm(x, w, 1e-5), *fused.add_rms_norm(x, r, w, 1e-5),
                *fused.apply_rope(q, k, pos, inv_freq), fused.silu_and_mul(g, u))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs = step()
    torch.cuda.current_stream().wait_stream(stream)
    for t in (x, r, q, k, g, u):  # new inputs in place, then replay
        t.copy_(torch.randn_like(t))
    pos.copy_(torch.tensor([5, 0, 1000, 77777], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@cuda_only
def test_cuda_disabled_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(fused, "_ENABLED", False)
    assert not fused._use_triton(torch.empty(1, device="cuda"))
    x = torch.randn(3, 64, device="cuda")
    assert torch.equal(fused.rms_norm(x, torch.ones(64, device="cuda"), 1e-6),
                       fused.rms_norm_ref(x, torch.ones(64, device="cuda"), 1e-6))



def _argmax_cases(device: str):
    """Rows with ties (the first index wins), a NaN (torch's argmax picks it), -inf everywhere, +inf, the
    largest value in the last and the first chunk, and a width off the kernel's chunks."""
    torch.manual_seed(0)
    x = torch.randn(7, 10000, device=device)
    x[0, [17, 4100, 9999]] = 50.0  # ties across chunks
    x[1, [5000, 300]] = float("nan")
    x[1, 7] = 1e30
    x[2] = float("-inf")
    x[3, 8191] = float("inf")
    x[4, 9999] = 9.0
    x[5, 0] = 9.0
    x[6, 4096:4100] = 7.0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreted_argmax_is_torchs(interpreted, dtype):
    x = _argmax_cases("cpu").to(dtype)
    assert torch.equal(fused._argmax_triton(x), x.argmax(dim=-1))
    assert torch.equal(fused._argmax_triton(x[:, 3:4000]), x[:, 3:4000].argmax(dim=-1))  # strided rows


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_argmax_is_torchs(dtype):
    x = _argmax_cases("cuda").to(dtype)
    assert torch.equal(fused.argmax(x), x.argmax(dim=-1))
    wide = torch.randn(3, 128256, device="cuda", dtype=dtype)  # a Llama-3 vocabulary
    assert torch.equal(fused.argmax(wide), wide.argmax(dim=-1))
    assert torch.equal(fused.argmax(wide[:, 1:]), wide[:, 1:].argmax(dim=-1))

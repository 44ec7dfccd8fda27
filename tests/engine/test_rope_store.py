"""fused.rope_and_store: a layer's q/k norms, RoPE and KV-cache store in one Triton kernel, against the reference
path (the norms, apply_rope_ref, attention.store_kv one after the other), in Triton's interpreter on the CPU.
The whole models through it: test_fused.py / test_families.py / test_step_graphs.py (interpreted), and
test_cuda_paths.py on a GPU."""

from __future__ import annotations

import pytest
import torch

from understudy.engine.layers import fused
from understudy.engine.layers.attention import FP8_KV, store_kv, to_cache
from tests.helpers.interpreter import INTERPRETING, run_interpreted_tests

BLOCKS, BLOCK_SIZE = 5, 4


def _case(dtype, D=16, R=None, hq=4, hkv=2, per_token=False, norm=None, cache_dtype=None, seed=0):
    """q, k, v of 6 tokens (two of them padding, slot -1), their positions and frequencies, a cache full of
    random values, and the keyword arguments of rope_and_store."""
    g = torch.Generator().manual_seed(seed)
    T, R = 6, R or D
    q = torch.randn(T, hq, D, generator=g).to(dtype) * 2
    k = torch.randn(T, hkv, D, generator=g).to(dtype) * 2
    v = torch.randn(T, hkv, D, generator=g).to(dtype) * 2
    positions = torch.tensor([0, 5, 17, 3, 900, 41])
    inv_freq = torch.rand(T, R // 2, generator=g) if per_token else 1.0 / 10000.0 ** (torch.arange(0, R, 2) / R)
    slots = torch.tensor([7, -1, 0, 19, -1, 12])
    cache_dtype = cache_dtype or dtype
    kc = (torch.randn(BLOCKS, BLOCK_SIZE, hkv, D, generator=g) * 3).to(cache_dtype)
    vc = (torch.randn(BLOCKS, BLOCK_SIZE, hkv, D, generator=g) * 3).to(cache_dtype)
    kwargs = dict(k_scale=0.5, v_scale=2.0) if cache_dtype == FP8_KV else {}
    if norm is not None:
        kwargs.update(q_norm=torch.randn(D, generator=g).to(dtype), k_norm=torch.randn(D, generator=g).to(dtype),
                      eps=1e-6, offset=norm == "offset")
    return q, k, v, positions, inv_freq, kc, vc, slots, kwargs


def raw(x):
    """FP8 as bytes (bit-for-bit comparisons; torch compares few ops on float8)."""
    return x.view(torch.uint8) if x.dtype == FP8_KV else x


def flat(cache):
    """A cache [blocks, block_size, heads, D] as [slots, heads, D]."""
    return raw(cache).flatten(0, 1)


def test_reference_path_is_norm_rope_then_store_bit_for_bit():
    """Off CUDA rope_and_store is what the model ran before it existed: q/k norm, apply_rope, store_kv."""
    q, k, v, positions, inv_freq, kc, vc, slots, kw = _case(torch.float32, norm="plain")
    kc0, vc0 = kc.clone(), vc.clone()
    oq, ok = fused.rope_and_store(q, k, v, positions, inv_freq, 1.25, kc, vc, slots, **kw)
    nq, nk = fused.rms_norm_ref(q, kw["q_norm"], 1e-6), fused.rms_norm_ref(k, kw["k_norm"], 1e-6)
    rq, rk = fused.apply_rope_ref(nq, nk, positions, inv_freq, 1.25)
    assert torch.equal(oq, rq) and torch.equal(ok, rk)
    store_kv(rk, v, kc0, vc0, slots)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


def test_rope_store_in_the_interpreter():
    run_interpreted_tests(__file__, timeout=600)


@pytest.fixture
def interpreted(monkeypatch):
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_rope_store_in_the_interpreter")
    from understudy.engine.layers import _fused_kernels

    monkeypatch.setattr(fused, "_KERNELS", _fused_kernels)


# The interpreter rounds fp32 -> bf16 by truncation (the GPU to nearest even): bf16 within an ulp or two.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}


CASES = [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16),
         (torch.float32, FP8_KV), (torch.float16, FP8_KV)]


@pytest.mark.parametrize("dtype,cache_dtype", CASES)
@pytest.mark.parametrize("norm", [None, "plain", "offset"])
@pytest.mark.parametrize("D,R,per_token", [(16, 16, False), (32, 16, True), (24, 24, False)])
def test_interpreted_rope_store_matches_the_reference(interpreted, dtype, cache_dtype, norm, D, R, per_token):
    """Norms (Qwen3's, Gemma's 1 + w), partial rotary (Phi), per-token frequencies, a head size that is not a
    power of two (24, as Phi-3-mini's 96), bf16 / fp32 / FP8 caches; padded tokens (slot -1) store nothing."""
    _check_against_the_reference(dtype, cache_dtype, norm, D, R, per_token, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,cache_dtype", CASES + [(torch.bfloat16, FP8_KV)])
@pytest.mark.parametrize("norm", [None, "plain", "offset"])
@pytest.mark.parametrize("D,R,per_token", [(128, 128, False), (96, 64, True)])
def test_cuda_rope_store_matches_the_reference(monkeypatch, dtype, cache_dtype, norm, D, R, per_token):
    monkeypatch.setattr(fused, "_ENABLED", False)  # rope_and_store on CUDA tensors: the reference path
    _check_against_the_reference(dtype, cache_dtype, norm, D, R, per_token, "cuda")


def _check_against_the_reference(dtype, cache_dtype, norm, D, R, per_token, device):
    case = _case(dtype, D, R, per_token=per_token, norm=norm, cache_dtype=cache_dtype, seed=D + R)
    q, k, v, positions, inv_freq, kc, vc, slots = (x.to(device) for x in case[:-1])
    kw = {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in case[-1].items()}
    ref_kc, ref_vc = kc.clone(), vc.clone()
    rq, rk = fused.rope_and_store(q, k, v, positions, inv_freq, 1.25, ref_kc, ref_vc, slots, **kw)  # reference
    kc0, vc0 = kc.clone(), vc.clone()
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    oq, ok = fused._rope_and_store_triton(q, k, v, positions, inv_freq, 1.25, kc, vc, slots,
                                          kw.get("k_scale", 1.0), kw.get("v_scale", 1.0), kw.get("q_norm"),
                                          kw.get("k_norm"), 1e-6, norm == "offset")
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)  # inputs untouched
    torch.testing.assert_close(oq, rq, **TOL[dtype])
    torch.testing.assert_close(ok, rk, **TOL[dtype])
    if norm is None:  # the dims past the rotary ones pass through unchanged
        assert torch.equal(oq[..., R:], q[..., R:]) and torch.equal(ok[..., R:], k[..., R:])
    stored = slots[slots >= 0]
    ks, vs = kw.get("k_scale", 1.0), kw.get("v_scale", 1.0)
    # the kernel's cache holds its own k, cast as store_kv casts (FP8: / scale, saturated), and v exactly so
    # (but for the interpreter's fp32 -> bf16 truncation)
    exact = device == "cuda" or kc.dtype != torch.bfloat16 or dtype == torch.bfloat16
    same = torch.equal if exact else (lambda a, b: torch.testing.assert_close(a, b, **TOL[torch.bfloat16]) is None)
    assert same(flat(kc)[stored], raw(to_cache(ok[slots >= 0], kc.dtype, ks)))
    assert same(flat(vc)[stored], raw(to_cache(v[slots >= 0], vc.dtype, vs)))
    assert same(flat(vc), flat(ref_vc))
    if kc.dtype != FP8_KV:  # (FP8's coarse rounding can turn an ulp of k into a step of the cache)
        torch.testing.assert_close(kc, ref_kc, **TOL[kc.dtype])
    # every other slot, the padded tokens' included, is untouched
    others = torch.ones(BLOCKS * BLOCK_SIZE, dtype=torch.bool, device=device)
    others[stored] = False
    assert torch.equal(flat(kc)[others], flat(kc0)[others]) and torch.equal(flat(vc)[others], flat(vc0)[others])
    assert not torch.equal(flat(kc)[stored], flat(kc0)[stored])  # and the stored ones were written


def test_interpreted_fp8_cache_saturates(interpreted):
    """Keys past 448 * k_scale are stored as +-448, never as NaN (to_cache's clamp)."""
    q, k, v, positions, inv_freq, kc, vc, slots, _ = _case(torch.float32, cache_dtype=FP8_KV)
    k, v = k * 1000, v * 1000
    _, ok = fused._rope_and_store_triton(q, k, v, positions, inv_freq, 1.0, kc, vc, slots, 0.5, 1.0, None, None,
                                         1e-6, False)
    stored = slots[slots >= 0]
    kf, vf = kc.view(-1, 2, 16)[stored].float(), vc.view(-1, 2, 16)[stored].float()
    assert not kf.isnan().any() and kf.abs().max() == 448 and vf.abs().max() == 448
    assert torch.equal(kf, to_cache(ok[slots >= 0], FP8_KV, 0.5).float())


def test_interpreted_fp8_cache_rounds_as_torch(interpreted):
    """Values over e4m3's whole range, its subnormals and exact ties between two of its values (to even): the
    cached bytes are torch's."""
    q, k, v, positions, inv_freq, kc, vc, slots, _ = _case(torch.float32, cache_dtype=FP8_KV)
    g = torch.Generator().manual_seed(3)
    mags = 2.0 ** (torch.rand(v.shape, generator=g) * 21 - 12)  # 2**-12 .. 2**9 (saturating above 448)
    v = torch.where(torch.rand(v.shape, generator=g) < 0.5, -mags, mags)
    ties = torch.tensor([1.0625, 1.1875, 3.0 * 2 ** -10, 5.0 * 2 ** -10, 2 ** -7 + 2 ** -10, 0.0, -0.0, 464.0])
    v[:, 0, :ties.numel()] = ties
    fused._rope_and_store_triton(q, k, v, positions, inv_freq, 1.0, kc, vc, slots, 1.0, 1.0, None, None, 1e-6, False)
    stored = slots[slots >= 0]
    assert torch.equal(flat(vc)[stored], raw(to_cache(v[slots >= 0], FP8_KV, 1.0)))

"""Triton kernels behind fused.py (imported by it on first use on a CUDA tensor).

Kept apart so that importing the engine never imports Triton. Under
TRITON_INTERPRET=1 (set before Triton is first imported; tests/engine/test_fused.py
runs a child pytest so) these kernels run on CPU tensors.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from understudy.engine.layers._pdl_kernels import wait_prior

try:
    from triton.language.extra import libdevice
except ImportError:  # an older Triton: tl.cos/tl.sin only
    libdevice = None

# The interpreter has no libdevice. On the GPU, libdevice's sin/cos reduce the
# argument in full precision (RoPE angles reach 1e5 rad at long context), where a
# hardware approximation would drift.
PRECISE_TRIG = libdevice is not None and os.environ.get("TRITON_INTERPRET", "0").lower() in ("", "0", "false", "off")


@triton.jit
def rms_norm(X, R, W, Y, RO, n_rows, n_cols, stride_x, stride_r, stride_y, stride_ro, eps,
             HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET: tl.constexpr = False,
             PDL: tl.constexpr = False):
    """Y = W * rmsnorm(X [+ R]) over BLOCK_M rows; with R, also RO = X + R (the new residual).
    OFFSET (Gemma): Y = rmsnorm(X) * (1 + W), all in fp32."""
    wait_prior(PDL)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # residual + x in the stream's dtype: one rounding, as torch does
        x = (r.to(tl.float32) + x.to(tl.float32)).to(RO.dtype.element_ty)
        tl.store(RO + rows[:, None] * stride_ro + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) / n_cols
    rstd = tl.rsqrt(var + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0)
    if OFFSET:
        y = xf * rstd[:, None] * (1.0 + w.to(tl.float32)[None, :])
    else:
        normed = (xf * rstd[:, None]).to(x.dtype)  # cast back before scaling, as transformers does
        y = w.to(tl.float32)[None, :] * normed.to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_heads(X, O, t, h0, n_heads, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin, d, d_ok,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = h0 + tl.arange(0, BLOCK_H)
    mask = (heads < n_heads)[:, None] & d_ok[None, :]
    src = X + t * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = O + t * stride_ot + heads[:, None] * stride_oh + d[None, :]
    # x * cat(cos, cos) + cat(-x2, x1) * cat(sin, sin), in fp32, rounded once
    tl.store(dst, (x1 * cos - x2 * sin).to(O.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(freqs, PRECISE: tl.constexpr):
    """cos and sin of fp32 angles: libdevice's (PRECISE) or the fast approximations."""
    if PRECISE:
        cos = libdevice.cos(freqs)
        sin = libdevice.sin(freqs)
    else:
        cos = tl.cos(freqs)
        sin = tl.sin(freqs)
    return cos, sin


@triton.jit
def rope(Q, K, QO, KO, POS, INV_FREQ, stride_ft, mscale, n_q_heads, n_k_heads,
         stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
         HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, PRECISE: tl.constexpr,
         PDL: tl.constexpr = False):
    """Grid (tokens, q head blocks + k head blocks). cos/sin come from the position, in fp32, times mscale.
    INV_FREQ is one row for all tokens (stride_ft 0) or one per token; dims past 2 * HALF are not written."""
    wait_prior(PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    pos = tl.load(POS + t).to(tl.float32)
    cos, sin = _cos_sin(pos * tl.load(INV_FREQ + t * stride_ft + d, mask=d_ok, other=0.0), PRECISE)
    cos = cos[None, :] * mscale
    sin = sin[None, :] * mscale
    q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if hb < q_blocks:
        _rope_heads(Q, QO, t, hb * BLOCK_H, n_q_heads, stride_qt, stride_qh, stride_qot, stride_qoh,
                    cos, sin, d, d_ok, HALF, BLOCK_H)
    else:
        _rope_heads(K, KO, t, (hb - q_blocks) * BLOCK_H, n_k_heads, stride_kt, stride_kh, stride_kot, stride_koh,
                    cos, sin, d, d_ok, HALF, BLOCK_H)


@triton.jit
def silu_mul(G, U, O, n, n_cols, stride_g, stride_u, BLOCK: tl.constexpr, GELU: tl.constexpr = False,
PDL: tl.constexpr = False):
    """O = silu(G) * U over n elements, rows of n_cols (O contiguous; G and U rows `stride_*` apart, so the
    two halves of a fused gate_up output are read in place); GELU: gelu_tanh(G) * U (Gemma)."""
    wait_prior(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    row = offs // n_cols
    col = offs - row * n_cols
    g = tl.load(G + row * stride_g + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(O + offs, gated(g, u, O.dtype.element_ty, GELU), mask=ok)


@triton.jit
def gated(g, u, dtype, GELU: tl.constexpr):
    """silu(g) * u (GELU: gelu_tanh(g) * u) of fp32 values, rounded as torch rounds the two ops in `dtype`:
    the activation, then the product. silu_mul's, and the gate_up GEMV's epilogue's (_fp8_kernels GATED):
    both give the same bits."""
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) * (g + 0.044715 g^3)
        e = tl.exp(-2.0 * tl.abs(inner))  # tanh without overflow
        tanh = tl.where(inner >= 0, (1.0 - e) / (1.0 + e), (e - 1.0) / (1.0 + e))
        act = (0.5 * g * (1.0 + tanh)).to(dtype)
    else:
        act = (g / (1.0 + tl.exp(-g))).to(dtype)
    return (act.to(tl.float32) * u).to(dtype)


@triton.jit
def _norm_rope_rows(X, W, t, heads, stride_xt, stride_xh, d, d_ok, partner, rot, cos, ssin, eps, head_dim,
                    mask, NORM: tl.constexpr, OFFSET: tl.constexpr):
    """Heads [BLOCK_H, BLOCK_D] of token t, RMS-normalized by W (NORM), then rotated in fp32: dims < 2 * HALF
    turn against their partner (the other half's), the rest pass through. Returns fp32, not yet rounded."""
    src = X + t * stride_xt + heads[:, None] * stride_xh
    x = tl.load(src + d[None, :], mask=mask, other=0.0)
    xp = tl.load(src + partner[None, :], mask=mask, other=0.0)  # the same row again: cached
    if NORM:
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / head_dim + eps)[:, None]
        w = tl.load(W + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(W + partner, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        # each value rounded to the model dtype as the separate norm's output is (rms_norm above)
        if OFFSET:
            x = (xf * rstd * (1.0 + w)).to(x.dtype)
            xp = (xp.to(tl.float32) * rstd * (1.0 + wp)).to(x.dtype)
        else:
            x = (w * (xf * rstd).to(x.dtype).to(tl.float32)).to(x.dtype)
            xp = (wp * (xp.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)).to(x.dtype)
    xf = x.to(tl.float32)
    return tl.where(rot[None, :], xf * cos + xp.to(tl.float32) * ssin, xf)


@triton.jit
def _round_e4m3(x):
    """fp32 x (|x| <= 448) rounded to nearest even on float8 e4m3's grid, still in fp32: the cast that follows
    is then exact, the same on the GPU as torch's and in Triton's interpreter (whose own rounding drops the
    carry into the exponent)."""
    bits = x.to(tl.uint32, bitcast=True)
    # normals: keep 3 of the 23 mantissa bits, the carry running into the exponent
    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    # below 2**-6 (subnormals of e4m3): multiples of 2**-9, by adding and taking away 2**14, whose ulp that is
    sub = ((tl.abs(x) + 16384.0) - 16384.0).to(tl.uint32, bitcast=True) | (bits & 0x80000000)  # x's sign, -0 too
    return tl.where(tl.abs(x) >= 0.015625, normal, sub).to(tl.float32, bitcast=True)


@triton.jit
def _to_cache(x, scale, CACHE_FP8: tl.constexpr, dtype: tl.constexpr):
    """attention.to_cache: FP8 caches hold x / scale saturated at +-448; others x in their dtype."""
    if CACHE_FP8:
        x = tl.div_rn(x.to(tl.float32), tl.zeros_like(x.to(tl.float32)) + scale)  # IEEE, as torch (`/`: ~2 ulp)
        x = _round_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0))
    return x.to(dtype)


@triton.jit
def rope_store(Q, K, V, QO, KO, KC, VC, SLOTS, POS, INV_FREQ, QW, KW, stride_ft, mscale, k_scale, v_scale, eps,
               n_q_heads, n_k_heads, head_dim, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
               stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs, stride_ch, stride_vcs, stride_vch,
               HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, PRECISE: tl.constexpr,
               NORM: tl.constexpr, OFFSET: tl.constexpr, CACHE_FP8: tl.constexpr, PDL: tl.constexpr = False):
    """`rope` plus what comes before and after it in a layer. Grid (tokens, q head blocks + kv head blocks).
    q heads: [RMS-normalize by QW (NORM; OFFSET: Gemma's 1 + w)], rotate, write to QO. kv heads: k the same
    (KW), written to KO and to the key cache KC at SLOTS[t]; v written unchanged to the value cache VC there.
    A slot < 0 (a padded token) writes no cache. Whole heads (BLOCK_D >= head_dim): dims past 2 * HALF pass
    through (partial rotary)."""
    wait_prior(PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    rot = d < 2 * HALF
    first = d < HALF
    partner = tl.where(first, d + HALF, tl.where(rot, d - HALF, d))
    pos = tl.load(POS + t).to(tl.float32)
    freqs = pos * tl.load(INV_FREQ + t * stride_ft + tl.where(first, d, d - HALF), mask=rot, other=0.0)
    cos, sin = _cos_sin(freqs, PRECISE)
    # x * cat(cos, cos) + cat(-x2, x1) * cat(sin, sin): the first half takes -sin times its partner
    cos = (cos * mscale)[None, :]
    ssin = tl.where(first, -sin, sin)[None, :] * mscale
    q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if hb < q_blocks:
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads < n_q_heads)[:, None] & d_ok[None, :]
        q = _norm_rope_rows(Q, QW, t, heads, stride_qt, stride_qh, d, d_ok, partner, rot, cos, ssin, eps, head_dim,
                            mask, NORM, OFFSET)
        tl.store(QO + t * stride_qot + heads[:, None] * stride_qoh + d[None, :], q.to(QO.dtype.element_ty), mask=mask)
    else:
        heads = (hb - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads < n_k_heads)[:, None] & d_ok[None, :]
        k = _norm_rope_rows(K, KW, t, heads, stride_kt, stride_kh, d, d_ok, partner, rot, cos, ssin, eps, head_dim,
                            mask, NORM, OFFSET).to(KO.dtype.element_ty)  # the new k, rounded as the cache sees it
        tl.store(KO + t * stride_kot + heads[:, None] * stride_koh + d[None, :], k, mask=mask)
        slot = tl.load(SLOTS + t)
        stored = mask & (slot >= 0)
        tl.store(KC + slot * stride_cs + heads[:, None] * stride_ch + d[None, :],
                 _to_cache(k, k_scale, CACHE_FP8, KC.dtype.element_ty), mask=stored)
        v = tl.load(V + t * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
        tl.store(VC + slot * stride_vcs + heads[:, None] * stride_vch + d[None, :],
                 _to_cache(v, v_scale, CACHE_FP8, VC.dtype.element_ty), mask=stored)


@triton.jit
def argmax_chunks(X, MaxOut, IdxOut, NanOut, n_cols, stride_x, CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
                  PDL: tl.constexpr = False):
    """Program (row, c): the largest value of columns [c*BLOCK, (c+1)*BLOCK) of X's row, the first column
    holding it, and the first NaN's column (n_cols where none): argmax_rows combines the chunks."""
    wait_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    v = tl.load(X + row * stride_x + cols, mask=ok, other=float("-inf")).to(tl.float32)
    nan = (v != v) & ok
    top = tl.max(tl.where(nan, float("-inf"), v), 0)
    first = tl.min(tl.where(ok & (v == top), cols, n_cols), 0)
    tl.store(MaxOut + row * CHUNKS + c, top)
    tl.store(IdxOut + row * CHUNKS + c, first)
    tl.store(NanOut + row * CHUNKS + c, tl.min(tl.where(nan, cols, n_cols), 0))


@triton.jit
def argmax_rows(MaxIn, IdxIn, NanIn, Out, n_cols, CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
                PDL: tl.constexpr = False):
    """Out[row]: torch.argmax of the row from its chunks: the first NaN if there is one, else the first
    column of the largest value (chunks are in column order, so the smallest index wins a tie)."""
    wait_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < CHUNKS
    top = tl.load(MaxIn + row * CHUNKS + c, mask=ok, other=float("-inf"))
    idx = tl.load(IdxIn + row * CHUNKS + c, mask=ok, other=n_cols)
    nan = tl.min(tl.load(NanIn + row * CHUNKS + c, mask=ok, other=n_cols), 0)
    best = tl.max(top, 0)
    first = tl.min(tl.where(ok & (top == best), idx, n_cols), 0)
    tl.store(Out + row, tl.where(nan < n_cols, nan, first).to(tl.int64))

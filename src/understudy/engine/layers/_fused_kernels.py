"""Triton kernels behind fused.py (imported by it on first use on a CUDA tensor).

Kept apart so that importing the engine never imports Triton. Under
TRITON_INTERPRET=1 (set before Triton is first imported; tests/engine/test_fused.py
runs a child pytest so) these kernels run on CPU tensors.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

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
             HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET: tl.constexpr = False):
    """Y = W * rmsnorm(X [+ R]) over BLOCK_M rows; with R, also RO = X + R (the new residual).
    OFFSET (Gemma): Y = rmsnorm(X) * (1 + W), all in fp32."""
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
def rope(Q, K, QO, KO, POS, INV_FREQ, stride_ft, mscale, n_q_heads, n_k_heads,
         stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
         HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, PRECISE: tl.constexpr):
    """Grid (tokens, q head blocks + k head blocks). cos/sin come from the position, in fp32, times mscale.
    INV_FREQ is one row for all tokens (stride_ft 0) or one per token; dims past 2 * HALF are not written."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    pos = tl.load(POS + t).to(tl.float32)
    freqs = pos * tl.load(INV_FREQ + t * stride_ft + d, mask=d_ok, other=0.0)
    if PRECISE:
        cos = libdevice.cos(freqs)
        sin = libdevice.sin(freqs)
    else:
        cos = tl.cos(freqs)
        sin = tl.sin(freqs)
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
def silu_mul(G, U, O, n, n_cols, stride_g, stride_u, BLOCK: tl.constexpr, GELU: tl.constexpr = False):
    """O = silu(G) * U over n elements, rows of n_cols (O contiguous; G and U rows `stride_*` apart, so the
    two halves of a fused gate_up output are read in place); GELU: gelu_tanh(G) * U (Gemma)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    row = offs // n_cols
    col = offs - row * n_cols
    g = tl.load(G + row * stride_g + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + col, mask=ok, other=0.0).to(tl.float32)
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) * (g + 0.044715 g^3)
        e = tl.exp(-2.0 * tl.abs(inner))  # tanh without overflow
        tanh = tl.where(inner >= 0, (1.0 - e) / (1.0 + e), (e - 1.0) / (1.0 + e))
        act = (0.5 * g * (1.0 + tanh)).to(G.dtype.element_ty)
    else:
        act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty)  # silu(gate), rounded to its dtype like torch
    tl.store(O + offs, (act.to(tl.float32) * u).to(O.dtype.element_ty), mask=ok)

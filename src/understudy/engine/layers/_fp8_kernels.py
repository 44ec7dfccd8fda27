"""The Triton kernel behind layers/quant.py: a GEMM whose weights are FP8 with scales.

out[m, n] = sum_k x[m, k] * w[n, k] * scale(n, k) (+ bias[n]), where scale is one number (SCHEME 0, per
tensor), one per output row n (1, per channel) or one per block of SB_N x SB_K weights (2, e.g. 128 x 128).
The activations stay in their dtype (bf16/fp16/fp32) and each weight tile is widened to it in registers, so
the FP8 bytes are all that is read from memory: that is what makes decode (few rows, memory bound) fast.
Block scales apply to the partial sum of each K tile (BLOCK_K divides SB_K), per-tensor and per-channel
ones once at the end. Imported only where Triton is (quant.py imports it lazily, on CUDA or in tests).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp8_linear_kernel(X, W, S, B, Out, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_om, stride_sn,
                      SCHEME: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(X + rm[:, None].to(tl.int64) * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(W + rn[:, None].to(tl.int64) * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        part = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        if SCHEME == 2:
            s = tl.load(S + (rn // SB_N) * stride_sn + k0 // SB_K, mask=n_ok, other=0.0)
            acc += part * s[None, :]
        else:
            acc += part
    if SCHEME == 1:
        acc = acc * tl.load(S + rn, mask=n_ok, other=0.0)[None, :]
    if SCHEME == 0:
        acc = acc * tl.load(S)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def quantize_rows_kernel(X, Q, S, K, stride_x, stride_q, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr):
    """Per-token activation quantization for torch._scaled_mm: row m of X -> e4m3 Q[m] and its float32
    scale S[m] = max|X[m]| / 448 (one launch instead of torch's five small kernels)."""
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, 1e-12)
    q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
    tl.store(Q + row.to(tl.int64) * stride_q + k, q.to(Q.dtype.element_ty), mask=k < K)
    tl.store(S + row, scale)

"""The Triton kernels behind layers/quant.py: matmuls whose weights are FP8 with scales, and the GEMV
for unquantized (bf16/fp16) weights too.

out[m, n] = sum_k x[m, k] * w[n, k] * scale(n, k) (+ bias[n]), where scale is one number (SCHEME 0, per
tensor), one per output row n (1, per channel), one per block of SB_N x SB_K weights (2, e.g. 128 x 128)
or none at all (-1: the weights are unquantized, the GEMV only: layers/linear.py). The activations stay in
their dtype (bf16/fp16/fp32) and each weight tile is widened in registers, so the weight bytes (FP8, or
the model's dtype) are all that is read from memory: that is what makes decode (few rows, memory bound) fast.

  fp8_linear_kernel   a GEMM on tensor cores (tl.dot, tiles of >= 16 rows): prefill-sized batches.
  gemv_kernel         decode-sized batches (1..GEMV_MAX_M rows, quant.py; one row of unquantized weights,
                      linear.py): no tl.dot, every program owns BLOCK_N weight rows and a slice of K
                      (split-K), reads its weight tile once for all the rows, multiplies in fp32 registers
                      and sums over K; gemv_reduce_kernel adds the split-K partial sums.

Block scales apply to each K tile's partial sum (or to the activations of that tile), per-tensor and
per-channel ones once at the end, with the bias (_scale_and_bias). Imported only where Triton is (quant.py imports it lazily, on CUDA or in
tests).
"""

from __future__ import annotations

import triton
import triton.language as tl

from understudy.engine.layers._fused_kernels import gated
from understudy.engine.layers._pdl_kernels import wait_prior


@triton.jit
def _scale_and_bias(acc, S, B, n, n_ok, SCHEME: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The fp32 sums `acc` of output columns `n` (any shape acc broadcasts with: [1, BLOCK_N] against
    [BLOCK_M, BLOCK_N], or [BLOCK] alike) times their per-tensor (SCHEME 0) or per-channel (1) scale, plus
    the bias; block scales (2) were applied per K tile, unquantized weights (-1) have none."""
    if SCHEME == 1:
        acc = acc * tl.load(S + n, mask=n_ok, other=0.0)
    if SCHEME == 0:
        acc = acc * tl.load(S)
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _store_gated(Out, gate, up, rm, j, j_ok, m_ok, stride_om, GATED: tl.constexpr):
    """Out[m, j] = act(gate) * up (GATED 1 silu, 2 gelu_tanh) of a gate_up projection's finished sums, each
    rounded to Out's dtype first as the stored gate_up output would be: the bits of the projection then
    _fused_kernels.silu_mul."""
    dtype = Out.dtype.element_ty
    out = gated(gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32), dtype, GATED == 2)
    tl.store(Out + rm[:, None] * stride_om + j[None, :], out, mask=m_ok[:, None] & j_ok[None, :])


@triton.jit
def fp8_linear_kernel(X, W, S, B, Out, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_om, stride_sn,
                      SCHEME: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr, PDL: tl.constexpr = False):
    wait_prior(PDL)
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
    acc = _scale_and_bias(acc, S, B, rn[None, :], n_ok[None, :], SCHEME, HAS_BIAS)
    tl.store(Out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def quantize_rows_kernel(X, Q, S, K, stride_x, stride_q, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
PDL: tl.constexpr = False):
    """Per-token activation quantization for torch._scaled_mm: row m of X -> e4m3 Q[m] and its float32
    scale S[m] = max|X[m]| / 448 (one launch instead of torch's five small kernels)."""
    wait_prior(PDL)
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, 1e-12)
    q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
    tl.store(Q + row.to(tl.int64) * stride_q + k, q.to(Q.dtype.element_ty), mask=k < K)
    tl.store(S + row, scale)


@triton.jit
def gemv_kernel(X, W, S, B, Out, M, N, K, stride_xm, stride_wn, stride_om, stride_sn, stride_os,
                TILES: tl.constexpr, SCHEME: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                PARTIAL: tl.constexpr, GATED: tl.constexpr = 0, PDL: tl.constexpr = False):
    """Program (j, s): rows j*BLOCK_N.. of W against all M (<= BLOCK_M) rows of X over TILES tiles of
    BLOCK_K columns from s*TILES*BLOCK_K (what runs past K is masked off). PARTIAL: store the fp32 sum in
    Out[s] (block scales applied, no others, no bias: gemv_reduce_kernel finishes), else finish here.
    TILES is a constexpr: the interpreter takes no run-time loop bounds.

    Layout: each thread holds VEC consecutive k of a weight row (the warp's 32 threads side by side along
    K: one load instruction reads 32*VEC contiguous bytes of a row) and the x values of the same k, so the
    multiply needs no data movement between threads. VEC is the launcher's min(8, BLOCK_K / threads): x is
    loaded as a [1, BLOCK_K] bf16/fp16 row whose natural layout is exactly that (8 elements = 16 bytes per
    thread), and the max_contiguous hint gives the weight tile the same one (8 bytes per thread for FP8, 16
    for bf16/fp16 weights); with 16 FP8 bytes per thread the two layouts differ and Triton moves x through
    shared memory every iteration. SCHEME -1 (unquantized weights): S is not read.
    GATED (1 silu, 2 gelu_tanh; unquantized, per-tensor or per-channel weights): W is a gate_up projection
    (gate rows [0, N/2), up rows [N/2, N)) and Out gets act(gate) * up [M, N/2]: the program's rows are
    gate and up rows j, j + N/2 side by side, so its epilogue has both sums of each j (_store_gated).
    One row (BLOCK_M 1, batch-1 decode): products accumulate elementwise, summed across threads once at the
    end. More rows: each row's tile product is summed over K every iteration (warp shuffles), since one
    [BLOCK_N, BLOCK_K] accumulator per row would not fit in registers."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    if GATED:  # gate row j, up row j + N/2, the next j, ...
        half = N // 2
        j = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2
        rn = j + (tl.arange(0, BLOCK_N) % 2) * half
        n_ok = j < half
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
    w_rows = W + rn[:, None].to(tl.int64) * stride_wn
    wait_prior(PDL)
    # block scales: the launcher makes BLOCK_N divide SB_N, so the tile's rows share one row of blocks
    s_row = S + (pid_n * BLOCK_N // SB_N) * stride_sn
    if BLOCK_M == 1:
        acc_tile = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for i in range(0, TILES):
        k0 = (pid_k * TILES + i) * BLOCK_K
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_rows + tl.max_contiguous(k, VEC)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        if SCHEME == 2:
            if SB_K % BLOCK_K == 0:  # the tile lies in one block column: one scale
                s = tl.load(s_row + k0 // SB_K)
            else:
                s = tl.load(s_row + k[None, :] // SB_K, mask=k_ok[None, :], other=0.0)
        if BLOCK_M == 1:
            x = tl.load(X + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
            if SCHEME == 2:
                x = x * s
            acc_tile += w * x
        else:
            for m in tl.static_range(BLOCK_M):
                x = tl.load(X + m * stride_xm + k[None, :], mask=k_ok[None, :] & (m < M), other=0.0).to(tl.float32)
                if SCHEME == 2:
                    x = x * s
                part = tl.sum(w * x, 1)
                acc = tl.where(rm[None, :] == m, acc + part[:, None], acc)  # m is a constant: no select left
    if BLOCK_M == 1:
        acc = tl.sum(acc_tile, 1)[:, None]
    out = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    mask = (rm[:, None] < M) & n_ok[None, :]
    if PARTIAL:
        tl.store(Out + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :], out, mask=mask)
    else:
        out = _scale_and_bias(out, S, B, rn[None, :], n_ok[None, :], SCHEME, HAS_BIAS)
        if GATED:
            gate, up = tl.split(tl.reshape(out, [BLOCK_M, BLOCK_N // 2, 2]))
            jo = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            _store_gated(Out, gate, up, rm, jo, jo < N // 2, rm < M, stride_om, GATED)
        else:
            tl.store(Out + rm[:, None] * stride_om + rn[None, :], out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def gemv_reduce_kernel(P, S, B, Out, N, stride_ps, stride_pm, stride_om, SPLIT_K: tl.constexpr,
                       SCHEME: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, GATED: tl.constexpr = 0,
                       PDL: tl.constexpr = False):
    """Out[m, n] = scale(n) * sum over s of P[s, m, n] (+ bias[n]): the split-K partial sums of
    gemv_kernel added in split order (so the same inputs give the same bits), scaled, cast. GATED: columns
    n < N/2 are gate sums, n + N/2 their up sums, and Out[m, n] = act(gate) * up (gemv_kernel's GATED)."""
    wait_prior(PDL)
    m = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < (N // 2 if GATED else N)
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(P + s * stride_ps + m * stride_pm + n, mask=n_ok, other=0.0)
    acc = _scale_and_bias(acc, S, B, n, n_ok, SCHEME, HAS_BIAS)
    if GATED:
        up = tl.zeros([BLOCK], tl.float32)
        for s in tl.static_range(SPLIT_K):
            up += tl.load(P + s * stride_ps + m * stride_pm + N // 2 + n, mask=n_ok, other=0.0)
        up = _scale_and_bias(up, S, B, N // 2 + n, n_ok, SCHEME, HAS_BIAS)
        row = m + tl.zeros([1], tl.int64)
        _store_gated(Out, acc[None, :], up[None, :], row, n, n_ok, row >= 0, stride_om, GATED)
    else:
        tl.store(Out + m * stride_om + n, acc.to(Out.dtype.element_ty), mask=n_ok)

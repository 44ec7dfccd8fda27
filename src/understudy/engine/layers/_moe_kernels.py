"""Triton kernels behind moe.py (imported by it on first use on a CUDA tensor).

Large batches (moe._experts_grouped), two kernels:

  align        one program: counts the (token, k) slots routed to each expert, gives each expert a run of
               BLOCK_M-aligned rows, writes the slot ids into their expert's run (padding rows hold the
               sentinel n_slots) and, per block of rows, the expert it belongs to and how many rows are used.
  expert_gemm  a grouped GEMM over those blocks: each program takes one block of rows (all one expert's)
               and one tile of output columns, so an expert's weights are read once per block, whatever
               the batch. Used twice: gate_up (SiLU(gate) * up fused in its epilogue), then down (the
               routing weight applied in its epilogue).

Small batches (moe._experts_gemv, decode), no sorting, two launches of one of two kernel pairs:

  fma_gate_up   1-2 tokens (moe.GEMV_CONFIGS): a program per (token, k) slot and BLOCK_N rows of I; it reads
                those gate rows and the up rows that pair with them, K-contiguous in 16-byte loads, the K loop
                unrolled at compile time so every load can be in flight at once (no shared memory, no
                barrier until the final sum across K), and writes SiLU(gate) * up times the routing weight.
                Dot products on the CUDA cores: a token's row would fill 1 of a tensor-core tile's 16 rows.
  fma_down      a program per token and BLOCK_N rows of H: for each of its top-k experts a contiguous
                [BLOCK_N, I] strip of down, all unrolled likewise; the top-k sum in the fp32 accumulator, so no
                per-slot output and no separate sum.
  gemv_gate_up  the tensor-core pair (moe.MMA_GEMV: up to 16 tokens): a program per slot and tile of I; the
                first slot routed to an expert computes SiLU(gate) * up times the routing weight for every
                token that chose it (the others return), so tokens sharing an expert read it once.
  gemv_down     a program per token and tile of H, the top-k sum in the accumulator; tl.dot on 16 rows of
                which one is the token's, weights pipelined through shared memory over num_stages.

FP8 experts (W8A16): with SCHEME 1 (a scale per output row of each expert matrix) or 2 (a scale per block of
SB_N x SB_K weights, e.g. 128 x 128) the weights are read as float8 e4m3 and widened in registers (to the
activations' dtype for tl.dot, to fp32 in the fma kernels), so only their bytes come from memory. Block
scales multiply each K tile's partial sum (_wdot) or the widened tile (_widen); BLOCK_K divides SB_K, so a
tile lies in one block. Per-row scales multiply the sum once at the end (_row_scale, fma_gate_up), or in
fma_down, whose experts change along its loop, each expert's tiles. Scales are float32, accumulation fp32,
as for the bf16 weights. SCHEME 0: the weights as they are (bf16/fp16/fp32), S unused.

Every size the launcher needs is known on the host from the shapes alone (at most cdiv(n, BLOCK_M) + E
blocks); programs past the used blocks return at once. No host sync, so CUDA graphs can capture them.
Under TRITON_INTERPRET=1 they run on CPU tensors (tests/engine/test_moe.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from understudy.engine.layers._pdl_kernels import wait_prior


@triton.jit
def align(TOPK_IDS, SORTED, BLOCK_EXPERT, NUM_PADDED, CURSOR, n_slots, n_experts, max_blocks,
          BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr, BLOCKS_PER_PASS: tl.constexpr,
          PDL: tl.constexpr = False):
    """Sort the n_slots expert ids of TOPK_IDS (flat [T * top_k]) into BLOCK_M-aligned runs per expert."""
    wait_prior(PDL)
    bins = tl.arange(0, BINS)
    is_expert = bins < n_experts
    lane = tl.arange(0, CHUNK)
    # 1. slots per expert (ids past the end fall into bin n_experts, which is ignored)
    # (while loops, not range(): Triton's interpreter cannot take a runtime value as a range bound)
    counts = tl.zeros((BINS,), dtype=tl.int32)
    start = 0
    while start < n_slots:
        offs = start + lane
        ids = tl.load(TOPK_IDS + offs, mask=offs < n_slots, other=n_experts).to(tl.int32)
        counts += tl.histogram(ids, BINS)
        start += CHUNK
    padded = tl.where(is_expert, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, 0)
    tl.store(NUM_PADDED, tl.sum(padded, 0))
    tl.store(CURSOR + bins, ends - padded, mask=is_expert)  # where each expert's next slot goes
    # 2. the expert of each block of rows: how many experts' runs end at or before its first row
    b0 = 0
    while b0 < max_blocks:
        blocks = b0 + tl.arange(0, BLOCKS_PER_PASS)
        before = (ends[None, :] <= (blocks * BLOCK_M)[:, None]) & is_expert[None, :]
        tl.store(BLOCK_EXPERT + blocks, tl.sum(before.to(tl.int32), 1), mask=blocks < max_blocks)
        b0 += BLOCKS_PER_PASS
    # 3. padding rows hold the sentinel n_slots
    start = 0
    while start < max_blocks * BLOCK_M:
        offs = start + lane
        tl.store(SORTED + offs, tl.zeros((CHUNK,), dtype=tl.int32) + n_slots, mask=offs < max_blocks * BLOCK_M)
        start += CHUNK
    tl.debug_barrier()
    # 4. each slot goes to its expert's cursor plus its rank among the same expert's slots in this chunk
    start = 0
    while start < n_slots:
        offs = start + lane
        ok = offs < n_slots
        ids = tl.load(TOPK_IDS + offs, mask=ok, other=n_experts).to(tl.int32)
        same_before = (ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])
        rank = tl.sum(same_before.to(tl.int32), 1)
        base = tl.load(CURSOR + ids, mask=ok, other=0)
        tl.store(SORTED + base + rank, offs.to(tl.int32), mask=ok)
        tl.debug_barrier()
        cursor = tl.load(CURSOR + bins, mask=is_expert, other=0)
        tl.store(CURSOR + bins, cursor + tl.histogram(ids, BINS), mask=is_expert)
        tl.debug_barrier()
        start += CHUNK


@triton.jit
def _wdot(a, w, acc, s_rows, k0, col_ok, SCHEME: tl.constexpr, SB_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a . w for a weight tile w [BLOCK_K, BLOCK_N] starting at K index k0: as stored (SCHEME 0), or FP8
    widened to a's dtype in registers (e4m3 values are exact in bf16/fp16/fp32); SCHEME 2: the tile's partial
    sum times its block's scale (s_rows: the pointer to each column's row of block scales)."""
    if SCHEME == 0:
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    elif SCHEME == 1:
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    else:
        s = tl.load(s_rows + k0 // SB_K, mask=col_ok, other=0.0)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION) * s[None, :]
    return acc


@triton.jit
def _row_scale(acc, s_rows, col_ok, SCHEME: tl.constexpr):
    """SCHEME 1: each column of the fp32 sum times its weight row's scale (applied once, after the K loop)."""
    if SCHEME == 1:
        acc = acc * tl.load(s_rows, mask=col_ok, other=0.0)[None, :]
    return acc


@triton.jit
def expert_gemm(A, W, S, OUT, SORTED, BLOCK_EXPERT, NUM_PADDED, ROUTE_W, n_slots,
                stride_a, stride_we, stride_wn, stride_se, stride_sn, stride_out, N: tl.constexpr, K: tl.constexpr,
                TOP_K: tl.constexpr, GATED: tl.constexpr, A_PER_TOKEN: tl.constexpr, WEIGHTED: tl.constexpr,
                SCHEME: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                PDL: tl.constexpr = False):
    """OUT[slot, n] = A[row] . W[expert, n, :] for the slots of one block (row = slot // top_k when A holds
    one row per token). GATED: W's rows are [gate; up] (2N of them) and OUT = silu(gate) * up. WEIGHTED:
    OUT is scaled by the slot's routing weight ROUTE_W[slot]. Accumulates in fp32, rounds once. FP8 weights
    (SCHEME 1, 2): S[expert] holds their scales, row r's at (r // SB_N) * stride_sn (+ the K block).
    N, K and TOP_K are fixed for a model, so they are compile-time constants (a pipelined K loop)."""
    wait_prior(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M < tl.load(NUM_PADDED):
        slots = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        used = slots < n_slots
        if A_PER_TOKEN:
            rows = (slots // TOP_K).to(tl.int64)
        else:
            rows = slots.to(tl.int64)
        expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w_base = W + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn
        s_rows = S + expert * stride_se + (cols // SB_N).to(tl.int64) * stride_sn
        s_rows_up = S + expert * stride_se + ((cols + N) // SB_N).to(tl.int64) * stride_sn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(A + rows[:, None] * stride_a + ks[None, :], mask=used[:, None] & k_ok[None, :], other=0.0)
            w_ok = k_ok[:, None] & col_ok[None, :]
            w = tl.load(w_base + ks[:, None], mask=w_ok, other=0.0)  # [BLOCK_K, BLOCK_N]: W[e, cols, ks]^T
            acc = _wdot(a, w, acc, s_rows, k0, col_ok, SCHEME, SB_K, PRECISION)
            if GATED:
                w_up = tl.load(w_base + N * stride_wn + ks[:, None], mask=w_ok, other=0.0)
                acc_up = _wdot(a, w_up, acc_up, s_rows_up, k0, col_ok, SCHEME, SB_K, PRECISION)
        acc = _row_scale(acc, s_rows, col_ok, SCHEME)
        if GATED:
            acc_up = _row_scale(acc_up, s_rows_up, col_ok, SCHEME)
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if WEIGHTED:
            acc = acc * tl.load(ROUTE_W + slots, mask=used, other=0.0).to(tl.float32)[:, None]
        out = OUT + slots.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=used[:, None] & col_ok[None, :])


@triton.jit
def gemv_gate_up(X, W, S, HIDDEN, IDS, ROUTE_W, n_tokens, stride_x, stride_we, stride_wn, stride_se, stride_sn,
                 stride_h, N: tl.constexpr, K: tl.constexpr, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
                 SCHEME: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 PDL: tl.constexpr = False):
    """Small batches, no sorting: program (s, j) owns slot s = token * TOP_K + k if no earlier slot chose
    the same expert e, and computes columns j of HIDDEN[s'] = w[s'] * silu(x . gate_e) * (x . up_e) for
    every slot s' routed to e (a token picks an expert once, so at most n_tokens <= BLOCK_M rows): each
    selected expert's tile is read once, by one program. The routing weight is applied here, so the down
    kernel's sum over a token's slots is the block's output. Other programs return at once."""
    wait_prior(PDL)
    s = tl.program_id(0)
    pid_n = tl.program_id(1)
    tok = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, K_POW2)
    slot2d = tok[:, None] * TOP_K + kk[None, :]
    valid = (tok[:, None] < n_tokens) & (kk[None, :] < TOP_K)
    ids2d = tl.load(IDS + slot2d, mask=valid, other=-1)
    expert = tl.load(IDS + s)
    match = (ids2d == expert) & valid
    first = tl.min(tl.min(tl.where(match, slot2d, BLOCK_M * K_POW2), 1), 0)
    if first == s:
        slot_of = tl.sum(tl.where(match, slot2d, 0), 1)  # [BLOCK_M]: each token's slot routed to e
        used = tl.sum(match.to(tl.int32), 1) > 0
        rows = tok.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w_base = W + expert.to(tl.int64) * stride_we + cols.to(tl.int64)[None, :] * stride_wn
        s_rows = S + expert.to(tl.int64) * stride_se + (cols // SB_N).to(tl.int64) * stride_sn
        s_rows_up = S + expert.to(tl.int64) * stride_se + ((cols + N) // SB_N).to(tl.int64) * stride_sn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=used[:, None] & k_ok[None, :], other=0.0)
            w_ok = k_ok[:, None] & col_ok[None, :]
            w = tl.load(w_base + ks[:, None], mask=w_ok, other=0.0)  # [BLOCK_K, BLOCK_N]: W[e, cols, ks]^T
            acc = _wdot(a, w, acc, s_rows, k0, col_ok, SCHEME, SB_K, PRECISION)
            w_up = tl.load(w_base + N * stride_wn + ks[:, None], mask=w_ok, other=0.0)
            acc_up = _wdot(a, w_up, acc_up, s_rows_up, k0, col_ok, SCHEME, SB_K, PRECISION)
        acc = _row_scale(acc, s_rows, col_ok, SCHEME)
        acc_up = _row_scale(acc_up, s_rows_up, col_ok, SCHEME)
        route_w = tl.load(ROUTE_W + slot_of, mask=used, other=0.0).to(tl.float32)
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up * route_w[:, None]
        out = HIDDEN + slot_of.to(tl.int64)[:, None] * stride_h + cols[None, :]
        tl.store(out, acc.to(HIDDEN.dtype.element_ty), mask=used[:, None] & col_ok[None, :])


@triton.jit
def gemv_down(HIDDEN, W, S, OUT, IDS, stride_h, stride_we, stride_wn, stride_se, stride_sn, stride_out,
              N: tl.constexpr, K: tl.constexpr, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
              SCHEME: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False):
    """Small batches: program (t, j) writes columns j of OUT[t] = sum over k of HIDDEN[t * TOP_K + k] .
    W[ids[t, k]] (the routing weights are already in HIDDEN): the top-k sum in the fp32 accumulator, rounded
    once. One loop over (k, K-tile) pairs, so the loads stay pipelined across a token's experts. The dot's
    16 rows hold the token's one row and zeros (tl.dot wants 16); a batch of a few tokens is bound by the
    weights' bytes, not by the tensor cores. The experts change along the loop, so FP8 scales apply per K tile
    (SCHEME 2; the launcher passes per-row scales as blocks of one row by all K columns)."""
    wait_prior(PDL)
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = tl.arange(0, 16)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    K_TILES: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    kk = tl.arange(0, K_POW2)
    # the token's experts, loaded once: picking one in the loop is register work, so the weight loads' addresses
    # do not hang on a load in the loop (which the software pipeliner handles less well)
    experts = tl.load(IDS + t * TOP_K + kk, mask=kk < TOP_K, other=0).to(tl.int64)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for i in range(0, TOP_K * K_TILES):
        k = i // K_TILES
        ks = (i % K_TILES) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        expert = tl.sum(tl.where(kk == k, experts, 0), 0)
        a = tl.load(HIDDEN + (t * TOP_K + k) * stride_h + ks[None, :] + rows[:, None] * 0,
                    mask=(rows[:, None] == 0) & k_ok[None, :], other=0.0)
        w = tl.load(W + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        s_rows = S + expert * stride_se + (cols // SB_N).to(tl.int64) * stride_sn
        acc = _wdot(a, w, acc, s_rows, (i % K_TILES) * BLOCK_K, col_ok, SCHEME, SB_K, PRECISION)
    out = tl.sum(acc, 0)  # row 0 is the token's; the others are zeros
    tl.store(OUT + t * stride_out + cols, out.to(OUT.dtype.element_ty), mask=col_ok)


@triton.jit
def _widen(w, s_rows, k0, ok, SCHEME: tl.constexpr, SB_K: tl.constexpr):
    """A weight tile [rows, BLOCK_K] in fp32: FP8 widened, and for SCHEME 2 times its block's scale (s_rows:
    each row's scales; the tile lies in one block of columns)."""
    w = w.to(tl.float32)
    if SCHEME == 2:
        w = w * tl.load(s_rows + k0 // SB_K, mask=ok, other=0.0)[:, None]
    return w


@triton.jit
def fma_gate_up(X, W, S, HIDDEN, IDS, ROUTE_W, stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_h,
                N: tl.constexpr, K: tl.constexpr, TOP_K: tl.constexpr,
                SCHEME: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """One or two tokens (decode): program (s, j) computes HIDDEN[s, cols j] = w * silu(x . gate_e) * (x . up_e)
    for slot s = token * TOP_K + k and its expert e, on the CUDA cores (a token's dot products do not fill
    a tensor-core tile). It reads BLOCK_N gate rows and the BLOCK_N up rows that pair with them, K-contiguous,
    the whole K in a loop unrolled at compile time so that all its loads can be in flight at once; fp32
    products accumulate per element and are summed across K once, at the end. No deduplication: two tokens
    that chose one expert read it twice (the second time mostly from L2)."""
    wait_prior(PDL)
    s = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = s // TOP_K
    expert = tl.load(IDS + s).to(tl.int64)
    route_w = tl.load(ROUTE_W + s)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    gate_rows = W + expert * stride_we + cols.to(tl.int64)[:, None] * stride_wn
    up_rows = gate_rows + N * stride_wn
    s_gate = S + expert * stride_se + (cols // SB_N).to(tl.int64) * stride_sn
    s_up = S + expert * stride_se + ((cols + N) // SB_N).to(tl.int64) * stride_sn
    acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ok = col_ok[:, None] & k_ok[None, :]
        # x broadcast over the tile's rows: loaded in the weights' register layout, no shuffle through shared memory
        x = tl.load(X + t * stride_x + ks[None, :] + cols[:, None] * 0, mask=ok, other=0.0).to(tl.float32)
        w_gate = tl.load(gate_rows + ks[None, :], mask=ok, other=0.0, eviction_policy="evict_first")
        w_up = tl.load(up_rows + ks[None, :], mask=ok, other=0.0, eviction_policy="evict_first")
        acc_gate += _widen(w_gate, s_gate, k0, col_ok, SCHEME, SB_K) * x
        acc_up += _widen(w_up, s_up, k0, col_ok, SCHEME, SB_K) * x
    gate = tl.sum(acc_gate, 1)
    up = tl.sum(acc_up, 1)
    if SCHEME == 1:  # a scale per output row: once, on the sum
        gate = gate * tl.load(s_gate, mask=col_ok, other=0.0)
        up = up * tl.load(s_up, mask=col_ok, other=0.0)
    h = gate / (1.0 + tl.exp(-gate)) * up * route_w
    tl.store(HIDDEN + s.to(tl.int64) * stride_h + cols, h.to(HIDDEN.dtype.element_ty), mask=col_ok)


@triton.jit
def fma_down(HIDDEN, W, S, OUT, IDS, stride_h, stride_we, stride_wn, stride_se, stride_sn, stride_out,
             N: tl.constexpr, K: tl.constexpr, TOP_K: tl.constexpr,
             SCHEME: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """One or two tokens: program (t, j) writes OUT[t, rows j] = sum over k of W[ids[t, k], rows] . HIDDEN[t *
    TOP_K + k] (routing weights already in HIDDEN) on the CUDA cores: for each of the token's experts a
    contiguous [BLOCK_N, K] strip of its down matrix, every (expert, K tile) load unrolled at compile time so
    they can all be in flight; the top-k sum stays in the fp32 accumulator, summed across K and rounded once."""
    wait_prior(PDL)
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        expert = tl.load(IDS + t * TOP_K + k).to(tl.int64)
        w_rows = W + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn
        s_rows = S + expert * stride_se + (rows // SB_N).to(tl.int64) * stride_sn
        if SCHEME == 1:  # the expert's per-row scales, for each of its K tiles
            row_scale = tl.load(s_rows, mask=row_ok, other=0.0)[:, None]
        for k0 in tl.static_range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            ok = row_ok[:, None] & k_ok[None, :]
            h = tl.load(HIDDEN + (t * TOP_K + k) * stride_h + ks[None, :] + rows[:, None] * 0, mask=ok, other=0.0)
            w = tl.load(w_rows + ks[None, :], mask=ok, other=0.0, eviction_policy="evict_first")
            w = _widen(w, s_rows, k0, row_ok, SCHEME, SB_K)
            if SCHEME == 1:
                w = w * row_scale
            acc += w * h.to(tl.float32)
    out = tl.sum(acc, 1)
    tl.store(OUT + t * stride_out + rows, out.to(OUT.dtype.element_ty), mask=row_ok)


@triton.jit
def route(LOGITS, WEIGHTS, IDS, n_experts, stride_logits,
          TOP_K: tl.constexpr, K_POW2: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
          PDL: tl.constexpr = False):
    """One token per program: softmax over its router logits in fp32, the TOP_K largest probabilities
    (largest first; the lower expert id wins a tie) and their ids, renormalized to sum to 1 if asked."""
    wait_prior(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < n_experts
    x = tl.load(LOGITS + t * stride_logits + e, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    left = tl.where(ok, p, -1.0)
    k = tl.arange(0, K_POW2)
    weights = tl.zeros((K_POW2,), dtype=tl.float32)
    ids = tl.zeros((K_POW2,), dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        best = tl.max(left, 0)
        best_id = tl.min(tl.where(left == best, e, BLOCK_E), 0)
        weights = tl.where(k == i, best, weights)
        ids = tl.where(k == i, best_id, ids)
        left = tl.where(e == best_id, -1.0, left)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 0)  # the unused lanes hold 0
    tl.store(WEIGHTS + t * TOP_K + k, weights, mask=k < TOP_K)
    tl.store(IDS + t * TOP_K + k, ids.to(IDS.dtype.element_ty), mask=k < TOP_K)


"""Paged attention in Triton, for the CUDA path (and its CUDA graphs).

Decode: one program per (sequence, kv head). It loads the query heads that
share the kv head (GQA), walks the sequence's context in tiles of TILE tokens,
looking up each token's block in the block table, and keeps an online softmax.
Reads only device tensors, so it can be captured in a CUDA graph.

Prefill and mixed batches (unless `serve --prefill-attention reference`, which
takes attention.reference_attention): one program per (tile of Q_ROWS // group
query tokens of a sequence, kv head), each finding its sequence by a binary
search over query_start_loc, so the grid depends only on the step's token and
sequence counts and a mixed step can be captured in a CUDA graph
(core/cuda_graphs.py). The same walk as decode, with a causal mask:
query token j of a sequence with context c and q new tokens sits at position
c - q + j and sees keys 0..c - q + j (its cached prefix and the new tokens up
to itself). A step is one launch per layer and no host sync, where the
reference path loops over sequences and syncs once per layer: that matters
most for the first step after a failover, a short prefill over an adopted
prefix. Both kernels are checked against the reference on a GPU
(tests/engine/test_fused.py, test_cuda_paths.py); the prefill kernel also in
Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from understudy.engine.layers.attention import FP8_KV, AttentionFn, AttentionMetadata, reference_attention

TILE = 64  # context tokens per iteration
Q_ROWS = 64  # query rows (tokens x heads of a kv head) per prefill program


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]: no overflow
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _attend_tile(q, K, V, table_row, kv_offset, tok, valid, visible, m, l, acc, scale, stride_kb, stride_ks, d,
                 k_scale, v_scale, softcap, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
                 KV_FP8: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """One tile of context tokens `tok` (their blocks looked up in the sequence's block table) into the
    online softmax (m, l, acc) of the rows of q; scores not `visible` to a row count for nothing. An FP8
    cache (KV_FP8) is widened to q's dtype times its layer's k_scale / v_scale as it is read. SOFTCAP: scores
    become softcap * tanh(scores / softcap) (Gemma 2). A head of HEAD_DIM < HEAD_PAD (a power of two, the
    width of d) is padded with zeros."""
    blk = tl.load(table_row + tok // BLOCK_SIZE, mask=valid, other=0)
    off = blk.to(tl.int64) * stride_kb + (tok % BLOCK_SIZE) * stride_ks + kv_offset
    if HEAD_PAD == HEAD_DIM:
        kv_mask = valid[:, None]
    else:
        kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(K + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if KV_FP8:
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no visible key yet (windows)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    return m_new, l, acc


# A block table's row stride is its width, which changes from step to step: not a specialisation key, or
# a width never seen in warm-up (a multiple of 16, say) would compile a new kernel inside a step.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode(Q, K, V, Out, block_tables, context_lens, scale, k_scale, v_scale, window, softcap,
                  stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  HEAD_DIM: tl.constexpr, TILE_: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                  SOFTCAP: tl.constexpr, HEAD_PAD: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_PAD)
    head_ok = g < GROUP
    row_mask = head_ok[:, None] & (d[None, :] < HEAD_DIM)
    heads = kvh * GROUP + g
    q = tl.load(Q + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=row_mask, other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)  # a sliding window: its last `window` keys
    for start in range(first, ctx, TILE_):
        tok = start + tl.arange(0, TILE_)
        valid = tok < ctx
        m, l, acc = _attend_tile(q, K, V, block_tables + seq * stride_bt, kvh * stride_kh, tok, valid,
                                 valid[None, :], m, l, acc, scale, stride_kb, stride_ks, d, k_scale, v_scale,
                                 softcap, BLOCK_SIZE, PRECISION, KV_FP8, SOFTCAP, HEAD_DIM, HEAD_PAD)
    out = acc / l[:, None]
    tl.store(Out + seq * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
             mask=row_mask)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                           sliding_window: int | None = None, softcap: float | None = None) -> Tensor:
    """q [B, Hq, D] (one token per sequence) over cached context -> [B, Hq, D]."""
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    out = torch.empty_like(q)
    _paged_decode[(B, Hkv)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale, k_scale, v_scale, sliding_window or 0,
        softcap or 0.0, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=D, TILE_=TILE, PRECISION=_precision(q), KV_FP8=k_cache.dtype == FP8_KV, SOFTCAP=bool(softcap),
        HEAD_PAD=triton.next_power_of_2(D),
    )
    return out


# The number of sequences is not a specialisation key either: a CUDA graph's fixed-size batch and an eager
# step's count would otherwise compile kernels of their own.
@triton.jit(do_not_specialize=["stride_bt", "num_seqs"])
def _paged_prefill(Q, K, V, Out, block_tables, query_start, context_lens, num_seqs, scale, k_scale, v_scale, window,
                   softcap, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, Q_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, TILE_: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                   SOFTCAP: tl.constexpr, HEAD_PAD: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    # Sequence i owns programs [qs[i] // Q_TILE + i, qs[i+1] // Q_TILE + i + 1) (qs = query_start): at least
    # one per tile of its q_len query tokens, and the grid's size, T // Q_TILE + num_seqs, depends on the
    # step's token and sequence counts only, not on how the tokens are split (a CUDA graph fixes both).
    # Binary search for the last sequence whose first program is <= pid.
    lo = pid * 0
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        owns = tl.load(query_start + mid) // Q_TILE + mid <= pid
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid)
    seq = lo
    q0 = tl.load(query_start + seq)
    qt = pid - (q0 // Q_TILE + seq)  # this program's tile of the sequence's query tokens (past q_len: no work)
    q_len = tl.load(query_start + seq + 1) - q0
    ctx = tl.load(context_lens + seq)
    r = tl.arange(0, Q_TILE * GROUP_PAD)  # row = (query token of this tile, head of this kv head)
    j = qt * Q_TILE + r // GROUP_PAD
    g = r % GROUP_PAD
    row_ok = (j < q_len) & (g < GROUP)
    pos = ctx - q_len + j  # each row's absolute position: it sees keys 0..pos
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_PAD)
    row_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(Q + (q0 + j)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask, other=0.0)
    m = tl.full([Q_TILE * GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([Q_TILE * GROUP_PAD], tl.float32)
    acc = tl.zeros([Q_TILE * GROUP_PAD, HEAD_PAD], tl.float32)
    # Keys past this tile's last query token are masked for every row; a tile past q_len has no work.
    end = tl.where(qt * Q_TILE < q_len, tl.minimum(ctx, ctx - q_len + (qt + 1) * Q_TILE), 0)
    # With a sliding window a row sees keys pos - window + 1 .. pos: none before the first row's first one.
    start = tl.where(window > 0, tl.maximum(ctx - q_len + qt * Q_TILE - window + 1, 0), 0)
    while start < end:  # not a range(): Triton's interpreter cannot take a loaded value as its bound
        tok = start + tl.arange(0, TILE_)
        valid = tok < end
        in_window = (window <= 0) | (tok[None, :] > pos[:, None] - window)
        visible = valid[None, :] & (tok[None, :] <= pos[:, None]) & in_window
        m, l, acc = _attend_tile(q, K, V, block_tables + seq * stride_bt, kvh * stride_kh, tok, valid,
                                 visible, m, l, acc, scale, stride_kb, stride_ks, d, k_scale, v_scale, softcap,
                                 BLOCK_SIZE, PRECISION, KV_FP8, SOFTCAP, HEAD_DIM, HEAD_PAD)
        start += TILE_
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # l == 0 only in rows that are not stored
    tl.store(Out + (q0 + j)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_mask)


def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                            scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                            sliding_window: int | None = None, softcap: float | None = None) -> Tensor:
    """q [T, Hq, D] (each sequence's new tokens, its K/V already stored) over its cached context, causal."""
    _, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    group_pad = triton.next_power_of_2(group)
    q_tile = max(1, Q_ROWS // group_pad)
    out = torch.empty_like(q)
    num_seqs = meta.context_lens.shape[0]  # a device tensor's shape: no sync, and fixed in a CUDA graph
    grid = (q.shape[0] // q_tile + num_seqs, Hkv)
    _paged_prefill[grid](
        q, k_cache, v_cache, out, meta.block_tables, meta.query_start_loc, meta.context_lens, num_seqs, scale,
        k_scale, v_scale, sliding_window or 0, softcap or 0.0, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, Q_TILE=q_tile, BLOCK_SIZE=block_size, HEAD_DIM=D, TILE_=TILE,
        PRECISION=_precision(q), KV_FP8=k_cache.dtype == FP8_KV, SOFTCAP=bool(softcap),
        HEAD_PAD=triton.next_power_of_2(D),
    )
    return out


def _precision(q: Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays exact, like the reference


def kernels_fit(head_dim: int, group: int) -> bool:
    """Whether these kernels take this shape (tl.dot needs at least 16; other head sizes than powers of two,
    Phi-3-mini's 96 say, are padded with zeros to the next one)."""
    return head_dim >= 16 and group <= Q_ROWS


def fast_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                   scale: float, *, k_scale: float = 1.0, v_scale: float = 1.0, sliding_window: int | None = None,
                   softcap: float | None = None, prefill_kernel: bool = False) -> Tensor:
    """Decode batches through the decode kernel; prefill and mixed batches through the prefill kernel
    (`prefill_kernel`) or the reference path; a head shape the kernels do not take through the reference.
    The step's k and v are already in the caches (the model's fused.rope_and_store wrote them): this only
    reads the caches, never writes them."""
    if not kernels_fit(q.shape[-1], q.shape[1] // k_cache.shape[2]) or (
            meta.max_query_len > 1 and not prefill_kernel):
        return reference_attention(q, k, v, k_cache, v_cache, meta, scale, k_scale=k_scale, v_scale=v_scale,
                                   sliding_window=sliding_window, softcap=softcap)
    if meta.max_query_len == 1:
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, k_scale,
                                      v_scale, sliding_window, softcap)
    return paged_prefill_attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale, sliding_window, softcap)


def attention_for(prefill: str) -> AttentionFn:
    """The CUDA attention of `serve --attention triton --prefill-attention reference|triton`."""
    return functools.partial(fast_attention, prefill_kernel=True) if prefill == "triton" else fast_attention

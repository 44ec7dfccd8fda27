"""Paged decode attention in Triton, for the CUDA path (and its CUDA graphs).

One program per (sequence, kv head): it loads the query heads that share the
kv head (GQA), walks the sequence's context in tiles of TILE tokens, looking
up each token's block in the block table, and keeps an online softmax. Reads
only device tensors, so it can be captured in a CUDA graph. Prefill and mixed
batches go to the reference path (attention.reference_attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention import AttentionMetadata, reference_attention

TILE = 64


@triton.jit
def _paged_decode(Q, K, V, Out, block_tables, context_lens, scale,
                  stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  HEAD_DIM: tl.constexpr, TILE_: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    head_ok = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(Q + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(0, ctx, TILE_):
        tok = start + tl.arange(0, TILE_)
        valid = tok < ctx
        blk = tl.load(block_tables + seq * stride_bt + tok // BLOCK_SIZE, mask=valid, other=0)
        off = blk.to(tl.int64) * stride_kb + (tok % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        k = tl.load(K + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m = m_new
    out = acc / l[:, None]
    tl.store(Out + seq * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
             mask=head_ok[:, None])


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float) -> Tensor:
    """q [B, Hq, D] (one token per sequence) over cached context -> [B, Hq, D]."""
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    out = torch.empty_like(q)
    _paged_decode[(B, Hkv)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=D, TILE_=TILE,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact, like the reference
    )
    return out


def fast_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                   scale: float) -> Tensor:
    """Decode-only batches through the Triton kernel; anything else through the reference path."""
    if meta.max_query_len != 1:
        return reference_attention(q, k, v, k_cache, v_cache, meta, scale)
    # Every slot is valid here (padded rows write into the reserved block 0): no host sync.
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)

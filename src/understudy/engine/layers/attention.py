"""Paged attention over a flat batch of tokens.

The model hands every layer's attention to one function with the `AttentionFn`
signature below. `reference_attention` is the plain-torch version: slow, runs on
any device, and defines the semantics a CUDA kernel (flash-attn with a block
table, a Triton kernel, ...) must reproduce when swapped in.

Layout of one step (continuous batching):
  * the T new tokens of all B sequences are concatenated; sequence i owns
    rows query_start_loc[i]:query_start_loc[i+1];
  * sequence i has context_lens[i] tokens in the cache once this step's are
    written, and its new tokens are the last ones of that context (so a
    prefill chunk that starts mid-sequence just has context_len > query_len);
  * the KV cache of a layer is two tensors [num_blocks, block_size, kv_heads, head_dim];
    block_tables[i, j] is the physical block holding the sequence's tokens
    j*block_size ... (j+1)*block_size-1.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from understudy.engine.core.host_copies import to_device


def new_token_positions(query_lens: Sequence[int] | np.ndarray, context_lens: Sequence[int] | np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query starts [B+1], each new token's sequence [T], its absolute position [T]) of a step, int64: a
    sequence's new tokens are the last query_len of its context."""
    q = np.asarray(query_lens, dtype=np.int64)
    starts = np.zeros(len(q) + 1, dtype=np.int64)
    np.cumsum(q, out=starts[1:])
    seq = np.repeat(np.arange(len(q)), q)
    # token j of the step, in sequence i, is at position context_len_i - q_i + (j - start_i)
    first = np.asarray(context_lens, dtype=np.int64) - q - starts[:-1]
    return starts, seq, np.arange(starts[-1]) + np.repeat(first, q)


def new_token_slots(tables: np.ndarray, seq: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """The cache slot (block * block_size + offset) of each token, from the padded block tables [B, width]."""
    return tables[seq, positions // block_size].astype(np.int64) * block_size + positions % block_size


def padded_tables(tables: Sequence[Sequence[int]], rows: int, width: int) -> np.ndarray:
    """The block tables as one int32 [rows, width] array, each row padded with 0 (rows >= len(tables))."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    out = np.zeros((rows, width), dtype=np.int32)
    # the concatenated tables, row by row, land where each row's first len entries are
    out[:len(tables)][np.arange(width) < lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
    return out


@dataclass
class AttentionMetadata:
    query_start_loc: Tensor  # [B+1] int32, cumulative query lengths (cu_seqlens_q)
    context_lens: Tensor  # [B] int32, cached tokens per sequence including this step's
    block_tables: Tensor  # [B, max_blocks] int32, rows padded with 0
    slot_mapping: Tensor  # [T] int64, block*block_size+offset for each new token; -1 = don't store
    max_query_len: int
    max_context_len: int
    # Host copies so the reference path can loop over sequences without device syncs.
    query_start_loc_host: tuple[int, ...]
    context_lens_host: tuple[int, ...]
    token_positions: Tensor | None = None  # [T] int64 on the device, made by build (see positions())

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)

    def last_token_indices(self) -> Tensor:
        """Row of each sequence's last new token: where next-token logits come from."""
        return self.query_start_loc[1:].long() - 1

    def positions(self) -> Tensor:
        """Absolute position of every new token (the new tokens end the context)."""
        if self.token_positions is None:  # metadata not made by build
            _, _, pos = new_token_positions(np.diff(self.query_start_loc_host), self.context_lens_host)
            self.token_positions = to_device(pos, self.slot_mapping.device)
        return self.token_positions

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str | None = None,
    ) -> "AttentionMetadata":
        """Build the metadata from per-sequence Python lists (what a scheduler has); the device tensors are
        copied without waiting for the device's queued work (core/host_copies.py)."""
        if not (len(query_lens) == len(context_lens) == len(block_tables)):
            raise ValueError("query_lens, context_lens and block_tables must have one entry per sequence")
        q = np.asarray(query_lens, dtype=np.int64)
        ctx = np.asarray(context_lens, dtype=np.int64)
        widths = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(block_tables))
        bad_len, short = ~((0 < q) & (q <= ctx)), widths * block_size < ctx
        if (bad_len | short).any():  # the first bad sequence, as a loop over them would say
            i = int(np.argmax(bad_len | short))
            if bad_len[i]:
                raise ValueError(f"need 0 < query_len <= context_len, got {q[i]} and {ctx[i]}")
            raise ValueError(f"block table of {widths[i]} blocks is too short for {ctx[i]} tokens")
        tables = padded_tables(block_tables, len(block_tables), int(widths.max()))
        starts, seq, pos = new_token_positions(q, ctx)
        device = torch.device(device or "cpu")
        return cls(
            query_start_loc=to_device(starts, device, torch.int32),
            context_lens=to_device(ctx, device, torch.int32),
            block_tables=to_device(tables, device),
            slot_mapping=to_device(new_token_slots(tables, seq, pos, block_size), device),
            max_query_len=int(q.max()),
            max_context_len=int(ctx.max()),
            query_start_loc_host=tuple(starts.tolist()),
            context_lens_host=tuple(context_lens),
            token_positions=to_device(pos, device),
        )


# (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], k_cache, v_cache, metadata, scale, *, k_scale, v_scale)
# -> out [T, Hq, D]. Attends causally over each sequence's whole cached context. This step's k/v are already
# in the caches at metadata.slot_mapping (the model's RoPE step stores them: fused.rope_and_store, or
# store_kv); they are passed too, for a kernel that would take the new tokens from them, but neither
# function here reads them. It must not allocate, replace or write the caches. An FP8 cache
# (`--kv-cache-dtype fp8`) holds k / k_scale and v / v_scale in float8_e4m3fn (to_cache, from_cache).
AttentionFn = Callable[..., Tensor]

FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = float(torch.finfo(FP8_KV).max)


def to_cache(x: Tensor, cache_dtype: torch.dtype, scale: float) -> Tensor:
    """Keys or values as the cache stores them: FP8 caches hold x / scale, saturated at +-448."""
    if cache_dtype != FP8_KV:
        return x.to(cache_dtype)
    return (x.float() / scale).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(cache_dtype)


def from_cache(x: Tensor, dtype: torch.dtype, scale: float) -> Tensor:
    """Cached keys or values back in the compute dtype (FP8: times the layer's scale)."""
    if x.dtype != FP8_KV:
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def as_bytes(cache: Tensor) -> Tensor:
    """An FP8 cache as uint8, for the copies torch does not implement on float8 (index_copy_, index_select)."""
    return cache.view(torch.uint8) if cache.dtype == FP8_KV else cache


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter this step's keys/values into their cache slots, in place (slots < 0: not stored). The
    reference for fused.rope_and_store's kernel, and its path off CUDA."""
    # .view (not .reshape) so a non-contiguous cache fails loudly instead of writing into a copy.
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    # Looking for padding tokens syncs with the device: not inside a CUDA graph capture, whose padded rows
    # write into the reserved block 0 instead (core/cuda_graphs.py).
    capturing = slot_mapping.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and (slot_mapping < 0).any():
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    as_bytes(k_flat).index_copy_(0, slot_mapping, as_bytes(to_cache(k, k_cache.dtype, k_scale)))
    as_bytes(v_flat).index_copy_(0, slot_mapping, as_bytes(to_cache(v, v_cache.dtype, v_scale)))


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    k_scale: float = 1.0,  # FP8 caches: what each stored key / value is multiplied by when read
    v_scale: float = 1.0,
    sliding_window: int | None = None,  # a query sees only the last `sliding_window` keys, itself included
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2)
) -> Tensor:
    """The AttentionFn above in plain torch: k and v are already in the caches (store_kv), and unused here."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    starts = meta.query_start_loc_host
    for i, ctx in enumerate(meta.context_lens_host):
        start, end = starts[i], starts[i + 1]
        q_len = end - start
        n_blocks = -(-ctx // block_size)
        blocks = meta.block_tables[i, :n_blocks].long()
        # Gather the sequence's blocks into one contiguous [ctx, Hkv, D] run.
        keys = from_cache(as_bytes(k_cache).index_select(0, blocks).view(k_cache.dtype).flatten(0, 1)[:ctx],
                          q.dtype, k_scale)
        values = from_cache(as_bytes(v_cache).index_select(0, blocks).view(v_cache.dtype).flatten(0, 1)[:ctx],
                            q.dtype, v_scale)
        mask = None
        if q_len > 1 or sliding_window is not None:
            # Query j sits at absolute position ctx - q_len + j and may see keys 0..that position
            # (with a window, only the last sliding_window of them).
            q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            key_pos = torch.arange(ctx, device=q.device)[None, :]
            mask = key_pos <= q_pos
            if sliding_window is not None:
                mask &= key_pos > q_pos - sliding_window
        if softcap is not None:
            o = _softcapped_attention(q[start:end].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                      mask, scale, softcap)
            out[start:end] = o.transpose(0, 1)
            continue
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),  # [Hq, q_len, D]
            keys.transpose(0, 1),  # [Hkv, ctx, D]
            values.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,  # each kv head serves Hq/Hkv query heads
        )
        out[start:end] = o.transpose(0, 1)
    return out


def _softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, cap: float) -> Tensor:
    """Attention with soft-capped scores (q [Hq, n, D], k/v [Hkv, ctx, D]), op for op as transformers' eager
    Gemma 2 attention (SDPA has no soft-cap)."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = torch.tanh(torch.matmul(q, k.transpose(1, 2)) * scale / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

"""Paged attention in Triton, for the CUDA path (and its CUDA graphs).

Decode: one program per (sequence, kv head), or per (sequence, kv head, split)
when a small batch would leave most of the GPU idle (flash-decoding: one
sequence's 8 kv heads are 8 programs on 132 multiprocessors). It loads the
query heads that share the kv head (GQA), walks its run of the context in
tiles of TILE tokens, looking up each token's block in the block table, and
keeps an online softmax; the last split to finish merges the others' partial
results, so a step is still one launch. Reads only device tensors, and the
split count depends on the batch's shape only, so it can be captured in a CUDA
graph.

Prefill and mixed batches (unless `serve --prefill-attention reference`, which
takes attention.reference_attention): one program per (tile of query tokens of
a sequence, kv head): PrefillConfig.rows rows of (token, query head of the kv
head), so a GQA group's heads share each K/V tile they load. Each program finds
its sequence by a binary search over query_start_loc, so the grid depends only
on the step's token and sequence counts (and the config, picked from
max_query_len by prefill_config) and a mixed step can be captured in a CUDA
graph (core/cuda_graphs.py). Query token j of a sequence with context c and q
new tokens sits at position c - q + j and sees keys 0..c - q + j (its cached
prefix and the new tokens up to itself). A program walks key tiles aligned to
the cache's blocks: those every row sees without a mask (one block-table entry
per block), then the one or two on its causal diagonal masked; tiles past the
diagonal are never loaded. When a step's programs are too few to fill the GPU
(a short chunk over a long cached prefix: a chat's follow-up turn), each one's
key tiles are split over up to 8 programs and merged as the decode kernel's
are. A step is one launch per layer and no host sync, where the reference
path loops over sequences and syncs once per layer: that matters most for the
first step after a failover, a short prefill over an adopted prefix. Both
kernels are checked against the reference on a GPU (tests/engine/test_fused.py,
test_cuda_paths.py) and in Triton's interpreter; bench/prefill_attention.py
times the prefill configs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from understudy.engine.layers.attention import FP8_KV, AttentionFn, AttentionMetadata, reference_attention
from understudy.engine.layers import pdl
from understudy.engine.layers._pdl_kernels import wait_prior

TILE = 64  # context tokens per iteration of the decode kernel
SPLIT_TOKENS = 128  # the fewest keys one program of a split decode takes (bench/flashinfer_attention.py)
MAX_SPLITS = 16  # the most programs one (sequence, kv head) of a decode step is split over
# ... and one (query tile, kv head) of a prefill: its merge reads 4-8x the rows of a decode's, and on an H200
# 8 splits beat 16 on every short chunk timed (a 16-token chunk over 8192 keys: 38 against 44 us)
MAX_PREFILL_SPLITS = 8
MAX_SPLIT_PAIRS = 4096  # the most runs of keys one split launch splits: its counters' size
Q_ROWS = 64  # the fewest query rows (tokens x heads of a kv head) of a prefill program: a GQA group of up to 64
LOG2E = 1.4426950408889634  # the kernels' softmax is in base 2 (exp2), its scale times log2(e)


@dataclass(frozen=True)
class PrefillConfig:
    """The prefill kernel's tile shape: `rows` query rows (tokens x heads of a kv head; a power of two >= Q_ROWS)
    per program, `tile` context tokens per iteration (a power of two >= 16), and the launch's num_warps and
    num_stages (how many tiles of K/V the compiler keeps in flight)."""

    rows: int
    tile: int
    warps: int
    stages: int


# (smallest max_query_len, config): a step takes the last entry whose bound its max_query_len reaches. From
# bench/prefill_attention.py's sweep on an H200 (bf16, Llama-3-8B and Qwen3-30B-A3B layer shapes; us per call
# against the kernel before the sweep, which walked every tile masked in a while loop and no pipelining):
# rows 64 / tile 64 / 4 warps / 3 stages is the best or within 3% of it everywhere (512-token prompt 14 us,
# was 27; mixed 32 x 16 tokens over 1000: 48, was 70), rows 128 / tile 32 / 4 warps / 3 stages the best at
# 2048 tokens on Llama-3-8B (97 us = 355 TFLOP/s, was 250; flash SDPA 163) and within 3% of the best at
# 8192 (1402 us = 392 TFLOP/s). A CUDA graph's mixed step has its bucket's token count (up to 512) as
# max_query_len (core/cuda_graphs.py): the long-prompt entry starts above that, so graphs keep the short one,
# which is 1.6x faster on a mixed step.
PREFILL_CONFIGS: tuple[tuple[int, PrefillConfig], ...] = (
    (0, PrefillConfig(rows=64, tile=64, warps=4, stages=3)),  # short prompts, mixed steps
    (1024, PrefillConfig(rows=128, tile=32, warps=4, stages=3)),  # long prompts
)


def prefill_config(max_query_len: int, dtype: torch.dtype = torch.bfloat16) -> PrefillConfig:
    """The config of a step whose longest sequence has max_query_len new tokens. fp32 (the exactness tests'
    dtype, not a fast path) keeps the short one, whose K/V tiles of 4-byte values fit in shared memory."""
    if dtype == torch.float32:
        max_query_len = 0
    return [cfg for bound, cfg in PREFILL_CONFIGS if max_query_len >= bound][-1]


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]: no overflow
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _load_kv(K, V, table_row, kv_offset, start, n_keys, d, stride_kb, stride_ks, TILE_N: tl.constexpr,
             BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, MASKED: tl.constexpr,
             BLOCKWISE: tl.constexpr, KV_ALIGN: tl.constexpr):
    """K and V ([TILE_N, HEAD_PAD] each) of context tokens start .. start + TILE_N - 1, their blocks looked up in
    the sequence's block table: zeros past n_keys (MASKED; else every token is < n_keys) and past HEAD_DIM (a head
    padded to the power of two HEAD_PAD). BLOCKWISE: start is a multiple of TILE_N, itself one of BLOCK_SIZE, so
    the tile is whole blocks and takes one table entry per block instead of one per token (KV_ALIGN: what the
    cache's block and token strides are multiples of, _kv_align)."""
    tok = start + tl.arange(0, TILE_N)
    if BLOCKWISE:
        b = start // BLOCK_SIZE + tl.arange(0, TILE_N // BLOCK_SIZE)
        if MASKED:
            blk = tl.load(table_row + b, mask=b * BLOCK_SIZE < n_keys, other=0)
        else:
            blk = tl.load(table_row + b)
        off = blk.to(tl.int64)[:, None] * stride_kb + (tl.arange(0, BLOCK_SIZE) * stride_ks)[None, :]
        off = tl.multiple_of(tl.reshape(off, [TILE_N]), KV_ALIGN)  # what the reshape hides: vector loads
    else:
        blk = tl.load(table_row + tok // BLOCK_SIZE, mask=tok < n_keys, other=0)
        off = blk.to(tl.int64) * stride_kb + (tok % BLOCK_SIZE) * stride_ks
    ptr = off[:, None] + kv_offset + d[None, :]
    if MASKED:
        mask = (tok < n_keys)[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(K + ptr, mask=mask, other=0.0)
        v = tl.load(V + ptr, mask=mask, other=0.0)
    elif HEAD_PAD != HEAD_DIM:
        k = tl.load(K + ptr, mask=(d < HEAD_DIM)[None, :], other=0.0)
        v = tl.load(V + ptr, mask=(d < HEAD_DIM)[None, :], other=0.0)
    else:
        k = tl.load(K + ptr)
        v = tl.load(V + ptr)
    return k, v


@triton.jit
def _online_softmax(q, k, v, visible, m, l, acc, qk_scale, softcap, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                    SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """A tile of keys k and values v into the online softmax (m, l, acc) of the rows of q, in base 2: qk_scale
    is the softmax scale times log2(e) (SOFTCAP: over softcap, and then softcap is times log2(e): scores become
    softcap * tanh(scores / softcap), Gemma 2), times an FP8 cache's k_scale (its v_scale is the caller's, on
    the output). MASKED: scores not `visible` count for nothing; else every score of the tile counts."""
    if KV_FP8:  # e4m3 values are exact in q's dtype
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if SOFTCAP:
        s = softcap * _tanh(s * qk_scale)
    else:
        s = s * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no visible key yet
    else:
        m_new_safe = m_new
    p = tl.exp2(s - m_new_safe[:, None])
    alpha = tl.exp2(m - m_new_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l, acc


def _scales(scale: float, k_scale: float, softcap: float | None) -> tuple[float, float]:
    """The kernels' (qk_scale, softcap) for _online_softmax."""
    if softcap:
        return scale * k_scale / softcap, softcap * LOG2E
    return scale * k_scale * LOG2E, 0.0


@triton.jit
def _split_run(n_tiles, keys, split, SPLITS: tl.constexpr, SPLIT_TOKENS: tl.constexpr):
    """(start, stop, splits): split `split`'s run [start, stop) of `n_tiles` tiles holding `keys` keys, cut into
    up to SPLITS runs of whole tiles and at least SPLIT_TOKENS keys each (one run below 2 x SPLIT_TOKENS), and
    how many runs there are: as many as the tiles per run need, so none is empty (no tiles: one empty run, a
    program past its rows, which stores nothing). A split at or past `splits` has nothing to do."""
    splits = tl.minimum(tl.maximum(keys // SPLIT_TOKENS, 1), SPLITS)
    per = tl.maximum(tl.cdiv(n_tiles, splits), 1)
    splits = tl.maximum(tl.cdiv(n_tiles, per), 1)
    start = split * per
    return start, tl.minimum(start + per, n_tiles), splits


@triton.jit
def _write_split(Partial, Lse, Counters, pair, split, splits, acc, m, l, r, d, row_ok, row_mask,
                 ROWS: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS: tl.constexpr):
    """One split of a program's keys done: the normalised partial output and log-sum-exp of its rows `r` (a
    row that saw no key of this split, on a causal diagonal say, weighs nothing) into the pair's slots.
    Returns whether this split is the pair's last to finish, which then merges (an atomic count in
    Counters)."""
    slot = pair * SPLITS + split
    seen = l > 0
    tl.store(Partial + (slot * ROWS + r[:, None]) * HEAD_PAD + d[None, :], acc / tl.where(seen, l, 1.0)[:, None],
             mask=row_mask)
    tl.store(Lse + slot * ROWS + r, tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float("-inf")), mask=row_ok)
    tl.debug_barrier()  # every thread's partial is written before the count says so (release)
    return tl.atomic_add(Counters + pair, 1, sem="acq_rel") == splits - 1


@triton.jit
def _merge_splits(Partial, Lse, Counters, pair, splits, r, d, row_ok, row_mask, ROWS: tl.constexpr,
                  HEAD_PAD: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """The last split's merge: the pair's partial outputs weighted by their softmax mass, [ROWS, HEAD_PAD];
    sets the pair's count back to 0 for the next launch. .cg loads read L2, where the other programs' stores
    are, never a line this multiprocessor's L1 kept from an earlier launch; all splits' loads are issued at
    once."""
    s = tl.arange(0, SPLITS_PAD)
    lse = tl.load(Lse + (pair * SPLITS + s)[:, None] * ROWS + r[None, :], mask=(s < splits)[:, None] & row_ok[None, :],
                  other=float("-inf"), cache_modifier=".cg")
    big = tl.max(lse, 0)
    big = tl.where(big == float("-inf"), 0.0, big)  # a row that is not stored: all -inf
    w = tl.exp2(lse - big[None, :])  # [SPLITS_PAD, ROWS]; 0 past `splits`
    acc = tl.zeros([ROWS, HEAD_PAD], tl.float32)
    for i in tl.static_range(SPLITS):
        part = tl.load(Partial + ((pair * SPLITS + i) * ROWS + r[:, None]) * HEAD_PAD + d[None, :],
                       mask=row_mask & (i < splits), other=0.0, cache_modifier=".cg")
        acc += tl.sum(tl.where(s[:, None] == i, w, 0.0), 0)[:, None] * part
    tl.store(Counters + pair, 0)
    total = tl.sum(w, 0)
    return acc / tl.where(total > 0, total, 1.0)[:, None]


# A block table's row stride is its width, which changes from step to step: not a specialisation key, or
# a width never seen in warm-up (a multiple of 16, say) would compile a new kernel inside a step.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode(Q, K, V, Out, Partial, Lse, Counters, block_tables, context_lens, qk_scale, v_scale, window,
                  softcap, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  HEAD_DIM: tl.constexpr, TILE_: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                  SOFTCAP: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                  SPLIT_TOKENS: tl.constexpr, PDL: tl.constexpr = False):
    """Program (seq, kv head, split). SPLITS > 1 (flash-decoding): the sequence's context is cut into up to
    SPLITS runs of whole tiles, at least SPLIT_TOKENS keys each (a short context takes fewer splits, one
    below 2 x SPLIT_TOKENS, and the spare programs end at once); each run's program writes its normalised
    partial output and log-sum-exp to Partial / Lse, and the last of them to finish (an atomic count in
    Counters, which it sets back to 0 for the next launch) merges them into Out. One launch either way."""
    wait_prior(PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens + seq)
    first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)  # a sliding window: its last `window` keys
    n_tiles = tl.cdiv(ctx - first, TILE_)
    if SPLITS == 1:
        lo = first
        hi = ctx
        splits = 1
    else:
        start, stop, splits = _split_run(n_tiles, ctx - first, split, SPLITS, SPLIT_TOKENS)
        lo = first + start * TILE_
        hi = tl.minimum(first + stop * TILE_, ctx)
    if split < splits:
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_PAD)
        head_ok = g < GROUP
        row_mask = head_ok[:, None] & (d[None, :] < HEAD_DIM)
        heads = kvh * GROUP + g
        q = tl.load(Q + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=row_mask, other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
        for start in range(lo, hi, TILE_):
            k, v = _load_kv(K, V, block_tables + seq * stride_bt, kvh * stride_kh, start, hi, d, stride_kb,
                            stride_ks, TILE_, BLOCK_SIZE, HEAD_DIM, HEAD_PAD, True, False, 1)
            valid = start + tl.arange(0, TILE_) < hi
            m, l, acc = _online_softmax(q, k, v, valid[None, :], m, l, acc, qk_scale, softcap, PRECISION, KV_FP8,
                                        SOFTCAP, True)
        out_ptr = Out + seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
        if splits == 1:
            tl.store(out_ptr, (acc * (v_scale / l)[:, None]).to(Out.dtype.element_ty), mask=row_mask)
        else:
            pair = seq * tl.num_programs(1) + kvh
            if _write_split(Partial, Lse, Counters, pair, split, splits, acc, m, l, g, d, head_ok, row_mask,
                            GROUP_PAD, HEAD_PAD, SPLITS):
                out = _merge_splits(Partial, Lse, Counters, pair, splits, g, d, head_ok, row_mask, GROUP_PAD,
                                    HEAD_PAD, SPLITS, SPLITS_PAD)
                tl.store(out_ptr, (out * v_scale).to(Out.dtype.element_ty), mask=row_mask)


_SPLIT_COUNTERS: dict[torch.device, Tensor] = {}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(programs: int, device: torch.device, most: int = MAX_SPLITS) -> int:
    """How many programs share each of a launch's `programs` runs of keys ((sequence, kv head) pairs of a
    decode, (query tile, kv head) of a prefill): 1 once they fill the GPU's multiprocessors (and off CUDA),
    else enough for two programs per multiprocessor (to the nearest power of two), up to `most`. Shapes
    only, so each CUDA graph's bucket has its own, fixed."""
    if device.type != "cuda" or programs >= _sm_count(device):
        return 1
    wanted = -(-2 * _sm_count(device) // programs)
    # the nearest power of two: on an H200, 3 and 9 splits were slower than 4 and 8 (docs/benchmarks.md)
    return min(most, 1 << round(math.log2(wanted)))


def _split_counters(device: torch.device, pairs: int) -> Tensor:
    """The split launches' counts of finished splits, one per run of keys: zeros that every launch leaves
    as zeros, so one buffer per device serves every launch and every CUDA graph. Made once, at its full
    size (a graph keeps its address), on the first split launch, which the engine's eager warm-up runs before
    any capture."""
    if pairs > MAX_SPLIT_PAIRS:  # split_count never splits more runs than the GPU has multiprocessors
        raise ValueError(f"a split launch of {pairs} runs of keys: at most {MAX_SPLIT_PAIRS}")
    counters = _SPLIT_COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the attention kernels' split counters must be made before a CUDA graph capture: "
                               "run one eager split launch (a decode step of batch 1, say) first")
        counters = _SPLIT_COUNTERS[device] = torch.zeros(MAX_SPLIT_PAIRS, dtype=torch.int32, device=device)
    return counters


def _split_buffers(out: Tensor, pairs: int, splits: int, rows: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """A split launch's partial outputs [pairs x splits, rows, head_pad] and log-sum-exps (fp32), made per
    launch (a CUDA graph keeps its own), and the device's counters. Unsplit: `out` in their place, never read."""
    if splits == 1:
        return out, out, out
    device, head_pad = out.device, triton.next_power_of_2(head_dim)
    return (torch.empty(pairs * splits, rows, head_pad, dtype=torch.float32, device=device),
            torch.empty(pairs * splits, rows, dtype=torch.float32, device=device),
            _split_counters(device, pairs))


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                           sliding_window: int | None = None, softcap: float | None = None,
                           splits: int | None = None, split_tokens: int = SPLIT_TOKENS) -> Tensor:
    """q [B, Hq, D] (one token per sequence) over cached context -> [B, Hq, D]. splits: programs per
    (sequence, kv head) (default: split_count's), each over at least split_tokens keys."""
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    group_pad = max(16, triton.next_power_of_2(group))
    head_pad = triton.next_power_of_2(D)
    splits = splits or split_count(B * Hkv, q.device)
    out = torch.empty_like(q)
    partial, lse, counters = _split_buffers(out, B * Hkv, splits, group_pad, D)
    qk_scale, softcap = _scales(scale, k_scale, softcap)
    _paged_decode[(B, Hkv, splits)](
        q, k_cache, v_cache, out, partial, lse, counters, block_tables, context_lens, qk_scale, v_scale,
        sliding_window or 0, softcap, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_SIZE=block_size, HEAD_DIM=D, TILE_=TILE, PRECISION=_precision(q),
        KV_FP8=k_cache.dtype == FP8_KV, SOFTCAP=bool(softcap), HEAD_PAD=head_pad, SPLITS=splits,
        SPLITS_PAD=triton.next_power_of_2(splits), SPLIT_TOKENS=split_tokens, **pdl.launch_kwargs(q.device),
    )
    return out


@triton.jit
def _prefill_tile(q, K, V, table_row, kv_offset, start, ctx, pos, window, m, l, acc, qk_scale, softcap, d,
                  stride_kb, stride_ks, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_PAD: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr, SOFTCAP: tl.constexpr,
                  BLOCKWISE: tl.constexpr, KV_ALIGN: tl.constexpr, MASKED: tl.constexpr):
    """Context tokens start .. start + TILE_N - 1 into the rows at positions `pos`: a row sees the keys up to
    its own position (with a window, only the last `window` of them). Not MASKED: every row sees every key."""
    k, v = _load_kv(K, V, table_row, kv_offset, start, ctx, d, stride_kb, stride_ks, TILE_N, BLOCK_SIZE, HEAD_DIM,
                    HEAD_PAD, MASKED, BLOCKWISE, KV_ALIGN)
    tok = (start + tl.arange(0, TILE_N))[None, :]
    visible = (tok < ctx) & (tok <= pos[:, None]) & ((window <= 0) | (tok > pos[:, None] - window))  # (MASKED)
    return _online_softmax(q, k, v, visible, m, l, acc, qk_scale, softcap, PRECISION, KV_FP8, SOFTCAP, MASKED)


# The number of sequences is not a specialisation key either: a CUDA graph's fixed-size batch and an eager
# step's count would otherwise compile kernels of their own.
@triton.jit(do_not_specialize=["stride_bt", "num_seqs"])
def _paged_prefill(Q, K, V, Out, Partial, Lse, Counters, block_tables, query_start, context_lens, num_seqs,
                   num_kv_heads, qk_scale, v_scale, window, softcap, stride_qt, stride_qh, stride_kb, stride_ks,
                   stride_kh, stride_bt, stride_ot, stride_oh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   Q_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE_N: tl.constexpr,
                   PRECISION: tl.constexpr, KV_FP8: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_PAD: tl.constexpr,
                   BLOCKWISE: tl.constexpr, KV_ALIGN: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                   SPLIT_TOKENS: tl.constexpr, PDL: tl.constexpr = False):
    """Program (tile of query tokens x kv head, split). SPLITS > 1: a program's key tiles are cut into up to
    SPLITS runs of at least SPLIT_TOKENS keys, merged as the decode kernel's are (_write_split, _merge_splits):
    a short chunk over a long cached prefix (a follow-up turn of a chat) is a few programs otherwise."""
    wait_prior(PDL)
    # Programs are numbered (tile of query tokens, kv head), the kv head fastest. Sequence i owns the tiles
    # [qs[i] // Q_TILE + i, qs[i+1] // Q_TILE + i + 1) (qs = query_start): at least one per Q_TILE of its q_len
    # query tokens, and the grid's size, (T // Q_TILE + num_seqs) x kv heads, depends on the step's token and
    # sequence counts only, not on how the tokens are split (a CUDA graph fixes both).
    pid = tl.program_id(0)
    kvh = pid % num_kv_heads
    tile = pid // num_kv_heads
    # Binary search for the last sequence whose first tile is <= this one.
    lo = tile * 0
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        owns = tl.load(query_start + mid) // Q_TILE + mid <= tile
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid)
    seq = lo
    q0 = tl.load(query_start + seq)
    q_len = tl.load(query_start + seq + 1) - q0
    ctx = tl.load(context_lens + seq)
    # A sequence's first program takes its last query tokens (past q_len: no work), which see the most keys:
    # the longest programs of a long prompt start first and the short ones fill the tail of the grid.
    qt = (q0 + q_len) // Q_TILE + seq - tile
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
    # Key tiles [t * TILE_N, (t + 1) * TILE_N), this program's rows at positions first_pos .. last_pos: tiles
    # t_first .. t_end - 1 hold keys some row sees; of them, tiles u_lo .. u_hi - 1 only keys that every row
    # sees (at or before first_pos and, with a sliding window, at or after last_pos - window + 1), which need
    # no mask. The others are the causal diagonal's (a tile or two) and a window's lower edge.
    first_pos = ctx - q_len + qt * Q_TILE
    last_pos = tl.minimum(first_pos + Q_TILE, ctx) - 1
    t_end = tl.where(qt * Q_TILE < q_len, last_pos // TILE_N + 1, 0)
    t_first = tl.minimum(tl.where(window > 0, tl.maximum(first_pos - window + 1, 0) // TILE_N, 0), t_end)
    seen_by_all = tl.where(window > 0, tl.maximum(last_pos - window + 1, 0), 0)
    u_lo = tl.minimum(tl.maximum((seen_by_all + TILE_N - 1) // TILE_N, t_first), t_end)
    u_hi = tl.maximum(u_lo, tl.minimum((first_pos + 1) // TILE_N, t_end))
    # This split's run of the program's key tiles [t_first, t_end), cut as the decode kernel cuts a context.
    split = tl.program_id(1)
    if SPLITS == 1:
        a = t_first
        b = t_end
        splits = 1
    else:
        start, stop, splits = _split_run(t_end - t_first, (t_end - t_first) * TILE_N, split, SPLITS, SPLIT_TOKENS)
        a = t_first + start
        b = t_first + stop
    if split < splits:
        table_row = block_tables + seq * stride_bt
        kv_offset = kvh * stride_kh
        for t in range(a, tl.minimum(u_lo, b)):
            m, l, acc = _prefill_tile(q, K, V, table_row, kv_offset, t * TILE_N, ctx, pos, window, m, l, acc,
                                      qk_scale, softcap, d, stride_kb, stride_ks, TILE_N, BLOCK_SIZE, HEAD_DIM,
                                      HEAD_PAD, PRECISION, KV_FP8, SOFTCAP, BLOCKWISE, KV_ALIGN, True)
        for t in range(tl.maximum(u_lo, a), tl.minimum(u_hi, b)):
            m, l, acc = _prefill_tile(q, K, V, table_row, kv_offset, t * TILE_N, ctx, pos, window, m, l, acc,
                                      qk_scale, softcap, d, stride_kb, stride_ks, TILE_N, BLOCK_SIZE, HEAD_DIM,
                                      HEAD_PAD, PRECISION, KV_FP8, SOFTCAP, BLOCKWISE, KV_ALIGN, False)
        for t in range(tl.maximum(u_hi, a), b):
            m, l, acc = _prefill_tile(q, K, V, table_row, kv_offset, t * TILE_N, ctx, pos, window, m, l, acc,
                                      qk_scale, softcap, d, stride_kb, stride_ks, TILE_N, BLOCK_SIZE, HEAD_DIM,
                                      HEAD_PAD, PRECISION, KV_FP8, SOFTCAP, BLOCKWISE, KV_ALIGN, True)
        out_ptr = Out + (q0 + j)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
        if splits == 1:
            out = acc * (v_scale / tl.where(l > 0, l, 1.0))[:, None]  # l == 0 only in rows that are not stored
            tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=row_mask)
        else:
            if _write_split(Partial, Lse, Counters, pid, split, splits, acc, m, l, r, d, row_ok, row_mask,
                            Q_TILE * GROUP_PAD, HEAD_PAD, SPLITS):
                out = _merge_splits(Partial, Lse, Counters, pid, splits, r, d, row_ok, row_mask,
                                    Q_TILE * GROUP_PAD, HEAD_PAD, SPLITS, SPLITS_PAD)
                tl.store(out_ptr, (out * v_scale).to(Out.dtype.element_ty), mask=row_mask)


def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                            scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                            sliding_window: int | None = None, softcap: float | None = None,
                            config: PrefillConfig | None = None, splits: int | None = None,
                            split_tokens: int = SPLIT_TOKENS) -> Tensor:
    """q [T, Hq, D] (each sequence's new tokens, its K/V already stored) over its cached context, causal.
    config: the tile shape (default: prefill_config's for the step); splits: programs per (query tile, kv
    head) (default: split_count's for the grid), each over at least split_tokens keys."""
    _, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    group_pad = triton.next_power_of_2(group)
    cfg = config or prefill_config(meta.max_query_len, q.dtype)
    q_tile = _query_tile(cfg, group)
    out = torch.empty_like(q)
    num_seqs = meta.context_lens.shape[0]  # a device tensor's shape: no sync, and fixed in a CUDA graph
    qk_scale, softcap = _scales(scale, k_scale, softcap)
    programs = prefill_programs(q.shape[0], num_seqs, group, Hkv, cfg)
    splits = splits or split_count(programs, q.device, MAX_PREFILL_SPLITS)
    partial, lse, counters = _split_buffers(out, programs, splits, q_tile * group_pad, D)
    _paged_prefill[(programs, splits)](
        q, k_cache, v_cache, out, partial, lse, counters, meta.block_tables, meta.query_start_loc,
        meta.context_lens, num_seqs, Hkv, qk_scale, v_scale, sliding_window or 0, softcap, q.stride(0),
        q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, Q_TILE=q_tile, BLOCK_SIZE=block_size, HEAD_DIM=D, TILE_N=cfg.tile,
        PRECISION=_precision(q), KV_FP8=k_cache.dtype == FP8_KV, SOFTCAP=bool(softcap),
        HEAD_PAD=triton.next_power_of_2(D), BLOCKWISE=cfg.tile % block_size == 0, KV_ALIGN=_kv_align(k_cache),
        SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), SPLIT_TOKENS=split_tokens, num_warps=cfg.warps,
        num_stages=cfg.stages, **pdl.launch_kwargs(q.device),
    )
    return out


def _query_tile(config: PrefillConfig, group: int) -> int:
    """Query tokens per prefill program: the config's rows over the GQA group's heads (padded)."""
    return max(1, config.rows // triton.next_power_of_2(group))


def prefill_programs(tokens: int, num_seqs: int, group: int, kv_heads: int, config: PrefillConfig) -> int:
    """The prefill kernel's programs (before splits) for a step of `tokens` new tokens over `num_seqs`
    sequences: at least one per query tile of each sequence, times the kv heads (_paged_prefill)."""
    return (tokens // _query_tile(config, group) + num_seqs) * kv_heads


def _kv_align(k_cache: Tensor) -> int:
    """The largest power of two up to 16 that the cache's block and token strides are multiples of."""
    return math.gcd(k_cache.stride(0), k_cache.stride(1), 16)


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

"""CUDA graphs for engine steps: one captured forward per bucket of step shapes.

A step of a big model is hundreds of small kernels; launching them from
Python costs more than running them (an eager 4-token prefill of an 8B model
takes ~20 ms to launch and ~4 ms to run). Each bucket's graph reads static
input buffers, so a step copies its inputs in, pads to the bucket and replays.

Two kinds of bucket:
  decode  `bs` sequences of one new token each (bs in DECODE_BUCKETS up to max_num_seqs); the decode
          attention kernel. A padded row is a sequence of context 1 in the reserved block 0.
  mixed   any step of up to T new tokens (T in TOKEN_BUCKETS up to the largest that fits): prefills,
          prefill chunks and decodes together, through the prefill attention kernel, whose grid depends
          only on T and the number of sequences (layers/triton_attention.py). The padded tokens form one
          dummy sequence over the reserved block 0 (its keys are the ones it just wrote there, so its rows
          stay finite: nothing it computes reaches another row); the sequence slots after it are empty.
          Logits are computed for up to min(T, max_num_seqs) rows, picked by a static index buffer.
Steps that fit no bucket, and steps that score prompt tokens (prompt_logprobs), run eagerly.

A shadow captures every bucket while parked, on its scratch KV at the addresses the adopted pool will take
(core/kv_cache.py), so the first step after a promotion, a short prefill, replays a graph.

Under tensor parallelism every rank captures the same buckets, all-reduces included (NCCL records them
into the graph), and replays the same bucket for each step, which it picks from the same query lengths;
only the leader's graphs end in logits (`logits=False` on the workers, which sample nothing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from understudy.logs import log
from understudy.engine.layers import pdl
from understudy.engine.layers.attention import AttentionMetadata, new_token_positions, new_token_slots, padded_tables
from understudy.engine.core.host_copies import copy_to_device
from understudy.engine.core.kv_cache import KVCaches
from understudy.engine.model.decoder import CausalLM

logger = logging.getLogger("understudy.engine.core.cuda_graphs")

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512)
MAX_MIXED_TOKENS = TOKEN_BUCKETS[-1]  # larger steps are long prefills: their launches hide behind the GPU work


@dataclass(frozen=True)
class Bucket:
    tokens: int  # new tokens of the step, padded
    seqs: int  # sequence slots
    rows: int  # logits rows
    decode: bool  # one token per sequence: the decode attention kernel


def mixed_token_limit(max_num_batched_tokens: int, max_blocks_per_seq: int, block_size: int) -> int:
    """The largest mixed bucket: no more than a step may hold, nor than a sequence's block table spans (the
    dummy sequence's keys are looked up through it)."""
    return min(MAX_MIXED_TOKENS, max_num_batched_tokens, max_blocks_per_seq * block_size)


class StepGraphs:
    def __init__(self, model: CausalLM, kv: KVCaches, *, max_batch: int, max_blocks_per_seq: int,
                 max_tokens: int, device: torch.device, logits: bool = True):
        """max_tokens: the largest mixed bucket (mixed_token_limit; 0 or 1: decode graphs only)."""
        self.model, self.kv, self.device, self.logits = model, kv, device, logits
        self.max_batch = max_batch
        self.block_size = kv[0][0].shape[1]
        decode = [b for b in DECODE_BUCKETS if b < max_batch] + [max_batch]
        mixed = ([t for t in TOKEN_BUCKETS if t < max_tokens] + [max_tokens]) if max_tokens > 1 else []
        self.decode_buckets = [Bucket(b, b, b, True) for b in decode]
        self.mixed_buckets = [Bucket(t, min(t, max_batch) + 1, min(t, max_batch), False) for t in mixed]
        buckets = self.decode_buckets + self.mixed_buckets
        # Static inputs: int64 [ids | positions | slots | logits rows] and int32 [query_start | context_lens],
        # each bucket's a prefix of its own layout, so a step is one copy of each plus the block tables.
        self.ids64 = torch.zeros(max(3 * b.tokens + b.rows for b in buckets), dtype=torch.long, device=device)
        self.ids32 = torch.zeros(max(2 * b.seqs + 1 for b in buckets), dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max(b.seqs for b in buckets), max_blocks_per_seq, dtype=torch.int32,
                                        device=device)
        self.graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[Bucket, Tensor] = {}
        self.pool = None

    def _views(self, b: Bucket) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        t, s = b.tokens, b.seqs
        v64, v32 = self.ids64, self.ids32
        return (v64[:t], v64[t:2 * t], v64[2 * t:3 * t], v64[3 * t:3 * t + b.rows], v32[:s + 1],
                v32[s + 1:2 * s + 1])

    def _forward(self, b: Bucket) -> Tensor:
        ids, positions, slots, rows, query_start, context_lens = self._views(b)
        meta = AttentionMetadata(query_start, context_lens, self.block_tables[:b.seqs], slots,
                                 max_query_len=1 if b.decode else b.tokens, max_context_len=0,
                                 query_start_loc_host=(), context_lens_host=())
        if not self.logits:  # a worker rank: the decoder layers only
            return self.model.model(ids, positions, meta, self.kv)
        return self.model(ids, positions, meta, self.kv, rows)

    @torch.inference_mode()
    def capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # largest first, so that smaller ones reuse its memory pool
            for b in sorted(self.decode_buckets + self.mixed_buckets, key=lambda b: (b.tokens, not b.decode),
                            reverse=True):
                self._fill(b, [], [], [], [], [])  # all padding: a valid step of the bucket's shape
                self._forward(b)  # warm-up: Triton compiles, cuBLAS picks its kernels
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.outputs[b] = self._forward(b)
                self.pool = graph.pool()
                self.graphs[b] = graph
            # The first launch of a graph uploads it to the device: 30 ms or more for a big model's, which a
            # shadow must not pay in its first steps after a promotion. Pay it now, on the padding inputs.
            for b, graph in self.graphs.items():
                self._fill(b, [], [], [], [], [])
                graph.replay()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log(logger, "cuda_graphs_captured", decode=[b.tokens for b in self.decode_buckets],
            mixed_tokens=[b.tokens for b in self.mixed_buckets],
            pdl=pdl.launch_kwargs(self.device)["PDL"])  # the Triton kernels overlap their launches (layers/pdl.py)

    def bucket(self, query_lens: list[int]) -> Bucket | None:
        """The graph a step with these new-token counts per sequence replays; None: run it eagerly."""
        n = len(query_lens)
        if n <= self.max_batch and all(q == 1 for q in query_lens):
            return next(b for b in self.decode_buckets if b.seqs >= n)
        total = sum(query_lens)
        return next((b for b in self.mixed_buckets if b.tokens >= total and b.seqs > n), None)

    def run(self, input_ids: list[int], query_lens: list[int], context_lens: list[int], tables: list[list[int]],
            logits_at: list[int], bucket: Bucket | None = None, device_ids: Tensor | None = None) -> Tensor:
        """Replay the step's bucket (`bucket(query_lens)`, unless the caller has it already; it must not be None):
        the logits of the tokens at `logits_at` (ascending indices into input_ids), one row each; hidden states
        on a worker rank. device_ids: the new tokens already on the device, in place of input_ids' values."""
        b = bucket or self.bucket(query_lens)
        self._fill(b, input_ids, query_lens, context_lens, tables, logits_at)
        if device_ids is not None:  # queued behind the copy above: the ids are the first of ids64
            self.ids64[:device_ids.shape[0]].copy_(device_ids)
        self._replay(b)
        out = self.outputs[b]
        if not self.logits:
            return out
        if b.decode:  # every row's logits: pick the asked ones (all of them, usually)
            return out[:len(input_ids)] if len(logits_at) == len(input_ids) else out[logits_at]
        return out[:len(logits_at)]

    def _replay(self, b: Bucket) -> None:
        self.graphs[b].replay()

    def _fill(self, b: Bucket, input_ids: list[int], query_lens: list[int], context_lens: list[int],
              tables: list[list[int]], logits_at: list[int]) -> None:
        """Write a step into the bucket's static inputs, padded as the module docstring says."""
        t, s, bs = b.tokens, b.seqs, self.block_size
        n, used = len(query_lens), len(input_ids)
        host64 = np.zeros(3 * t + b.rows, dtype=np.int64)
        host32 = np.zeros(2 * s + 1, dtype=np.int32)
        ids, positions, slots, rows = (host64[:t], host64[t:2 * t], host64[2 * t:3 * t], host64[3 * t:])
        query_start, ctx = host32[:s + 1], host32[s + 1:]
        ids[:used] = input_ids
        starts, seq, pos = new_token_positions(query_lens, context_lens)
        query_start[:n + 1] = starts
        ctx[:n] = context_lens
        pad = t - used
        # wide enough for every real sequence, and for the dummy sequence's (zero) row of block 0
        width = max([len(tb) for tb in tables] + [1 if b.decode else -(-pad // bs), 1])
        table = padded_tables(tables, s, width)
        # each token's position (its context ends with the new tokens) and cache slot
        positions[:used] = pos
        slots[:used] = new_token_slots(table, seq, pos, bs)
        if b.decode:  # padded rows: token 0 at position 0, context 1, slot 0 of the reserved block 0
            query_start[n:] = np.arange(n, s + 1)
            ctx[n:] = 1
            rows[:] = np.arange(b.rows)
        else:
            query_start[n + 1:] = t  # the dummy sequence (pad tokens), then empty slots
            ctx[n] = pad
            positions[used:] = np.arange(pad)
            slots[used:] = np.arange(pad) % bs  # block 0's slots
            rows[:len(logits_at)] = logits_at
        # without waiting for the step the device is running (host_copies.py): the graph replays after these
        copy_to_device(self.ids64[:host64.shape[0]], host64)
        copy_to_device(self.ids32[:host32.shape[0]], host32)
        copy_to_device(self.block_tables[:s, :width], table)

"""CUDA graphs for decode steps: one captured forward per batch-size bucket.

A decode step of a big model is hundreds of small kernels; launching them
from Python costs more than running them. Each bucket's graph reads static
input buffers, so a step copies its inputs in, pads to the bucket (padded
rows attend to the reserved block 0 and write their K/V there) and replays.

Under tensor parallelism every rank captures the same buckets, all-reduces
included (NCCL records them into the graph), and replays the same bucket for
each decode step; only the leader's graphs end in logits (`logits=False` on
the workers, which sample nothing).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from understudy.logs import log
from understudy.engine.layers.attention import AttentionMetadata
from understudy.engine.core.kv_cache import KVCaches
from understudy.engine.model.decoder import CausalLM

logger = logging.getLogger("understudy.engine.core.cuda_graphs")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv: KVCaches, *, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device, logits: bool = True):
        self.model, self.kv, self.device, self.logits = model, kv, device, logits
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        n = self.max_batch = max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.zeros(n, dtype=torch.long, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}
        self.pool = None

    def _forward(self, bs: int) -> Tensor:
        meta = AttentionMetadata(self.query_start[: bs + 1], self.context_lens[:bs], self.block_tables[:bs],
                                 self.slots[:bs], max_query_len=1, max_context_len=0,
                                 query_start_loc_host=(), context_lens_host=())
        if not self.logits:  # a worker rank: the decoder layers only
            return self.model.model(self.input_ids[:bs], self.positions[:bs], meta, self.kv)
        return self.model(self.input_ids[:bs], self.positions[:bs], meta, self.kv, self.rows[:bs])

    @torch.inference_mode()
    def capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):  # largest first, so smaller ones reuse its memory pool
                self._forward(bs)  # warm-up: Triton compiles, cuBLAS picks its kernels
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.outputs[bs] = self._forward(bs)
                self.pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log(logger, "cuda_graphs_captured", buckets=self.buckets)

    def run(self, input_ids: list[int], context_lens: list[int], tables: list[list[int]]) -> Tensor:
        """Logits [len(input_ids), vocab] for a decode batch (one new token per sequence, the last of its
        context); hidden states on a worker rank."""
        n = len(input_ids)
        bs = next(b for b in self.buckets if b >= n)
        block = self.kv[0][0].shape[1]
        slots = [t[(c - 1) // block] * block + (c - 1) % block for t, c in zip(tables, context_lens)]
        # Padded rows: token 0 at position 0, context 1, slot 0 of the reserved block 0.
        host = np.zeros((4, bs), dtype=np.int64)
        host[0, :n] = input_ids
        host[1, :n] = context_lens
        host[1, :n] -= 1
        host[2, :n] = slots
        host[3] = 1
        host[3, :n] = context_lens
        table = np.zeros((bs, self.block_tables.shape[1]), dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        src = torch.from_numpy(host)
        for dst, row in ((self.input_ids, 0), (self.positions, 1), (self.slots, 2), (self.context_lens, 3)):
            dst[:bs].copy_(src[row])
        self.block_tables[:bs].copy_(torch.from_numpy(table))
        self.graphs[bs].replay()
        return self.outputs[bs][:n]

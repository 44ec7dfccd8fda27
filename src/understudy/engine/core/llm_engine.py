"""The engine loop: schedule a batch, run the model once, sample, update sequences.

Token ids in, token ids out; text is the HTTP layer's business. Not thread
safe: AsyncEngine drives it from one thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from understudy.logs import log
from understudy.engine.layers.attention import AttentionMetadata
from understudy.engine.core.block_manager import BlockManager
from understudy.engine.core.kv_cache import KVCache
from understudy.engine.model.decoder import CausalLM
from understudy.engine.core.sampling import SamplingParams, sample, skip_draws
from understudy.engine.core.scheduler import Scheduler
from understudy.engine.core.sequence import Sequence

logger = logging.getLogger("understudy.engine")


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # stop, length, abort
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # on the wire for the frontend; a failed step fails the whole engine instead


@dataclass
class EngineLimits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    max_model_len: int = 4096


class LLMEngine:
    def __init__(self, model: CausalLM, kv: KVCache, *, eos_token_ids: tuple[int, ...] = (),
                 limits: EngineLimits | None = None, device: torch.device | str = "cpu"):
        limits = limits or EngineLimits()
        self.model = model
        self.kv = kv
        self.device = torch.device(device)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.blocks = BlockManager(kv.spec.num_blocks, kv.spec.block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=limits.max_num_seqs,
                                   max_num_batched_tokens=limits.max_num_batched_tokens,
                                   max_waiting=limits.max_waiting, max_model_len=limits.max_model_len)
        self.sequences: dict[str, Sequence] = {}
        self.graphs = None  # DecodeGraphs once enable_cuda_graphs() ran
        # Tensor parallelism: called with each step's inputs just before the forward (graph: a decode step
        # replayed from the CUDA graphs), so that the group's other ranks run the same step
        # (engine/parallel/group.py). None on one device.
        self.step_hook = None
        self.timed_steps = 0  # this many next steps log their phase timings (step_timing)
        self.fault_hook = None  # called inside the next forwards, after the step went to a group's ranks (injection)
        self.slowest_step_s = 0.0  # the longest step that completed (warm-up included): /live's bound grows with it
        self.steps = 0
        self.generated_tokens = 0
        self.prompt_tokens_computed = 0

    # -- requests -----------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> Sequence:
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, list(prompt), params)
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
            if params.seed_offset and not params.greedy:  # a migrated request: resume its random stream
                skip_draws(seq.generator, params.seed_offset, vocab, self.device)
        self.scheduler.add(seq)
        self.sequences[request_id] = seq
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its KV blocks go back at once."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def abandon(self) -> None:
        """The engine failed and its process is about to exit: let go of what must not wait for that (a
        tensor-parallel group ends its other ranks here). Called from any thread; nothing for one device."""

    def warm_up(self, prompt_lens: tuple[int, ...] = (1, 5, 16, 64, 300)) -> None:
        """Run eager prefills of a few sizes and decodes once, so that the first real requests pay
        no first-call costs (kernel compilation, library heuristics, allocator growth). The blocks
        it used are forgotten and the sealed-block index cleared afterwards."""
        if self.kv.adopted:
            return  # the blocks hold someone's cache: don't write over it
        sizes = [n for n in prompt_lens
                 if self.blocks.blocks_needed(n + 2) <= self.blocks.capacity and n + 2 <= self.scheduler.max_model_len]
        for n in sizes:
            self.generate([[1] * n, [2] * max(1, n // 2)], SamplingParams(max_tokens=3, temperature=0,
                                                                          ignore_eos=True))
        if self.device.type == "cuda":
            # The passes above compiled kernels: time the largest one again, compiled and with tokens no cached
            # prefix holds, so that /live's bound (serving/faults.live_bound) follows a real step's time.
            if sizes:
                self.slowest_step_s = 0.0
                self.generate([[6] * max(sizes), [7] * max(1, max(sizes) // 2)],
                              SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # a parked shadow keeps as little GPU memory of its own as it can
            # ...but the allocator keeps what a small step needs (tens of MiB): the first step after a
            # promotion must not cudaMalloc, which waits while the driver tears the dead engine down.
            self.generate([[3] * 16] * 4, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
            torch.cuda.synchronize(self.device)
        self.blocks = BlockManager(self.kv.spec.num_blocks, self.kv.spec.block_size)
        self.scheduler.blocks = self.blocks
        self.kv.index.zero_()

    def adopt_prefix_cache(self) -> int:
        """After adopting a kv pool: its sealed blocks become our cached prefixes."""
        return self.blocks.restore(self.kv.read_index())

    def graph_shape(self) -> dict:
        """The decode batches the CUDA graphs must take: up to max_num_seqs sequences of max_model_len."""
        return {"max_batch": self.scheduler.max_num_seqs,
                "max_blocks_per_seq": -(-self.scheduler.max_model_len // self.kv.spec.block_size)}

    def enable_cuda_graphs(self) -> None:
        """Capture decode steps as CUDA graphs (CUDA only; the attention must be graph-safe)."""
        from understudy.engine.core.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.kv.layers, **self.graph_shape(), device=self.device)
        self.graphs.capture()

    # -- one step -------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        segments = _cuda_segments(self.device) if self.timed_steps > 0 else 0
        batch = self.scheduler.schedule()
        self.kv.write_index(self.blocks.take_index_updates())  # recycled blocks leave the index first
        if not batch:
            return []
        self.steps += 1
        # An exception from here on is not caught: after a failed forward the KV cache, the sequences and
        # (on CUDA) the context cannot be trusted, so the engine fails as a whole (AsyncEngine.on_failure).
        t1 = time.perf_counter()
        graph = self.graphs is not None and len(batch) <= self.graphs.max_batch and all(n == 1 for _, n in batch)
        if graph:
            sample_rows = list(range(len(batch)))
            logits = self._decode_with_graph(batch)
        else:
            sample_rows, logits = self._forward_eager(batch)
        t2 = time.perf_counter()
        sampled = sample(logits, [batch[i][0].params for i in sample_rows],
                         [batch[i][0].generator for i in sample_rows]) if sample_rows else []
        outputs = self._advance(batch, sample_rows, sampled)
        self.slowest_step_s = max(self.slowest_step_s, time.perf_counter() - t0)
        if self.timed_steps > 0:  # e.g. the first steps after a promotion: where does the time go?
            self.timed_steps -= 1
            t3 = time.perf_counter()
            log(logger, "step_timing", schedule_ms=round((t1 - t0) * 1e3, 3), launch_ms=round((t2 - t1) * 1e3, 3),
                sample_ms=round((t3 - t2) * 1e3, 3), graph=graph, seqs=len(batch), tokens=sum(n for _, n in batch),
                cuda_mallocs=_cuda_segments(self.device) - segments)
        return outputs

    def _decode_with_graph(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        ids, ctx, tables = [], [], []
        for seq, _ in batch:
            pos = seq.num_computed
            ids += seq.token_slice(pos, pos + 1)
            ctx.append(pos + 1)
            tables.append(seq.block_table)
        if self.step_hook is not None:
            self.step_hook(ids, [1] * len(ids), ctx, tables, graph=True)
        if self.fault_hook is not None:  # fault injection (serving/faults.py): raises or hangs mid-forward
            self.fault_hook()
        return self.graphs.run(ids, ctx, tables)

    def _forward_eager(self, batch: list[tuple[Sequence, int]]) -> tuple[list[int], torch.Tensor]:
        bs = self.kv.spec.block_size
        input_ids: list[int] = []
        query_lens, context_lens, tables, sample_rows = [], [], [], []
        for i, (seq, n) in enumerate(batch):
            start = seq.num_computed
            input_ids += seq.token_slice(start, start + n)
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
            if start + n == seq.num_tokens:
                sample_rows.append(i)  # its last known token is in this step: sample the next one
        meta = AttentionMetadata.build(query_lens, context_lens, tables, bs, device=self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        logits_at = torch.tensor([meta.query_start_loc_host[i + 1] - 1 for i in sample_rows], dtype=torch.long,
                                 device=self.device)
        rows = logits_at if sample_rows else logits_at.new_zeros(1)  # mid-prompt chunks only: a throwaway row
        if self.step_hook is not None:
            self.step_hook(input_ids, query_lens, context_lens, tables, graph=False)
        if self.fault_hook is not None:  # fault injection (serving/faults.py): raises or hangs mid-forward
            self.fault_hook()
        return sample_rows, self.model(ids, meta.positions(), meta, self.kv.layers, rows)

    def _advance(self, batch: list[tuple[Sequence, int]], sample_rows: list[int], sampled: list[int]) -> list[StepOutput]:
        for seq, n in batch:
            if seq.num_computed < len(seq.prompt):
                self.prompt_tokens_computed += min(n, len(seq.prompt) - seq.num_computed)
            seq.num_computed += n
            self.blocks.seal(seq)
        self.kv.write_index(self.blocks.take_index_updates())  # after this step's K/V writes
        outputs = []
        for i, token in zip(sample_rows, sampled):
            seq = batch[i][0]
            seq.output.append(token)
            self.generated_tokens += 1
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
                self.sequences.pop(seq.request_id, None)
            outputs.append(StepOutput(seq.request_id, [token], reason, len(seq.prompt), seq.num_cached_prompt,
                                      len(seq.output)))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if len(seq.output) >= p.max_tokens or seq.num_tokens >= self.scheduler.max_model_len:
            return "length"
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion (offline use and tests)."""
        ids = [f"offline-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        out: dict[str, list[int]] = {i: [] for i in ids}
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, SamplingParams(**vars(params)))
        while self.has_work:
            for o in self.step():
                out[o.request_id] += o.new_token_ids
        return [out[i] for i in ids]


def _cuda_segments(device: torch.device) -> int:
    """Memory segments the caching allocator got from the driver so far (its cudaMalloc calls)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.memory_stats(device).get("segment.all.allocated", 0)

"""The engine loop: schedule a batch, run the model once, sample, update sequences.

Token ids in, token ids out; text is the HTTP layer's business. Not thread
safe: AsyncEngine drives it from one thread.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field

import torch

from understudy.logs import log
from understudy.engine.layers.attention import AttentionMetadata
from understudy.engine.core.block_manager import BlockManager
from understudy.engine.core.kv_cache import KVCache
from understudy.engine.model.decoder import CausalLM
from understudy.common.params import TokenLogprob
from understudy.engine.core.host_copies import HostCopies, start_to_host, to_device
from understudy.engine.core.sampling import LogprobTensors, Sampled, SamplingParams, sample, token_logprobs
from understudy.engine.core.scheduler import Scheduler
from understudy.engine.core.sequence import Sequence, Status

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
    logprobs: list[TokenLogprob] | None = None  # one per new token, when params.logprobs is set
    # On the first output of a request that asked for them: one per prompt token, entry 0 None.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class LogitRows:
    """Which rows of a forward's logits are for what. A row is a position; its logits give the next token."""

    sample: list[int] = field(default_factory=list)  # batch indices whose next token is sampled in this step
    sample_at: list[int] = field(default_factory=list)  # their logits rows
    # (batch index, first logits row, count): rows that score the prompt's next tokens (prompt_logprobs)
    prompt_spans: list[tuple[int, int, int]] = field(default_factory=list)
    prefill_only: list[int] = field(default_factory=list)  # batch indices that finished their prompt, max_tokens 0


@dataclass
class Launched:
    """A step queued on the device: its forward, its sampling and the copy of their results to the host."""

    batch: list[tuple[Sequence, int]]
    rows: LogitRows
    sampled: Sampled | None
    prompt_lp: tuple | None  # (LogprobTensors on the device, next prompt tokens, top-k per row)
    copies: HostCopies  # the sampled ids, logprobs and prompt logprobs on their way to the host
    graph: bool  # replayed from a CUDA graph


@dataclass
class EngineLimits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    max_model_len: int = 4096


class LLMEngine:
    def __init__(self, model: CausalLM, kv: KVCache, *, eos_token_ids: tuple[int, ...] = (),
                 limits: EngineLimits | None = None, device: torch.device | str = "cpu", constraints=None):
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
        self.graphs = None  # StepGraphs once enable_cuda_graphs() ran
        # Queue each decode step behind the one before it when the host need not read that one's tokens first
        # (step()); False: every step waits for the one before to be read. Off the CPU only: there a step
        # computes while it is launched, so queueing the next one would only deliver each token a step later.
        self.overlap_decode = self.device.type == "cuda"
        self._queued: Launched | None = None  # the step queued behind the one step() completes
        # The grammar engine of structured requests (engine/core/constraints.py); None: they are refused.
        self.constraints = constraints
        # Tensor parallelism: called with each step's inputs just before the forward (graph: a decode step
        # replayed from the CUDA graphs; ids: the new tokens on the device when the step was queued ahead and
        # input_ids hold placeholders), so that the group's other ranks run the same step
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
        params.check_vocab(vocab)
        if params.resumed_tokens >= len(prompt):
            raise ValueError(f"resumed_tokens ({params.resumed_tokens}) must be below the prompt's length "
                             f"({len(prompt)}): the resumed tokens are the prompt's tail")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(request_id, list(prompt), params, seed=seed)
        if params.structured is not None:
            if self.constraints is None:
                raise ValueError("structured output (response_format / guided decoding) is not available: "
                                 "this engine has no grammar engine")
            self.constraints.start(seq)  # ValueError on a bad schema / regex / grammar
        self.scheduler.add(seq)
        self.sequences[request_id] = seq
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its KV blocks go back at once."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self._drop_dead_queue()
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._queued is not None

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

    def graph_shape(self, mixed_steps: bool) -> dict:
        """The steps the CUDA graphs must take: decode batches of up to max_num_seqs sequences of max_model_len,
        and (mixed_steps) steps of up to cuda_graphs.mixed_token_limit tokens."""
        from understudy.engine.core.cuda_graphs import mixed_token_limit

        block = self.kv.spec.block_size
        blocks = -(-self.scheduler.max_model_len // block)
        return {"max_batch": self.scheduler.max_num_seqs, "max_blocks_per_seq": blocks,
                "max_tokens": mixed_token_limit(self.scheduler.max_num_batched_tokens, blocks, block)
                if mixed_steps else 0}

    def enable_cuda_graphs(self, mixed_steps: bool = False) -> None:
        """Capture steps as CUDA graphs (CUDA only; the attention must be graph-safe, and for mixed_steps its
        prefill path too: `--prefill-attention triton`)."""
        from understudy.engine.core.cuda_graphs import StepGraphs

        self.graphs = StepGraphs(self.model, self.kv.layers, **self.graph_shape(mixed_steps), device=self.device)
        self.graphs.capture()

    # -- one step -------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one step and return its outputs. With overlap_decode, a decode step whose sequences need no
        host work before sampling again (docs/engine.md, "Overlapped decoding") is followed on the device by
        the next one, queued before this one's tokens are read: the host's work of every step (reading the
        tokens, advancing the sequences, filling the next inputs, launching) runs while the device computes."""
        t0 = time.perf_counter()
        segments = _cuda_segments(self.device) if self.timed_steps > 0 else 0
        current, self._queued = self._queued, None
        if current is None:
            batch = self.scheduler.schedule()
            self.kv.write_index(self.blocks.take_index_updates())  # recycled blocks leave the index first
            if not batch:
                return []
            # An exception from here on is not caught: after a failed forward the KV cache, the sequences and
            # (on CUDA) the context cannot be trusted, so the engine fails as a whole (AsyncEngine.on_failure).
            current = self._launch(batch, self._logit_rows(batch))
        t1 = time.perf_counter()
        if self.overlap_decode:
            self._queued = self._launch_next_decode(current)
        t2 = time.perf_counter()
        outputs = self._complete(current)
        self._drop_dead_queue()
        self.slowest_step_s = max(self.slowest_step_s, time.perf_counter() - t0)
        if self.timed_steps > 0:  # e.g. the first steps after a promotion: where does the time go?
            self.timed_steps -= 1
            t3 = time.perf_counter()
            log(logger, "step_timing", launch_ms=round((t1 - t0) * 1e3, 3), queue_next_ms=round((t2 - t1) * 1e3, 3),
                complete_ms=round((t3 - t2) * 1e3, 3), graph=current.graph, queued=self._queued is not None,
                seqs=len(current.batch), tokens=sum(n for _, n in current.batch),
                cuda_mallocs=_cuda_segments(self.device) - segments)
        return outputs

    def _launch(self, batch: list[tuple[Sequence, int]], rows: LogitRows, ids: torch.Tensor | None = None) -> Launched:
        """Queue a step's forward and sampling on the device, and the copy of its results to the host.
        ids: the step's input tokens already on the device, one per sequence, sampled by the step queued just
        before and not in the sequences' outputs yet (overlapped decoding)."""
        self.steps += 1
        # A CUDA graph when one takes the step's shape; steps that score prompt tokens run eagerly.
        bucket = None if self.graphs is None or rows.prompt_spans else self.graphs.bucket([n for _, n in batch])
        if bucket is not None:
            logits = self._forward_graph(batch, rows, bucket, ids)
        else:
            logits = self._forward_eager(batch, rows, ids)
        # The forward is launched (on CUDA it runs while the host goes on): now the hashes of the blocks it fills,
        # which blocks.seal needs once it is done (a long prompt's hundred hashes would otherwise delay its
        # first token; a step queued ahead has a token the host does not know yet), and the grammar bitmasks.
        if ids is None:
            for seq, n in batch:
                self.blocks.hashes(seq, seq.num_computed + n)
        seqs = [batch[i][0] for i in rows.sample]
        bitmask = self.constraints.bitmask(seqs) if self.constraints is not None and seqs else None
        sampled = None
        if seqs:
            at = rows.sample_at
            sampled = sample(logits if at == list(range(logits.shape[0])) else logits[at], seqs,
                             eos_token_ids=self.eos_token_ids, bitmask=bitmask, ahead=ids)
        prompt_lp = self._prompt_logprobs(batch, rows, logits) if rows.prompt_spans else None
        parts = []
        if sampled is not None:
            parts.append(sampled.token_ids)
            if sampled.logprobs is not None:
                parts += sampled.logprobs.tensors()
        if prompt_lp is not None:
            parts += prompt_lp[0].tensors()
        return Launched(batch, rows, sampled, prompt_lp, start_to_host(*parts), bucket is not None)

    def _launch_next_decode(self, prev: Launched) -> Launched | None:
        """The decode step after `prev`, queued now, with prev's sampled tokens (still on the device) as its
        inputs; None when the host must see prev's tokens first: prev is not a plain decode step, requests
        wait to be admitted, a grammar must advance over the latest token, or the KV cache is full."""
        if (self.scheduler.waiting or prev.rows.prompt_spans or prev.rows.prefill_only
                or len(prev.rows.sample) != len(prev.batch) or any(n != 1 for _, n in prev.batch)):
            return None
        batch, picked = [], []  # the sequences that go on, and their rows of prev (every row of prev sampled)
        for row, (seq, _) in enumerate(prev.batch):
            if seq.status is not Status.RUNNING or not self._continues_after_next(seq):
                continue  # finished (aborted), or prev's token is its last by length: nothing to queue for it
            if seq.matcher is not None:  # its next bitmask needs the token on the host
                return None
            batch.append((seq, 1))
            picked.append(row)
        if not batch or not all(self.blocks.reserve(seq, 2) for seq, _ in batch):
            return None  # (blocks a failed reserve took stay with their sequences: the next steps need them)
        ids = prev.sampled.token_ids
        if len(picked) < len(prev.batch):
            ids = ids[to_device(picked, ids.device, torch.long)]
        n = len(batch)
        return self._launch(batch, LogitRows(sample=list(range(n)), sample_at=list(range(n))), ids)

    def _continues_after_next(self, seq: Sequence) -> bool:
        """Whether the sequence goes on after the token its last queued step samples, as far as lengths tell
        (an EOS or stop token is seen only when that token is read: the row queued after it is dropped)."""
        return (len(seq.output) + 1 < seq.params.max_tokens
                and seq.num_tokens + 1 < self.scheduler.max_model_len)

    def _complete(self, launched: Launched) -> list[StepOutput]:
        """Wait for a launched step's results and advance its sequences; rows of sequences that finished
        meanwhile (aborted, or ended by the step before) are dropped."""
        host = iter(launched.copies.wait())
        rows, batch, sampled, prompt_lp = launched.rows, launched.batch, launched.sampled, launched.prompt_lp
        tokens, logprobs, prompt_entries = [], {}, []
        if sampled is not None:
            tokens = next(host).tolist()
            if sampled.logprobs is not None:
                lp = LogprobTensors(*(next(host) for _ in range(4)))
                lp_rows = [rows.sample[r] for r in sampled.logprob_rows]
                entries = lp.entries([tokens[r] for r in sampled.logprob_rows],
                                     [batch[i][0].params.logprobs for i in lp_rows])
                logprobs = dict(zip(lp_rows, entries))
        if prompt_lp is not None:
            lp = LogprobTensors(*(next(host) for _ in range(4)))
            prompt_entries = lp.entries(*prompt_lp[1:])
        return self._advance(batch, rows, tokens, logprobs, prompt_entries)

    def _drop_dead_queue(self) -> None:
        """Forget a queued step none of whose sequences is running any more (its device work is harmless: it
        writes only the unsealed slots of blocks no sequence holds, before any later step can use them)."""
        if self._queued is not None and all(seq.status is not Status.RUNNING for seq, _ in self._queued.batch):
            self._queued = None

    @staticmethod
    def _step_inputs(batch: list[tuple[Sequence, int]], ahead: int = 0
                     ) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        """(new token ids, query lens, context lens, block tables) of a step. ahead: each sequence's first new
        token is one its output does not hold yet (the device has it): the ids are placeholders then."""
        input_ids: list[int] = []
        query_lens, context_lens, tables = [], [], []
        for seq, n in batch:
            start = seq.num_computed + ahead
            input_ids += [0] * n if ahead else seq.token_slice(start, start + n)
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
        return input_ids, query_lens, context_lens, tables

    def _forward_graph(self, batch: list[tuple[Sequence, int]], rows: LogitRows, bucket,
                       ids: torch.Tensor | None = None) -> torch.Tensor:
        """The step replayed from its bucket's CUDA graph: logits of the sampled rows, renumbered 0..k-1.
        ids: the new tokens already on the device (one per sequence), instead of the host's."""
        inputs = self._step_inputs(batch, ahead=0 if ids is None else 1)
        if self.step_hook is not None:
            self.step_hook(*inputs, graph=True, ids=ids)
        if self.fault_hook is not None:  # fault injection (serving/faults.py): raises or hangs mid-forward
            self.fault_hook()
        logits = self.graphs.run(*inputs, logits_at=rows.sample_at, bucket=bucket, device_ids=ids)
        rows.sample_at = list(range(len(rows.sample_at)))
        return logits

    def _logit_rows(self, batch: list[tuple[Sequence, int]]) -> LogitRows:
        """The positions whose logits this step needs (indices into the step's new tokens): each sequence's last
        one when it samples, and all of a prompt chunk's when its request asked for prompt_logprobs."""
        rows = LogitRows()
        flat = 0  # the first position of this sequence's chunk among the step's tokens
        for i, (seq, n) in enumerate(batch):
            start = seq.num_computed
            scored = max(0, min(start + n, len(seq.prompt) - 1) - start) if seq.scoring_prompt else 0
            if scored:
                rows.prompt_spans.append((i, flat, scored))
            if start + n == seq.num_tokens:  # its last known token is in this step
                if seq.params.max_tokens == 0:
                    rows.prefill_only.append(i)  # scoring only (prompt_logprobs): nothing to sample
                else:
                    rows.sample.append(i)
                    rows.sample_at.append(flat + n - 1)
            flat += n
        return rows

    def _forward_eager(self, batch: list[tuple[Sequence, int]], rows: LogitRows,
                       ids: torch.Tensor | None = None) -> torch.Tensor:
        bs = self.kv.spec.block_size
        ahead = 0 if ids is None else 1
        input_ids, query_lens, context_lens, tables = self._step_inputs(batch, ahead)
        # The logits rows: each prompt span's, then the sampled ones (sample_at / prompt_spans are renumbered).
        positions = [first + j for _, first, count in rows.prompt_spans for j in range(count)]
        spans, at = [], 0
        for i, first, count in rows.prompt_spans:
            spans.append((i, at, count))
            at += count
        rows.prompt_spans = spans
        positions += rows.sample_at
        rows.sample_at = list(range(at, at + len(rows.sample_at)))
        meta = AttentionMetadata.build(query_lens, context_lens, tables, bs, device=self.device)
        if ids is None:
            ids = to_device(input_ids, self.device, torch.long)
        logits_at = to_device(positions or [0], self.device, torch.long)  # [0]: a throwaway row
        if self.step_hook is not None:
            self.step_hook(input_ids, query_lens, context_lens, tables, graph=False, ids=ids if ahead else None)
        if self.fault_hook is not None:  # fault injection (serving/faults.py): raises or hangs mid-forward
            self.fault_hook()
        return self.model(ids, meta.positions(), meta, self.kv.layers, logits_at)

    def _prompt_logprobs(self, batch: list[tuple[Sequence, int]], rows: LogitRows, logits: torch.Tensor):
        """The prompt tokens this step's chunks predict, their logprobs (still on the device) and each
        row's top-k size."""
        at, next_tokens, ks = [], [], []
        for i, first, count in rows.prompt_spans:
            seq = batch[i][0]
            at += range(first, first + count)
            next_tokens += seq.prompt[seq.num_computed + 1:seq.num_computed + 1 + count]
            ks += [seq.params.prompt_logprobs] * count
        raw = logits[torch.tensor(at, device=logits.device)].float().log_softmax(-1)
        return token_logprobs(raw, torch.tensor(next_tokens, device=logits.device), max(ks)), next_tokens, ks

    def _advance(self, batch: list[tuple[Sequence, int]], rows: LogitRows, sampled: list[int],
                 logprobs: dict[int, TokenLogprob], prompt_entries: list[TokenLogprob]) -> list[StepOutput]:
        entries = iter(prompt_entries)
        for i, _, count in rows.prompt_spans:  # accumulate, skipping what a preempted earlier pass scored
            seq = batch[i][0]
            for j in range(seq.num_computed + 1, seq.num_computed + 1 + count):
                entry = next(entries)
                if j == len(seq.prompt_logprobs):
                    seq.prompt_logprobs.append(entry)
        for seq, n in batch:
            if seq.status is not Status.RUNNING:  # finished while its step was queued (see _complete)
                continue
            if seq.num_computed < len(seq.prompt):
                self.prompt_tokens_computed += min(n, len(seq.prompt) - seq.num_computed)
            seq.num_computed += n
            self.blocks.seal(seq)
        self.kv.write_index(self.blocks.take_index_updates())  # after this step's K/V writes
        outputs = []
        for i in rows.prefill_only:  # max_tokens 0: the prompt is scored, the request is done
            seq = batch[i][0]
            self._finish(seq, "length")
            outputs.append(StepOutput(seq.request_id, [], "length", len(seq.prompt), seq.num_cached_prompt, 0,
                                      prompt_logprobs=list(seq.prompt_logprobs)))
        for i, token in zip(rows.sample, sampled):
            seq = batch[i][0]
            if seq.status is not Status.RUNNING:
                continue
            seq.output.append(token)
            self.generated_tokens += 1
            completed = seq.matcher is not None and self.constraints.accept(seq, token)
            reason = "stop" if completed else self._finish_reason(seq, token)
            if reason:
                self._finish(seq, reason)
            first = len(seq.output) == 1 and seq.wants_prompt_logprobs
            outputs.append(StepOutput(seq.request_id, [token], reason, len(seq.prompt), seq.num_cached_prompt,
                                      len(seq.output), logprobs=[logprobs[i]] if i in logprobs else None,
                                      prompt_logprobs=list(seq.prompt_logprobs) if first else None))
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.sequences.pop(seq.request_id, None)

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

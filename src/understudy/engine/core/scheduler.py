"""Continuous batching with chunked prefill.

Each step has a token budget. Running sequences go first (a decode costs one
token, an unfinished prefill continues with a chunk), then waiting sequences
are admitted while budget, sequence slots and KV blocks last. When the cache
runs out, the most recently admitted sequence is preempted: its blocks are
freed and it waits to be recomputed (its sealed blocks usually stay cached).

A waiting sequence whose leading prompt blocks a running prefill is computing
right now (n > 1 choices, identical prompts arriving together) waits until they
are sealed, then finds them in the prefix cache instead of computing them again.
Later waiting sequences go ahead of it meanwhile; the prefill it waits for runs
every step, so the wait ends.
"""

from __future__ import annotations

from collections import deque

from understudy.engine.core.block_manager import BlockManager
from understudy.engine.core.sequence import Sequence, Status


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: shed load instead of queueing forever."""


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting: int,
        max_model_len: int,
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse at once what could never run, instead of letting it wait forever."""
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"maximum context length of {self.max_model_len} tokens"
            )
        if self.blocks.blocks_needed(total) > self.blocks.num_blocks:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens needs more KV cache than the engine has "
                f"({self.blocks.num_blocks * self.blocks.block_size} tokens)"
            )

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        self.check_fits(len(seq.prompt), seq.params.max_tokens)
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next batch: (sequence, number of its tokens to compute in this step)."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = min(seq.num_pending, budget)
            while not self.blocks.reserve(seq, n):
                victim = self._preempt_latest(batch, keep=seq)
                if victim is None:
                    break
            else:
                batch.append((seq, n))
                budget -= n
        at = 0  # the waiting sequence considered next (those before it are deferred)
        prefilling = [s for s in self.running if s.num_computed < len(s.prompt)]
        while at < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[at]
            if not seq.block_table:
                if self._prefix_in_flight(seq, prefilling):
                    at += 1
                    continue
                if not seq.scoring_prompt:  # scoring the prompt needs every position computed
                    self.blocks.match_prefix(seq)
            n = min(seq.num_pending, budget)
            if not self.blocks.reserve(seq, n):
                # Wait for running sequences to free blocks; don't pin cached ones meanwhile.
                self.blocks.release(seq)
                seq.num_computed = 0
                break
            del self.waiting[at]
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.num_computed < len(seq.prompt):
                prefilling.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _prefix_in_flight(self, seq: Sequence, prefilling: list[Sequence]) -> bool:
        """Whether a running sequence's prefill is computing blocks this one would find cached once sealed."""
        if seq.scoring_prompt or not prefilling:
            return False
        bs = self.blocks.block_size
        shareable = (seq.num_tokens - 1) // bs  # what match_prefix may share
        if shareable == 0:
            return False
        # Its first block's hash only, until a prefill shares it: hashing a long prompt is on its first
        # token's path (match_prefix hashes up to the first miss, the engine the rest during the forward).
        first = self.blocks.hashes(seq, bs)[0]
        for other in prefilling:  # (past its prompt, a sequence has sealed every full prompt block)
            theirs = self.blocks.hashes(other, len(other.prompt))
            if not theirs or theirs[0] != first:
                continue
            mine = self.blocks.hashes(seq, shareable * bs)
            common = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            if other.num_sealed < common:
                return True
        return False

    def _preempt_latest(self, batch: list[tuple[Sequence, int]], keep: Sequence) -> Sequence | None:
        for victim in reversed(self.running):
            if victim is not keep:
                break
        else:
            return None
        self.running.remove(victim)
        batch[:] = [(s, n) for s, n in batch if s is not victim]
        self.blocks.release(victim)
        victim.num_computed = 0
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        self.preemptions += 1
        return victim

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

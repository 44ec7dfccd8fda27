"""A request as the engine sees it: tokens, progress through the KV cache, how it ends."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from understudy.engine.core.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache
    num_sealed: int = 0  # leading blocks of block_table already registered in the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    status: Status = Status.WAITING
    finish_reason: str | None = None  # stop, length, abort, error
    error: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole prompt + output list (hot in every step)."""
        p = len(self.prompt)
        if end <= p:
            return self.prompt[start:end]
        if start >= p:
            return self.output[start - p:end - p]
        return self.prompt[start:] + self.output[:end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        """Tokens that still need a forward pass before the next token can be sampled."""
        return self.num_tokens - self.num_computed

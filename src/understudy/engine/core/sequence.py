"""A request as the engine sees it: tokens, progress through the KV cache, how it ends."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from understudy.common.params import SamplingParams, TokenLogprob


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
    seed: int = 0  # the sampler's noise is a pure function of (seed, output position, token id)
    matcher: object | None = None  # the grammar state of a structured request (engine/core/constraints.py)
    # Entry j: token j of the prompt given tokens before it (entry 0 is None); filled during prefill
    # when params.prompt_logprobs is set, chunk by chunk.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])
    _prompt_on_device: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_generated(self) -> int:
        """Output tokens so far, the resumed ones (generated elsewhere, now in the prompt) included."""
        return self.params.resumed_tokens + len(self.output)

    def generated_slice(self) -> tuple[int, int]:
        """Where the resumed tokens start in the prompt and how many output tokens follow them."""
        return len(self.prompt) - self.params.resumed_tokens, len(self.output)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def scoring_prompt(self) -> bool:
        """It asked for prompt_logprobs and some prompt positions are not scored yet."""
        return self.wants_prompt_logprobs and len(self.prompt_logprobs) < len(self.prompt)

    def prompt_tensor(self, device: torch.device) -> torch.Tensor:
        """The prompt as an int64 tensor on the device, made once (the penalties read it every step)."""
        if self._prompt_on_device is None or self._prompt_on_device.device != device:
            self._prompt_on_device = torch.tensor(self.prompt, dtype=torch.long, device=device)
        return self._prompt_on_device

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

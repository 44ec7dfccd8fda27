"""Sampling parameters: a plain dataclass, free of torch, so the frontend can build them too."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# Temperatures below this sample greedily.
# BUGFIX (tests/test_http_fuzz.py::test_tiny_temperature_and_top_p_do_not_kill_the_engine): temperature=1e-300
# is 0 in float32, and the logits divided by it gave NaN probabilities: torch.multinomial raised inside the
# step and the engine died (a query of death).
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # the most top alternatives a request may ask for (OpenAI's bound)
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_call")


@dataclass(frozen=True)
class StructuredSpec:
    """What the output must match (engine/core/constraints.py compiles it).

    value: JSON schema text (json_schema, tool_call), "" (json_object), a regex, a JSON list of choices,
    or an EBNF / lark grammar text."""

    kind: str
    value: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities: the model's own log_softmax (float32), before any sampling transform."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: tuple[tuple[int, float], ...] = ()  # the top-k (id, logprob), most likely first


def choice_seed(seed: int, j: int) -> int:
    """The seed of choice j of an n > 1 request; choice 0 keeps the request's seed."""
    if j == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # in [0, 2**63)


@dataclass
class SamplingParams:
    max_tokens: int = 16  # 0 only with prompt_logprobs: score the prompt, generate nothing
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) means no limit
    seed: int | None = None  # a seeded request gives the same tokens every time (the engine draws one if None)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default=())  # applied where text exists (the HTTP layer)
    # The last `resumed_tokens` prompt tokens are this request's own output, generated elsewhere (a migration
    # resends prompt + tokens so far): the seeded sampler's positions, the penalties over output tokens,
    # min_tokens and the grammar all count them as output.
    resumed_tokens: int = 0
    presence_penalty: float = 0.0  # [-2, 2] OpenAI: minus this for each token that occurs in the output
    frequency_penalty: float = 0.0  # [-2, 2] OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # (0, 2] HF / vLLM: over prompt + output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    min_p: float = 0.0  # [0, 1]: drop tokens below min_p times the most likely one's probability
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many output tokens
    allowed_token_ids: tuple[int, ...] | None = None  # vLLM: sample only among these
    logprobs: int | None = None  # None: none; k in [0, 20]: the sampled token's logprob + the top k
    prompt_logprobs: int | None = None  # None: none; k in [0, 20]: per prompt token (the first one: None)
    structured: StructuredSpec | None = None

    def validate(self) -> None:
        least = 0 if self.prompt_logprobs is not None else 1
        if self.max_tokens < least:
            raise ValueError(f"max_tokens must be at least {least}, got {self.max_tokens}"
                             + ("" if least == 0 else " (0 is allowed only with prompt_logprobs)"))
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if self.resumed_tokens < 0:
            raise ValueError(f"resumed_tokens must be at least 0, got {self.resumed_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if token < 0:
                raise ValueError(f"logit_bias token ids must be at least 0, got {token}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be at least 0, got {self.min_tokens}")
        # max_tokens counts new tokens only, min_tokens the resumed ones too (a migration resends both)
        if self.max_tokens and self.min_tokens > self.max_tokens + self.resumed_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
            if min(self.allowed_token_ids) < 0:
                raise ValueError("allowed_token_ids must be at least 0")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        if self.structured is not None and self.structured.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured.kind must be one of {', '.join(STRUCTURED_KINDS)}, "
                             f"got {self.structured.kind!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """The token ids this request names exist in a vocabulary of vocab_size (the engine knows it)."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]),
                          ("allowed_token_ids", self.allowed_token_ids or ())):
            if ids and max(ids) >= vocab_size:
                raise ValueError(f"{name} token ids must be below the vocabulary size {vocab_size}, got {max(ids)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

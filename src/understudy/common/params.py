"""Sampling parameters: a plain dataclass, free of torch, so the frontend can build them too."""

from __future__ import annotations

from dataclasses import dataclass, field

# Temperatures below this sample greedily.
# BUGFIX (tests/test_http_fuzz.py::test_tiny_temperature_and_top_p_do_not_kill_the_engine): temperature=1e-300
# is 0 in float32, and the logits divided by it gave NaN probabilities: torch.multinomial raised inside the
# step and the engine died (a query of death).
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) means no limit
    seed: int | None = None  # a seeded request gives the same tokens every time
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default=())  # applied where text exists (the HTTP layer)
    # Draws the seeded generator already made for this request elsewhere: a request migrated after
    # n tokens resumes the same random stream, so it samples what the undisturbed run would have.
    seed_offset: int = 0

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if self.seed_offset < 0:
            raise ValueError(f"seed_offset must be at least 0, got {self.seed_offset}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

"""Stop strings in streamed text (common/openai_serving.py cuts every choice with it).

Shared by the engine's OpenAI endpoints and the frontend (which detokenises what engines send),
so both cut the same text at the same place. Free of torch.
"""

from __future__ import annotations


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may start one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def push(self, text: str, final: bool) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

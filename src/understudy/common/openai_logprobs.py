"""Logprobs as OpenAI (and vLLM) write them: the completions `logprobs` object, the chat `logprobs.content`
entries and vLLM's `prompt_logprobs`, with token texts cached per answer."""

from __future__ import annotations

from typing import Any

from understudy.common.params import TokenLogprob
from understudy.common.tokenizer import Tokenizer

LOWEST_LOGPROB = -9999.0  # what -inf is sent as (JSON has no infinity), as vLLM does


class TokenTexts:
    """Token id -> its text as logprobs show it (cached: the same ids recur)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def _lp(x: float) -> float:
    return max(x, LOWEST_LOGPROB)


def completion_logprobs(entries: list[TokenLogprob | None], ids: list[int], text_of: TokenTexts,
                        offset: int) -> tuple[dict[str, list], int]:
    """The `logprobs` object of /v1/completions for these tokens (None entries: the prompt's first token),
    and the text offset after them."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, e in zip(ids, entries):
        text = text_of(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(e.logprob))
        top: dict[str, float] = {}
        for i, lp in e.top:  # most likely first: a text shared by several tokens keeps the likeliest
            top.setdefault(text_of(i), _lp(lp))
        top.setdefault(text, _lp(e.logprob))  # the sampled token is always listed (as vLLM does)
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenTexts, k: int) -> list[dict[str, Any]]:
    """The `logprobs.content` entries of /v1/chat/completions."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = text_of(token_id)
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}
    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top[:k]]} for e in entries]


def prompt_logprobs_body(entries: list[TokenLogprob | None], text_of: TokenTexts) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}."""
    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        d = {str(e.token_id): {"logprob": _lp(e.logprob), "rank": e.rank, "decoded_token": text_of(e.token_id)}}
        for rank, (i, lp) in enumerate(e.top, 1):
            d.setdefault(str(i), {"logprob": _lp(lp), "rank": rank, "decoded_token": text_of(i)})
        out.append(d)
    return out

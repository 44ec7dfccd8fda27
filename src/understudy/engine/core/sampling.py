"""The sampler: one batched pass on the device from logits to the next token of every row.

Order of the transforms (docs/engine.md, "Sampling and logprobs"):
  grammar bitmask -> logit_bias -> allowed_token_ids -> min_tokens (EOS and stop ids masked) ->
  repetition penalty (prompt + output) -> presence / frequency penalties (output) ->
  greedy rows: argmax | others: temperature -> top_k -> top_p -> min_p -> exponential race.

The random draw is an exponential race: token = argmax(p / E) with E ~ Exp(1) per token, which picks
token t with probability p_t. E comes from an integer hash of (seed, output position, token id), so a
request draws the same tokens whatever the batch around it and after a migration (no generator state).
Logprobs are the model's own log_softmax in float32, before any transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from understudy.common.params import SamplingParams, TokenLogprob  # SamplingParams: also imported from here
from understudy.engine.core.host_copies import to_device
from understudy.engine.layers import fused

if TYPE_CHECKING:
    from understudy.engine.core.sequence import Sequence

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


@dataclass
class LogprobTensors:
    """Per row on the device: the chosen token's logprob and rank, and the top-k (id, logprob)."""

    logprob: Tensor  # [N] float32
    rank: Tensor  # [N] int64, 1 = most likely
    top_ids: Tensor  # [N, k] int64
    top_logprobs: Tensor  # [N, k] float32

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.logprob, self.rank, self.top_ids, self.top_logprobs

    def entries(self, token_ids: list[int], ks: list[int]) -> list[TokenLogprob]:
        """Host tensors -> one TokenLogprob per row (its token token_ids[i]), row i keeping its own top ks[i]."""
        lps, ranks = self.logprob.tolist(), self.rank.tolist()
        ids, tops = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [TokenLogprob(token_ids[i], lps[i], ranks[i], tuple(zip(ids[i][:k], tops[i][:k])))
                for i, k in enumerate(ks)]


@dataclass
class Sampled:
    """The sampler's result, still on the device (host_copies.start_to_host brings it over)."""

    token_ids: Tensor  # [B] int64
    logprob_rows: list[int]  # rows that asked for logprobs
    logprobs: LogprobTensors | None  # for logprob_rows


def sample(logits: Tensor, seqs: list[Sequence], *, eos_token_ids: frozenset[int] | tuple[int, ...] = (),
           bitmask: Tensor | None = None, ahead: Tensor | None = None) -> Sampled:
    """The next token of each row of logits [B, V] (row i belongs to seqs[i]); nothing leaves the device.
    ahead [B]: each sequence's latest token, sampled on the device and not in its `output` yet (a step queued
    behind the one that sampled it, engine/core/llm_engine.py): it counts as output for min_tokens, the
    penalties and the noise's output position."""
    device, batch = logits.device, logits.shape[0]
    params = [s.params for s in seqs]
    logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw = logits[_index(logprob_rows, batch, device)].float().log_softmax(-1) if logprob_rows else None
    logits = apply_transforms(logits, seqs, eos_token_ids=eos_token_ids, bitmask=bitmask, ahead=ahead)
    n_ahead = 0 if ahead is None else 1
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(random_rows) < batch:
        token_ids = fused.argmax(logits)  # torch.argmax's answer, one Triton pass on CUDA
    if random_rows:
        idx = _index(random_rows, batch, device)
        chosen = _race(filtered_probs(logits[idx], [params[i] for i in random_rows]),
                       [seqs[i] for i in random_rows], n_ahead)
        if len(random_rows) == batch:
            token_ids = chosen
        else:
            token_ids[idx] = chosen
    logprobs = None
    if raw is not None:
        logprobs = token_logprobs(raw, token_ids[_index(logprob_rows, batch, device)],
                                  max(params[i].logprobs for i in logprob_rows))
    return Sampled(token_ids, logprob_rows, logprobs)


def apply_transforms(logits: Tensor, seqs: list[Sequence], *, eos_token_ids=(),
                     bitmask: Tensor | None = None, ahead: Tensor | None = None) -> Tensor:
    """Bitmask, logit_bias, allowed_token_ids, min_tokens, repetition / presence / frequency penalties:
    a new float32 tensor (the input may be a CUDA graph's output buffer). A batch that asks for none of them
    (plain decoding, the usual step) gets the logits as they are, in float32: no [B, V] copy."""
    n_ahead = 0 if ahead is None else 1
    if bitmask is None and not any(_transformed(s, n_ahead) for s in seqs):
        return logits.float()
    logits = logits.to(torch.float32, copy=True)
    if bitmask is not None:
        allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])
        logits.masked_fill_(~allowed, float("-inf"))
    _apply_bias_and_masks(logits, seqs, frozenset(eos_token_ids), n_ahead)
    _apply_penalties(logits, seqs, ahead)
    return logits


def token_logprobs(logprobs: Tensor, token_ids: Tensor, k: int) -> LogprobTensors:
    """logprobs [N, V] (log_softmax) and the token of each row -> its logprob, rank and the top k."""
    chosen = logprobs.gather(1, token_ids[:, None])
    rank = (logprobs > chosen).sum(dim=-1) + 1
    top = logprobs.topk(k, dim=-1) if k > 0 else None
    empty = logprobs.new_empty(len(token_ids), 0)
    return LogprobTensors(chosen[:, 0], rank, top.indices if top else empty.long(), top.values if top else empty)


def unpack_bitmask(bitmask: Tensor, vocab: int) -> Tensor:
    """int32 [B, W] (bit t % 32 of word t // 32 allows token t) -> bool [B, vocab]; tokens past 32 * W: not allowed."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.cat([bits, bits.new_zeros(bits.shape[0], vocab - bits.shape[1])], dim=1)


# -- the transforms ------------------------------------------------------------------------------------------


def _transformed(s: Sequence, n_ahead: int = 0) -> bool:
    """Whether a row's logits change before sampling (the transforms below; the grammar is the bitmask's)."""
    p = s.params
    return bool(p.logit_bias or p.allowed_token_ids is not None or s.num_generated + n_ahead < p.min_tokens
                or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)


def _apply_bias_and_masks(logits: Tensor, seqs: list[Sequence], eos: frozenset[int], n_ahead: int = 0) -> None:
    """logit_bias, allowed_token_ids and min_tokens, in place (host lists -> one index tensor each)."""
    device, vocab = logits.device, logits.shape[1]
    rows, toks, vals = [], [], []
    for i, s in enumerate(seqs):
        for t, b in s.params.logit_bias:
            rows.append(i), toks.append(t), vals.append(b)
    if rows:
        logits.index_put_((_tensor(rows, device), _tensor(toks, device)), _tensor(vals, device, torch.float32),
                          accumulate=True)
    rows, toks = [], []
    allowed_rows = [i for i, s in enumerate(seqs) if s.params.allowed_token_ids is not None]
    for i in allowed_rows:
        ids = seqs[i].params.allowed_token_ids
        rows += [i] * len(ids)
        toks += ids
    if allowed_rows:
        allow = torch.zeros_like(logits, dtype=torch.bool)
        allow.index_put_((_tensor(rows, device), _tensor(toks, device)), torch.ones((), dtype=torch.bool, device=device))  # a fill, not a copy
        listed = torch.zeros(len(seqs), 1, dtype=torch.bool, device=device)
        listed[_tensor(allowed_rows, device)] = True
        logits.masked_fill_(listed & ~allow, float("-inf"))
    rows, toks = [], []
    for i, s in enumerate(seqs):
        p = s.params
        if s.num_generated + n_ahead < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
            stops = [t for t in stops if 0 <= t < vocab]
            rows += [i] * len(stops)
            toks += stops
    if rows:
        logits.index_put_((_tensor(rows, device), _tensor(toks, device)), torch.full((), float("-inf"), device=device))


def _apply_penalties(logits: Tensor, seqs: list[Sequence], ahead: Tensor | None = None) -> None:
    """Repetition penalty (HF / vLLM, over prompt + output tokens), then presence and frequency penalties
    (OpenAI, over output tokens, the resumed ones included), in place. ahead: each row's latest output token,
    still only on the device (see sample)."""
    device = logits.device
    rep_rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep_rows:
        rows, toks = _history(seqs, rep_rows, device, whole_prompt=True, ahead=ahead)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[rows, toks] = True
        penalty = _tensor([s.params.repetition_penalty for s in seqs], device, torch.float32)[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalised, logits))
    pf_rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    if pf_rows:
        rows, toks = _history(seqs, pf_rows, device, whole_prompt=False, ahead=ahead)
        counts = torch.zeros_like(logits)
        counts.index_put_((rows, toks), torch.ones_like(toks, dtype=torch.float32), accumulate=True)
        presence = _tensor([s.params.presence_penalty for s in seqs], device, torch.float32)[:, None]
        frequency = _tensor([s.params.frequency_penalty for s in seqs], device, torch.float32)[:, None]
        logits -= frequency * counts + presence * (counts > 0)


def _history(seqs: list[Sequence], rows: list[int], device: torch.device, *, whole_prompt: bool,
             ahead: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(row, token) index tensors over each listed row's prompt + output tokens (whole_prompt) or its output
    tokens, the resumed ones (the tail of the prompt) included, and its `ahead` token. The prompt lives on
    the device already."""
    flat_output = _tensor([t for i in rows for t in seqs[i].output], device)
    parts, lengths, at = [], [], 0
    for i in rows:
        s = seqs[i]
        start, n_out = s.generated_slice()
        prompt = s.prompt_tensor(device)
        head = prompt if whole_prompt else prompt[start:]
        parts += [head, flat_output[at:at + n_out]]
        lengths.append(len(head) + n_out)
        if ahead is not None:
            parts.append(ahead[i:i + 1])
            lengths[-1] += 1
        at += n_out
    toks = torch.cat(parts)
    row_ids = torch.repeat_interleave(_tensor(rows, device), _tensor(lengths, device), output_size=len(toks))
    return row_ids, toks


def filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Temperature, top_k, top_p, min_p -> unnormalised probabilities (0 for dropped tokens)."""
    device, vocab = logits.device, logits.shape[-1]
    logits = logits / _tensor([p.temperature for p in params], device, torch.float32)[:, None]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    if any(p < 1 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)
        sorted_logits.masked_fill_(ranks >= _tensor(top_k, device)[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays: a top_p
        # that is 0 in float32, e.g. 1e-300, dropped every token and the step died on NaN probabilities)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= _tensor(top_p, device, torch.float32)[:, None]
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)
    elif any(k < vocab for k in top_k):
        kth = logits.topk(max(top_k), dim=-1).values.gather(1, _tensor(top_k, device)[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        floor = probs.max(dim=-1, keepdim=True).values * _tensor(min_p, device, torch.float32)[:, None]
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _race(probs: Tensor, seqs: list[Sequence], n_ahead: int = 0) -> Tensor:
    """argmax(p / E), E ~ Exp(1) per (row, token) from each row's (seed, output position)."""
    keys = [_row_key(s.seed, s.num_generated + n_ahead) for s in seqs]
    k1 = _tensor([_signed32(k & _M32) for k in keys], probs.device, torch.int32)[:, None]
    k2 = _tensor([_signed32(k >> 32) for k in keys], probs.device, torch.int32)[:, None]
    return probs.div_(exponentials(k1, k2, probs.shape[1])).argmax(dim=-1)


def exponentials(k1: Tensor, k2: Tensor, vocab: int) -> Tensor:
    """Exp(1) noise [B, vocab] from two 32-bit keys per row [B, 1] (int32).

    The hash works on int32 in place (the arithmetic wraps mod 2**32 on CPU and CUDA; a right shift is
    made logical by masking): per row it is a bijection of the token id, so no two tokens share a draw."""
    tokens = torch.arange(vocab, device=k1.device, dtype=torch.int32)
    h = tokens[None, :] ^ k1
    scratch = torch.empty_like(h)
    _mix32_(h, scratch)
    h.bitwise_xor_(k2)
    _mix32_(h, scratch)
    torch.bitwise_right_shift(h, 8, out=scratch)
    u = scratch.bitwise_and_(0xFFFFFF).to(torch.float32)  # 24 bits: exact in float32
    # (u + 0.5) / 2**24 is in (0, 1), but its largest value rounds to 1.0 in float32: E would be 0 there, and
    # a dropped token's 0 / 0 a NaN that argmax picks (about one step in 130 at a 128k vocabulary). The floor
    # changes that one draw only.
    return u.add_(0.5).mul_(1.0 / (1 << 24)).log_().neg_().clamp_(min=2.0 ** -26)  # E in (0, 17]


def _mix32_(x: Tensor, scratch: Tensor) -> None:
    """A 32-bit integer hash (xorshift-multiply, "lowbias32"), in place on int32."""
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
        torch.bitwise_right_shift(x, shift, out=scratch)
        x.bitwise_xor_(scratch.bitwise_and_((1 << (32 - shift)) - 1))  # a logical shift
        if multiplier is not None:
            x.mul_(_signed32(multiplier))


def _signed32(v: int) -> int:
    """A 32-bit pattern as the int32 that holds it."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _row_key(seed: int, position: int) -> int:
    """64 bits that depend on the request's seed and the output position (splitmix64, on the host)."""
    return _mix64((_mix64((seed + 0x9E3779B97F4A7C15) & _M64) + position) & _M64)


def _mix64(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _tensor(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    return to_device(values, device, dtype)  # does not wait for the step queued on the device


def _index(rows: list[int], batch: int, device: torch.device) -> Tensor | slice:
    """An index for the listed rows: a plain slice when they are all rows (no gather, no copy)."""
    return slice(None) if len(rows) == batch else _tensor(rows, device)

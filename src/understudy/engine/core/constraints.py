"""Structured output: the allowed next tokens of requests whose output must match a grammar.

`Constraints` binds llguidance (the grammar engine; Rust, runs on the CPU) to one tokenizer's vocabulary.
The engine asks it for an int32 bitmask of the allowed tokens of each constrained row (bit j of word i allows
token 32*i + j), computed after the forward was launched so that on CUDA it overlaps the GPU step; the sampler
masks the logits with it (`apply_bitmask`) and every sampled token advances the row's matcher (`accept`).

One spec (SamplingParams.structured: a JSON schema, any JSON object, a regex, a list of choices, a lark / GBNF
grammar, or a tool call's schema) is compiled once per engine; each request gets a copy of the compiled matcher.
A migrated request replays its resumed tokens (its own output from another engine) into the copy first.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

import llguidance
import torch
from torch import Tensor

from understudy.logs import log

if TYPE_CHECKING:
    from understudy.common.params import StructuredSpec
    from understudy.common.tokenizer import Tokenizer
    from understudy.engine.core.sequence import Sequence as Seq

logger = logging.getLogger("understudy.engine.constraints")

# What each spec kind is, in error messages (the HTTP layer names the request field).
_KIND_NAMES = {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regex",
               "choice": "choice list", "grammar": "grammar", "tool_call": "tool call schema"}
# JSON as json.dumps writes it (", " and ": ", no other whitespace): the layout models saw most, and a model
# cannot wander off into endless whitespace inside the object (a known failure of flexible-whitespace JSON).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_PHANTOM_EOS = "<|understudy_no_eos|>"  # llguidance needs an end token; a vocabulary without one gets this


class Constraints:
    """The grammar engine bound to one tokenizer (see the module doc).

    vocab_size: the model's (its logits' width; may be larger than the tokenizer's: the padding ids are never
    allowed to a constrained row). eos_token_ids: the engine's stop tokens, allowed where a grammar may end."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int] = (), *,
                 device: torch.device | str = "cpu", cache_size: int = 64, threads: int | None = None):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.cache_size = cache_size
        backend = tokenizer.backend
        real_vocab = backend.get_vocab_size(with_added_tokens=True)
        eos = [i for i in eos_token_ids if 0 <= i < real_vocab]
        if not eos:  # a copy of the vocabulary with one extra token: the end no row may sample
            from tokenizers import AddedToken
            from tokenizers import Tokenizer as Backend

            backend = Backend.from_str(backend.to_str())
            backend.add_special_tokens([AddedToken(_PHANTOM_EOS, special=True, normalized=False)])
            eos = [backend.token_to_id(_PHANTOM_EOS)]
        self.eos_token_ids = tuple(eos)
        # n_vocab: the masks llguidance writes are at least as wide as ours, so they fill our rows in place.
        self._ll = llguidance.LLTokenizer(backend.to_str(), n_vocab=max(vocab_size, len(backend.get_vocab(True))),
                                          eos_token=eos)
        self._words = -(-self._ll.vocab_size // 32)  # a row of llguidance's mask
        # The tokens a constrained row may ever take: the tokenizer's (and the engine's stop tokens), below
        # the model's vocab size: not the model's padding rows, not the phantom end token.
        usable = torch.zeros(self._words * 32, dtype=torch.bool)
        usable[:min(real_vocab, vocab_size)] = True
        usable[[i for i in eos_token_ids if 0 <= i < vocab_size]] = True
        self._usable = _pack_bits(usable)  # int32 [words]
        self._executor = llguidance.LLExecutor(threads)
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()

    # -- the engine's three calls --------------------------------------------------
    def start(self, seq: Seq) -> None:
        """Attach a matcher for seq.params.structured to seq (seq.matcher; nothing when there is no spec) and
        replay the request's resumed tokens into it. ValueError for a bad spec, or resumed tokens the grammar
        does not allow."""
        spec = seq.params.structured
        if spec is None:
            return
        matcher = self._compile(spec).deep_copy()
        resumed = seq.params.resumed_tokens
        replay = (seq.prompt[len(seq.prompt) - resumed:] if resumed else []) + seq.output
        if replay and not matcher.consume_tokens(replay):
            raise ValueError(f"the resumed tokens do not follow the {_KIND_NAMES[spec.kind]}: "
                             f"{_short(matcher.get_error())}")
        seq.matcher = matcher

    def bitmask(self, seqs: Sequence[Seq]) -> Tensor | None:
        """int32 [len(seqs), ceil(vocab_size / 32)] on the engine's device: the allowed next tokens of each
        row with a matcher, all ones for the others; None when no row has one."""
        rows = [(seq.matcher, i) for i, seq in enumerate(seqs) if seq.matcher is not None]
        if not rows:
            return None
        pin = self.device.type == "cuda"
        host = torch.full((len(seqs), self._words), -1, dtype=torch.int32, pin_memory=pin)
        # One call for the batch: llguidance's threads compute the rows in parallel, without the GIL.
        self._executor.unsafe_compute_mask_ptr(rows, host.data_ptr(), self._words * 4, len(seqs))
        constrained = torch.tensor([i for _, i in rows])
        host[constrained] &= self._usable
        mask = host[:, :-(-self.vocab_size // 32)]
        return mask.to(self.device, non_blocking=True) if self.device.type != "cpu" else mask

    def accept(self, seq: Seq, token: int) -> bool:
        """Advance seq's matcher over its sampled token; True when the grammar is complete (no token but the
        end may follow) and the request should finish with "stop". Rows without a matcher: False."""
        matcher = seq.matcher
        if matcher is None:
            return False
        if not matcher.consume_token(token):
            # Only a token outside the mask gets here (the sampler did not apply it): end the request rather
            # than continue with output the grammar rejects.
            log(logger, "constraint_rejected_token", level=logging.WARNING, request_id=seq.request_id,
                token=token, error=_short(matcher.get_error()))
            return True
        return matcher.is_stopped()

    # -- compiling -------------------------------------------------------------------
    def _compile(self, spec: StructuredSpec) -> llguidance.LLMatcher:
        key = (spec.kind, spec.value)
        matcher = self._compiled.get(key)
        if matcher is not None:
            self._compiled.move_to_end(key)
            return matcher
        matcher = llguidance.LLMatcher(self._ll, grammar_text(spec), log_level=0, limits=self._limits)
        if matcher.is_error():
            raise ValueError(f"invalid {_KIND_NAMES[spec.kind]}: {_short(matcher.get_error())}")
        self._compiled[key] = matcher
        if len(self._compiled) > self.cache_size:
            self._compiled.popitem(last=False)
        return matcher


def grammar_text(spec: StructuredSpec) -> str:
    """llguidance's grammar for a spec; ValueError when the spec's text is not even of the right shape."""
    kind, value = spec.kind, spec.value
    name = _KIND_NAMES.get(kind)
    if name is None:
        raise ValueError(f"unknown structured output kind {kind!r} (one of {', '.join(_KIND_NAMES)})")
    if kind in ("json_schema", "tool_call", "json_object"):
        try:
            schema = json.loads(value) if kind != "json_object" else {"type": "object"}
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid {name}: not JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"invalid {name}: a schema is a JSON object, got {type(schema).__name__}")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        try:
            choices = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid {name}: not JSON ({e})") from None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"invalid {name}: it must be a non-empty list of strings")
        # Lark string literals take JSON's escapes.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    try:  # grammar: lark, or GBNF (llama.cpp's EBNF, as vLLM's guided_grammar takes), told apart by llguidance
        return llguidance.grammar_from("grammar", value)
    except ValueError as e:
        raise ValueError(f"invalid {name}: {_short(str(e))}") from None


def apply_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """logits [B, V] with the tokens a row's bitmask [B, ceil(V/32)] does not allow set to -inf (a new tensor:
    the model's logits come out of inference mode, which forbids writing into them)."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :logits.shape[-1]]
    return logits.masked_fill(~allowed, float("-inf"))


def _pack_bits(allowed: Tensor) -> Tensor:
    """bool [32 * W] -> int32 [W], bit j of word i = allowed[32 * i + j]."""
    weights = torch.tensor([1 << j for j in range(32)], dtype=torch.int64)
    words = (allowed.view(-1, 32).long() * weights).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _short(message: str) -> str:
    """llguidance's error on one line, without its source excerpts (the indented lines)."""
    lines = [line for line in message.strip().split("\n") if line and not line[0].isspace()]
    return " ".join(lines)[:500]

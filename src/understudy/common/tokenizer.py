"""Text <-> token ids, chat templates, and streaming detokenization.

Backed by the `tokenizers` library (the Rust tokenizer transformers also uses);
chat templates are rendered with jinja2 the way transformers renders them. A
tokenizer comes from a Hugging Face directory (tokenizer.json +
tokenizer_config.json) or from the vocabulary embedded in a GGUF file.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

PathLike = str | os.PathLike

# Pre-tokenizer split patterns, as in the models' own tokenizer.json files.
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# llama.cpp's tokenizer.ggml.pre names for byte-level BPE vocabularies we can rebuild exactly.
_SPLIT_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"default", "gpt-2", "gpt2", "olmo", "mpt"}


class Tokenizer:
    def __init__(
        self,
        backend: _Backend,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: PathLike, chat_template: str | None = None) -> "Tokenizer":
        """From a HF model directory or a .gguf file; `chat_template` (the text of --chat-template) replaces
        the model's own."""
        if Path(path).is_file() and str(path).endswith(".gguf"):
            tokenizer = cls.from_gguf(path)
        else:
            tokenizer = cls.from_hf_dir(path)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        return tokenizer

    @classmethod
    def from_hf_dir(cls, model_dir: PathLike) -> "Tokenizer":
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{model_dir} has no tokenizer.json (slow/SentencePiece-only tokenizers are not supported)"
            )
        backend = _Backend.from_file(str(model_dir / "tokenizer.json"))
        cfg: dict[str, Any] = {}
        if (model_dir / "tokenizer_config.json").is_file():
            cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (model_dir / "chat_template.jinja").is_file():  # newer transformers save it apart
            template = (model_dir / "chat_template.jinja").read_text()
        return cls(
            backend,
            chat_template=template,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
        )

    @classmethod
    def from_gguf(cls, path: PathLike) -> "Tokenizer":
        from understudy.common.gguf_file import gguf_field, open_gguf

        reader = open_gguf(path)
        tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")

        def special(key: str) -> str | None:
            idx = gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
            return None if idx is None else tokens[idx]

        kind = gguf_field(reader, "tokenizer.ggml.model")
        pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
        if kind == "gpt2" and (pre in _SPLIT_DIGITS_PRE or pre in _GPT2_PRE or pre in ("qwen2", "llama-bpe")):
            backend = _byte_level_bpe_from_gguf(reader, tokens, pre)
        else:
            # SentencePiece ("llama") and other vocabularies: transformers knows how to convert them.
            backend = _backend_via_transformers(path, kind, pre)
        bos_id = gguf_field(reader, "tokenizer.ggml.bos_token_id")
        if gguf_field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
            bos = tokens[bos_id]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, bos_id)]
            )
        return cls(
            backend,
            chat_template=gguf_field(reader, "tokenizer.chat_template"),
            bos_token=special("bos"),
            eos_token=special("eos"),
            pad_token=special("padding"),
        )

    # ---------------------------------------------------------------- encode / decode

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's template; extra kwargs reach the template
        (e.g. tools=..., enable_thinking=False for Qwen3)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = _compile_template(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **kwargs,
        )
        # The template already contains any BOS it wants: don't let the post-processor add another.
        return self.encode(text, add_special_tokens=False) if tokenize else text


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids, never splitting a character.

    Byte-level BPE can spread one UTF-8 character over several tokens, and
    SentencePiece decodes a leading space differently at the start of a string. So
    each step decodes a small window of recent tokens twice (with and without the
    newest ones) and emits only the new, complete suffix.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - 5, 0)  # context window start
        self.read_offset = len(self.ids)  # first token whose text is not emitted yet
        self.text = ""  # everything emitted so far

    def push(self, token_ids: int | Sequence[int]) -> str:
        """Add token(s); return the text they completed ("" while a character is partial)."""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or the last character is still incomplete
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At end of stream: whatever is left, even an incomplete character (as U+FFFD)."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        delta = decode(self.ids[self.prefix_offset :])[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


# -------------------------------------------------------------------- helpers


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value


@lru_cache(maxsize=16)
def _compile_template(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Same environment settings as transformers, so templates written for it render identically.
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _byte_level_bpe_from_gguf(reader, tokens: list[str], pre: str) -> _Backend:
    from understudy.common.gguf_file import gguf_field

    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    backend = _Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SPLIT_DIGITS_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("qwen2", "llama-bpe"):
        pattern = _QWEN2_PATTERN if pre == "qwen2" else _LLAMA3_PATTERN
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    # token_type 3 = control (e.g. <|im_end|>), 4 = user-defined: match them whole, never split.
    types = gguf_field(reader, "tokenizer.ggml.token_type") or []
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    )
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4])
    return backend


def _backend_via_transformers(path: PathLike, kind: str, pre: str) -> _Backend:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise NotImplementedError(
            f"GGUF tokenizer model {kind!r} (pre-tokenizer {pre!r}) needs `transformers` to be converted; "
            "pip install transformers"
        ) from e
    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).backend_tokenizer

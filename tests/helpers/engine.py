"""Test-only helpers: tiny transformers models and a greedy loop over the paged-KV forward."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from understudy.engine.layers.attention import AttentionMetadata
from understudy.engine.model.decoder import CausalLM
from understudy.engine.model.config import ModelConfig

# Tiny random models of each family. Weights use a larger init than transformers'
# default (0.02) so logits are peaked and greedy choices are not near-ties.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

FAMILIES = {
    # Llama 3.1-style RoPE scaling; a small original context so the scaling changes
    # most frequencies and a mistake would show in the logits.
    "llama": dict(
        rope_theta=10000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    # Qwen2: q/k/v bias, and tied embeddings (no lm_head in the checkpoint).
    "qwen2": dict(tie_word_embeddings=True),
    # Qwen3: q_norm/k_norm and an explicit head_dim that is not hidden/heads.
    "qwen3": dict(head_dim=32, tie_word_embeddings=False),
}


def build_hf_model(family: str, seed: int = 0):
    import transformers

    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    config = cls[0](**TINY, **FAMILIES[family])
    model = cls[1](config).eval().to(torch.float32)
    # transformers initializes norms to 1 and biases to 0; randomize them so that a
    # weight loaded under the wrong name changes the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generation: the reference our engine must match."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


class PagedKV:
    """A torch-allocated paged cache: one (k, v) pair of [num_blocks, block_size, kv_heads, head_dim]
    per layer. Blocks are handed out in a shuffled order so block tables are never contiguous."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype=torch.float32, seed: int = 0):
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.block_size = block_size
        self.caches = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(config.num_hidden_layers)
        ]
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        while len(table) * self.block_size < num_tokens:
            table.append(self.free.pop())


@dataclass
class _Seq:
    tokens: list[int]
    prompt_len: int
    computed: int = 0  # tokens whose K/V are already in the cache
    table: list[int] = field(default_factory=list)


def greedy_generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    block_size: int = 4,
    chunk_size: int | None = None,
    kv: PagedKV | None = None,
) -> list[list[int]]:
    """Greedy decoding, continuous-batching style: every step puts each unfinished sequence's
    next piece (a prefill chunk of at most `chunk_size` tokens, or its one decode token) into
    a single flat forward. Different prompt lengths therefore mix prefill and decode steps."""
    if kv is None:
        need = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
        kv = PagedKV(model.config, need + 3, block_size)
    seqs = [_Seq(list(p), len(p)) for p in prompts]
    while True:
        active = [s for s in seqs if len(s.tokens) - s.prompt_len < max_new_tokens]
        if not active:
            return [s.tokens[s.prompt_len :] for s in seqs]
        pieces = []
        for s in active:
            piece = s.tokens[s.computed :]
            if chunk_size is not None:
                piece = piece[:chunk_size]
            kv.grow(s.table, s.computed + len(piece))
            pieces.append(piece)
        meta = AttentionMetadata.build(
            query_lens=[len(p) for p in pieces],
            context_lens=[s.computed + len(p) for s, p in zip(active, pieces)],
            block_tables=[s.table for s in active],
            block_size=kv.block_size,
        )
        ids = torch.tensor([t for p in pieces for t in p])
        logits = model(ids, meta.positions(), meta, kv.caches)
        for s, piece, row in zip(active, pieces, logits):
            s.computed += len(piece)
            if s.computed == len(s.tokens):  # caught up: this row predicts the next token
                s.tokens.append(int(row.argmax()))

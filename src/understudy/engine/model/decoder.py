"""One decoder-only transformer for the Llama, Qwen2 and Qwen3 families.

The families differ only in details that ModelConfig turns into flags:
  Qwen2: bias on q/k/v projections.  Qwen3: RMSNorm on each q/k head (q_norm/k_norm),
  explicit head_dim.  Llama 3.1: "llama3" RoPE frequency scaling.
Module names equal the Hugging Face checkpoint names, so weights load by name.

The elementwise work between the matmuls goes through fused.py: on CUDA each of
(residual add +) RMSNorm, RoPE of q and k, and SiLU(gate)*up is one Triton kernel;
elsewhere it is the plain-torch reference, op for op what transformers does. The
residual stream is carried beside the hidden states (vLLM-style) so that each
residual add is fused into the next norm.

The model owns no KV cache: the caller passes one (k_cache, v_cache) pair per
layer, in memory it owns, and the model only writes into those tensors. Build
the model on the meta device and attach weights with `load_weights` (or
`load_state_dict(..., assign=True)`), so no memory is spent on random init.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from understudy.engine.layers import fused
from understudy.engine.layers.attention import AttentionFn, AttentionMetadata, reference_attention
from understudy.engine.model.config import ModelConfig

KVCache = tuple[Tensor, Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x); or, given the residual stream, (norm(residual + x), residual + x).

        Normalizes in fp32 and scales after casting back, exactly as transformers does,
        so greedy outputs match it token for token (fused.rms_norm_ref).
        """
        if residual is None:
            return fused.rms_norm(x, self.weight, self.eps)
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Per-pair rotation frequencies (fp32, CPU), with the configured scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor: per-pair divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unknown rope_type {kind!r}")  # config.py rejects these earlier


class RotaryEmbedding(nn.Module):
    """The rotation frequencies, per device; the rotation itself is fused.apply_rope.

    The frequencies are a plain attribute, not a buffer: the model is built on the
    meta device and a buffer would stay there, since checkpoints don't carry it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self._inv_freq = rope_inv_freq(config)
        self._per_device: dict[torch.device, Tensor] = {}

    def inv_freq(self, device: torch.device) -> Tensor:
        """[head_dim/2] fp32 on `device` (copied there once, before any graph capture)."""
        inv_freq = self._per_device.get(device)
        if inv_freq is None:
            inv_freq = self._per_device[device] = self._inv_freq.to(device)
        return inv_freq


def row_parallel(linear: nn.Linear, x: Tensor, tp) -> Tensor:
    """linear(x); under tensor parallelism (model/sharding.py) x holds this rank's slice of the input features and
    linear.weight the matching columns: the partial products are summed across ranks, then the bias
    (replicated) is added once."""
    if tp is None:
        return linear(x)
    out = F.linear(x, linear.weight)
    tp.all_reduce(out)
    return out if linear.bias is None else out + linear.bias


class Attention(nn.Module):
    tp = None  # sharding.TensorParallel: this rank's share of the heads (model/sharding.py); None on one device

    def __init__(self, config: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.attention_fn = attention_fn
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, positions: Tensor, inv_freq: Tensor, meta: AttentionMetadata,
                kv_cache: KVCache) -> Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = fused.apply_rope(q, k, positions, inv_freq)
        out = self.attention_fn(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return row_parallel(self.o_proj, out.reshape(T, -1), self.tp)


class MLP(nn.Module):
    tp = None  # as Attention.tp: this rank's share of the intermediate size

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return row_parallel(self.down_proj, fused.silu_and_mul(self.gate_proj(x), self.up_proj(x)), self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, attention_fn)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, residual: Tensor | None, positions: Tensor, inv_freq: Tensor,
                meta: AttentionMetadata, kv_cache: KVCache) -> tuple[Tensor, Tensor]:
        """(x, residual) -> (mlp output, residual stream before it); the hidden state is their sum.

        residual None (the first layer) means x is the whole hidden state. Each residual
        add happens inside the following norm, so a layer is: add+norm, q/k/v, RoPE,
        attention, o_proj, add+norm, gate/up, SiLU*mul, down.
        """
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, inv_freq, meta, kv_cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, attention_fn) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, kv_caches: Sequence[KVCache]
    ) -> Tensor:
        x = self.embed_tokens(input_ids)
        inv_freq = self.rotary_emb.inv_freq(positions.device)  # shared by all layers
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, inv_freq, meta, kv_cache)
        # final norm is applied only to the rows that need logits
        return x if residual is None else residual + x


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, attention_fn: AttentionFn = reference_attention):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, attention_fn)
        # Tied models have no lm_head parameter at all: logits reuse the embedding matrix.
        # (A tied Parameter would be untied again by assign-style loading.)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,  # [T] token ids of all sequences, concatenated
        positions: Tensor,  # [T] absolute position of each token in its sequence
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache],  # one (k_cache, v_cache) per layer, written in place
        logits_indices: Tensor | None = None,  # rows to compute logits for; default: last of each sequence
    ) -> Tensor:
        """Return logits [len(logits_indices), vocab_size] in the model's dtype."""
        hidden = self.model(input_ids, positions, meta, kv_caches)
        if logits_indices is None:
            logits_indices = meta.last_token_indices()
        hidden = self.model.norm(hidden[logits_indices])
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], device: torch.device | str | None = None) -> None:
        """Attach checkpoint tensors by name, one at a time (nothing is copied twice).

        Every parameter must be provided exactly once with the right shape; names the
        model doesn't have are an error, except for tensors that are known redundant.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints saved it; we recompute it
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # some tied checkpoints still store a copy
            if name not in params:
                raise KeyError(f"checkpoint has weight {name!r} that the model does not expect")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}")
            module_name, _, leaf = name.rpartition(".")
            param = nn.Parameter(tensor if device is None else tensor.to(device), requires_grad=False)
            setattr(self.get_submodule(module_name), leaf, param)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise KeyError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")

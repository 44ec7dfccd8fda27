"""One decoder-only transformer for every supported family (Llama, Qwen, Mistral, Gemma 2/3, Phi-3, MoE).

The families differ only in details that ModelConfig turns into flags (model/families.py):
  Qwen2: bias on q/k/v projections.  Qwen3: RMSNorm on each q/k head (q_norm/k_norm),
  explicit head_dim.  Llama 3.1: "llama3" RoPE frequency scaling (all RoPE variants: model/rope.py).
  Mistral: sliding-window layers.  Gemma: (1 + weight) norms, also after attention and the MLP,
  scaled embeddings, GELU, soft-capped scores and logits, local / global layers.  Phi-3: partial rotary.
Every family's attention computes q, k and v with one GEMM (qkv_proj) and its MLP gate and up with one
(gate_up_proj), as Phi-3's checkpoint stores them; model/layout.py says which rows of those a checkpoint's
q_proj / k_proj / v_proj / gate_proj / up_proj fill. Other module names equal the checkpoint's.
Every projection (and the logits) goes through layers/linear.py: F.linear, or for one row on CUDA a
Triton GEMV where it was measured faster.

The elementwise work between the matmuls goes through fused.py: on CUDA each of
(residual add +) RMSNorm, RoPE of q and k (with the q/k norms and the store of k and v
into the KV cache), and SiLU(gate)*up is one Triton kernel; elsewhere it is the
plain-torch reference, op for op what transformers does. The
residual stream is carried beside the hidden states (vLLM-style) so that each
residual add is fused into the next norm.

The model owns no KV cache: the caller passes one (k_cache, v_cache) pair per
layer, in memory it owns, and the model only writes into those tensors. Build
the model on the meta device and attach weights with `load_weights` (or, with
the model's own names, `load_state_dict(..., assign=True)`), so no memory is spent on random init.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from understudy.engine.layers import fused, quant
from understudy.engine.layers.attention import AttentionFn, AttentionMetadata, reference_attention
from understudy.engine.layers.linear import Linear, linear
from understudy.engine.model.config import ModelConfig
from understudy.engine.model.rope import RotaryEmbedding, attention_factor, rope_inv_freq  # noqa: F401 (re-export)
from understudy.engine.model.experts import SparseMoE
from understudy.engine.model.layout import Slice, checkpoint_target, extra_layer

KVCache = tuple[Tensor, Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps = eps
        self.offset = offset  # Gemma: scale by (1 + weight) (fused.offset_rms_norm_ref)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x); or, given the residual stream, (norm(residual + x), residual + x).

        Normalizes in fp32 and scales after casting back, exactly as transformers does,
        so greedy outputs match it token for token (fused.rms_norm_ref).
        """
        if residual is None:
            return fused.rms_norm(x, self.weight, self.eps, self.offset)
        return fused.add_rms_norm(x, residual, self.weight, self.eps, self.offset)


def row_parallel(layer: nn.Linear, x: Tensor, tp) -> Tensor:
    """layer(x); under tensor parallelism (model/sharding.py) x holds this rank's slice of the input features and
    layer.weight the matching columns: the partial products are summed across ranks, then the bias
    (replicated) is added once."""
    if tp is None:
        return layer(x)
    out = linear(x, layer.weight)
    tp.all_reduce(out)
    return out if layer.bias is None else out + layer.bias


class Attention(nn.Module):
    tp = None  # sharding.TensorParallel: this rank's share of the heads (model/sharding.py); None on one device
    # An FP8 KV cache holds k / k_scale and v / v_scale: the checkpoint's per-layer scales, published with the
    # weights (model/weights.py, set_kv_scales), else 1.0.
    k_scale = 1.0
    v_scale = 1.0

    def __init__(self, config: ModelConfig, attention_fn: AttentionFn, index: int = 0):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.sliding_window = config.layer_window(index)
        self.softcap = config.attn_logit_softcap
        # Gemma 3's sliding layers rotate with their own (unscaled) base: DecoderModel hands them its local RoPE
        self.local_rope = self.sliding_window is not None and config.local_rope_theta is not None
        self.mscale = 1.0 if self.local_rope else attention_factor(config.rope_scaling, config.max_position_embeddings)
        self.attention_fn = attention_fn
        self.fused = config.fuse_qkv
        if self.fused:  # q, k and v rows of one matrix: one GEMM (model/layout.py)
            self.qkv_proj = Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        else:  # FP8 checkpoints whose scales do not cut along the rows (Quantization.fuses)
            self.q_proj = Linear(config.hidden_size, config.q_size, bias=config.qkv_bias)
            self.k_proj = Linear(config.hidden_size, config.kv_size, bias=config.qkv_bias)
            self.v_proj = Linear(config.hidden_size, config.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, positions: Tensor, inv_freq: Tensor, meta: AttentionMetadata,
                kv_cache: KVCache) -> Tensor:
        T = x.shape[0]
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                              self.num_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        # q/k norms (Qwen3, Gemma 3), RoPE, and this step's k and v into the cache: one kernel on CUDA
        qk_norm = {} if self.q_norm is None else dict(q_norm=self.q_norm.weight, k_norm=self.k_norm.weight,
                                                      eps=self.q_norm.eps, offset=self.q_norm.offset)
        q, k = fused.rope_and_store(q, k, v, positions, inv_freq, self.mscale, kv_cache[0], kv_cache[1],
                                    meta.slot_mapping, self.k_scale, self.v_scale, **qk_norm)
        out = self.attention_fn(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, k_scale=self.k_scale,
                                v_scale=self.v_scale, sliding_window=self.sliding_window, softcap=self.softcap)
        return row_parallel(self.o_proj, out.reshape(T, -1), self.tp)


class MLP(nn.Module):
    tp = None  # as Attention.tp: this rank's share of the intermediate size

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        i = intermediate_size or config.intermediate_size  # a MoE block's shared experts: their own width
        self.fused = config.fuse_gate_up
        if self.fused:  # gate rows, then up rows, in one matrix: one GEMM (model/layout.py)
            self.gate_up_proj = Linear(h, 2 * i, bias=bias)
        else:  # as Attention's
            self.gate_proj = Linear(h, i, bias=bias)
            self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)
        self.act = "gelu_tanh" if config.hidden_act == "gelu_pytorch_tanh" else "silu"

    def forward(self, x: Tensor) -> Tensor:
        return row_parallel(self.down_proj, self.hidden(x), self.tp)

    def hidden(self, x: Tensor) -> Tensor:
        """act(gate(x)) * up(x): under tensor parallelism, this rank's slice of it."""
        if self.fused:  # a one-row GEMV applies the activation in its epilogue (layers/linear.py gated_linear)
            return self.gate_up_proj.gated(x, self.act)
        return fused.act_and_mul(self.gate_proj(x), self.up_proj(x), self.act)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention_fn: AttentionFn, index: int = 0):
        super().__init__()
        h, eps, offset = config.hidden_size, config.rms_norm_eps, config.norm_offset
        self.input_layernorm = RMSNorm(h, eps, offset)
        self.self_attn = Attention(config, attention_fn, index)
        self.post_attention_layernorm = RMSNorm(h, eps, offset)
        self.sandwich = config.sandwich_norms
        if self.sandwich:  # Gemma: post_attention_layernorm normalizes the attention output instead
            self.pre_feedforward_layernorm = RMSNorm(h, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(h, eps, offset)
        # mixture-of-experts models: the sparse block where the config says (model/experts.py)
        if index not in config.moe_layers:
            self.mlp = MLP(config)
        else:
            shared = config.shared_expert_intermediate_size
            self.mlp = SparseMoE(config, MLP(config, shared) if shared else None)

    def forward(self, x: Tensor, residual: Tensor | None, positions: Tensor, inv_freq: Tensor,
                meta: AttentionMetadata, kv_cache: KVCache) -> tuple[Tensor, Tensor]:
        """(x, residual) -> (mlp output, residual stream before it); the hidden state is their sum.

        residual None (the first layer) means x is the whole hidden state. Each residual
        add happens inside the following norm, so a layer is: add+norm, q/k/v, RoPE,
        attention, o_proj, add+norm, gate/up, SiLU*mul, down. With sandwich norms (Gemma) the
        attention and MLP outputs are normalized too before they join the stream.
        """
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, inv_freq, meta, kv_cache)
        if self.sandwich:
            h, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(h), residual)
            return self.post_feedforward_layernorm(self.mlp(h)), residual
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, attention_fn, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        self.rotary_emb = RotaryEmbedding(config)
        # Gemma 3's sliding layers: their own RoPE base, no scaling
        self.local_rotary_emb = (None if config.local_rope_theta is None
                                 else RotaryEmbedding(config, config.local_rope_theta, None))
        self.embed_scale = config.embed_scale

    def forward(
        self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, kv_caches: Sequence[KVCache]
    ) -> Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:  # Gemma: the scale rounded to the model's dtype first, as transformers does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        # each token's sequence length, for RoPE variants whose frequencies depend on it (model/rope.py)
        seq_lens = None
        if self.rotary_emb.by_length:
            seq_lens = torch.repeat_interleave(meta.context_lens, meta.query_start_loc.diff(),
                                               output_size=positions.shape[0])
        inv_freq = self.rotary_emb.inv_freq(positions.device, seq_lens)  # shared by all layers
        local = None if self.local_rotary_emb is None else self.local_rotary_emb.inv_freq(positions.device)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            freqs = local if layer.self_attn.local_rope else inv_freq
            x, residual = layer(x, residual, positions, freqs, meta, kv_cache)
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
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        if config.quantization is not None:  # FP8 projections (layers/quant.py)
            quant.install(self, config.quantization)

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
        logits = linear(hidden, weight)  # one row (batch-1 decode): maybe the GEMV (layers/linear.py)
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap  # Gemma 2/3

    def set_kv_scales(self, scales: Sequence[Sequence[float]] | None) -> None:
        """Each layer's FP8 KV-cache [k_scale, v_scale] (quant.kv_scales; None: 1.0 everywhere)."""
        for layer, (k, v) in zip(self.model.layers, scales or [(1.0, 1.0)] * len(self.model.layers), strict=True):
            layer.self_attn.k_scale, layer.self_attn.v_scale = float(k), float(v)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], device: torch.device | str | None = None) -> None:
        """Attach checkpoint tensors by name, one at a time (nothing is copied twice).

        Every parameter must be provided exactly once with the right shape; names the
        model doesn't have are an error, except for tensors that are known redundant.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        filled: dict[str, int] = {}  # fused and stacked tensors: elements copied in so far
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or quant.is_kv_scale(name) or extra_layer(name, self.config):
                continue  # old checkpoints saved it; we recompute it. KV-cache scales: quant.read_kv_scales
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # some tied checkpoints still store a copy
            target = checkpoint_target(name, self.config)  # q_proj: rows of qkv_proj; an expert: of a stack
            if isinstance(target, Slice):
                self._fill_slice(params, name, target, tensor, device, filled)
                continue
            name = target
            if name not in params:
                raise KeyError(f"checkpoint has weight {name!r} that the model does not expect")
            tensor = quant.fit(name, tensor, tuple(params[name].shape), params[name].dtype)  # FP8 weights, scales
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}")
            module_name, _, leaf = name.rpartition(".")
            param = nn.Parameter(tensor if device is None else tensor.to(device), requires_grad=False)
            setattr(self.get_submodule(module_name), leaf, param)
            loaded.add(name)
        loaded.update(n for n, count in filled.items() if count == params[n].numel())
        missing = sorted(set(params) - loaded)
        if missing:
            raise KeyError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")

    def _fill_slice(self, params: dict[str, Tensor], name: str, target: Slice, tensor: Tensor,
                    device, filled: dict[str, int]) -> None:
        """Copy a checkpoint tensor into its slice of a fused or stacked parameter (made on first use)."""
        whole = params.get(target.param)
        if whole is None:
            raise KeyError(f"checkpoint has weight {name!r} that the model does not expect")
        try:
            shape = tuple(target.of(whole).shape)  # the meta parameter's shapes too
        except IndexError:
            raise KeyError(f"checkpoint has weight {name!r} of an expert the model does not have") from None
        tensor = quant.fit(target.param, tensor, shape, whole.dtype)  # FP8 weights; scales stored as [N, 1]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {shape}")
        if whole.is_meta:
            whole = nn.Parameter(torch.empty(whole.shape, dtype=tensor.dtype, device=device or tensor.device),
                                 requires_grad=False)
            module_name, _, leaf = target.param.rpartition(".")
            setattr(self.get_submodule(module_name), leaf, whole)
            params[target.param] = whole
        dst = target.of(whole)
        dst.copy_(tensor)
        filled[target.param] = filled.get(target.param, 0) + dst.numel()

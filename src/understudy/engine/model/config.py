"""What the engine needs to know about a model, read from a Hugging Face config.json.

One flat, frozen dataclass for every supported family. The differences between
Llama, Qwen2 and Qwen3 are expressed as flags (`qkv_bias`, `qk_norm`, ...) so the
model code has a single implementation; see decoder.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from understudy.engine.model.families import UnsupportedFamilyFeature, family_fields
from understudy.engine.model.quantization import FUSED, Quantization, UnsupportedQuantization, check_experts
from understudy.engine.model.quantization import from_hf_dict as quantization_from_hf_dict

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "mistral", "gemma2", "gemma3_text", "phi3",
                         "glm4_moe")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
                           "MixtralForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                           "Phi3ForCausalLM", "Glm4MoeForCausalLM")
# Implemented in model/rope.py. "su" (Phi-3's old name for longrope) is read as longrope.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors", "yarn", "dynamic", "longrope")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine cannot run."""


def unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what}. Supported model_type values: {', '.join(SUPPORTED_MODEL_TYPES)} "
        f"(architectures {', '.join(SUPPORTED_ARCHITECTURES)})."
    )


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None, or a normalized dict with a "rope_type" key (see SUPPORTED_ROPE_TYPES).
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama when attention_bias is set
    o_bias: bool  # Llama's attention_bias covers o_proj too; Qwen's never does
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    dtype: torch.dtype  # the checkpoint's dtype; the engine may run in another one
    # Family flags (model/families.py); the defaults are Llama's.
    hidden_act: str = "silu"  # the MLP's activation: "silu", or "gelu_pytorch_tanh" (Gemma)
    sliding_window: int | None = None  # keys a query of a sliding layer sees, itself included (Mistral, Gemma)
    sliding_layers: tuple[int, ...] = ()  # the layers that use sliding_window; the others attend to everything
    attn_logit_softcap: float | None = None  # Gemma 2: attention scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2/3: the same on the logits
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale query_pre_attn_scalar^-0.5, not head_dim's
    norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight), in fp32
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and the MLP too (pre/post_feedforward)
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden_size) (rounded to the model's dtype)
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base (unscaled)
    fused_checkpoint: bool = False  # Phi-3: the checkpoint stores qkv_proj and gate_up_proj (fuse_qkv, fuse_gate_up)
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE turns only this fraction of each head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architectures: tuple[str, ...] = field(default=())
    quantization: Quantization | None = None  # FP8 weights (model/quantization.py); None: unquantized
    # Mixture of experts (Qwen3-MoE, Mixtral, GLM-4.5; model/experts.py): num_experts 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = False  # renormalize the top-k router probabilities to sum to 1 (Mixtral always)
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is the sparse block; the others are dense
    # GLM-4.5 (DeepSeek-V3's router): sigmoid scores, a per-expert bias for the choice, group-limited top-k
    # (layers/moe.route_biased); "softmax": softmax over all experts, the top k (Qwen3-MoE, Mixtral)
    moe_router: str = "softmax"
    moe_groups: int = 1  # the experts' groups ...
    moe_top_groups: int = 1  # ... and how many of them a token's experts may come from
    routed_scaling_factor: float = 1.0  # the routing weights' scale
    shared_expert_intermediate_size: int = 0  # an MLP every token goes through beside its experts (0: none)
    # Layers a checkpoint holds past the model's (GLM-4.5's multi-token prediction, num_nextn_predict_layers):
    # not loaded, as transformers does not load them
    extra_checkpoint_layers: int = 0

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def fuse_qkv(self) -> bool:
        """Whether attention holds q, k and v as one qkv_proj (model/layout.py): always, except FP8 weights
        whose scales cannot be cut along the rows (Quantization.fuses)."""
        return self._fuses("qkv_proj", (self.q_size, self.kv_size, self.kv_size), range(self.num_hidden_layers),
                           "self_attn")

    @property
    def fuse_gate_up(self) -> bool:
        """Whether the dense MLPs (and MoE blocks' shared experts) hold gate and up as one gate_up_proj (as
        fuse_qkv)."""
        dense = [i for i in range(self.num_hidden_layers) if i not in self.moe_layers]
        shared = self.shared_expert_intermediate_size
        return self._fuses("gate_up_proj", (self.intermediate_size,) * 2, dense, "mlp") and (
            not shared or self._fuses("gate_up_proj", (shared,) * 2, self.moe_layers, "mlp.shared_experts"))

    def _fuses(self, fused: str, rows: tuple[int, ...], layers, block: str) -> bool:
        if self.fused_checkpoint or self.quantization is None:  # Phi-3: as its checkpoint stores them
            return True
        return self.quantization.fuses(rows, ([f"model.layers.{i}.{block}.{p}" for p in FUSED[fused]] for i in layers))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of a layer, None if it attends to its whole context."""
        return self.sliding_window if layer in self.sliding_layers else None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise unsupported(f"model_type {model_type!r} (architectures {d.get('architectures')}) is not supported")
        try:
            family = family_fields(d, model_type)
        except UnsupportedFamilyFeature as e:
            raise UnsupportedModelError(f"{model_type}: {e}") from None

        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        # transformers>=5 folds rope_theta into rope_parameters; older files have both keys at top level.
        rope_params = d.get("rope_parameters") or {}
        rope_params = rope_params.get("full_attention", rope_params)  # Gemma 3: per layer type (families.py)
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = normalize_rope_scaling(d.get("rope_scaling") or rope_params, d)

        if model_type in ("llama", "gemma2", "gemma3_text"):
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        elif model_type == "qwen2":
            qkv_bias, o_bias = True, False  # hard-wired in Qwen2, not in config.json
        else:
            qkv_bias, o_bias = bool(d.get("attention_bias", False)), False

        dtype_name = d.get("dtype") or d.get("torch_dtype") or "float32"
        if dtype_name not in _DTYPES:
            raise UnsupportedModelError(f"unsupported dtype {dtype_name!r} in config.json")

        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text") or bool(d.get("use_qk_norm")),
            dtype=_DTYPES[dtype_name],
            **family,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_ids(d.get("eos_token_id")),
            architectures=tuple(d.get("architectures") or ()),
            quantization=_quantization(d),
            **_mixture_of_experts(d, model_type),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """Read <dir>/config.json; stop tokens from generation_config.json are merged in
        because instruct models often list their end-of-turn token only there."""
        model_dir = Path(model_dir)
        with open(model_dir / "config.json") as f:
            config = cls.from_hf_dict(json.load(f))
        gen = model_dir / "generation_config.json"
        if gen.exists():
            with open(gen) as f:
                extra = _as_ids(json.load(f).get("eos_token_id"))
            merged = config.eos_token_ids + tuple(i for i in extra if i not in config.eos_token_ids)
            config = replace(config, eos_token_ids=merged)
        return config


def normalize_rope_scaling(raw: dict[str, Any] | None, hf: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Return None for plain RoPE, else a dict whose "rope_type" we implement. `hf`, the whole config.json,
    supplies original_max_position_embeddings where a file keeps it at top level (Phi-3)."""
    if not raw:
        return None
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type == "su" or (rope_type == "yarn" and (hf or {}).get("model_type") == "phi3"):
        rope_type = "longrope"  # transformers reads Phi-3's "su" and "yarn" so
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    out = {k: v for k, v in raw.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    out["rope_type"] = rope_type
    if rope_type in ("yarn", "longrope") and "original_max_position_embeddings" not in out and hf:
        old_len = hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
        if old_len:
            out["original_max_position_embeddings"] = old_len
    missing = [k for k in _ROPE_REQUIRED_KEYS.get(rope_type, ()) if k not in out]
    if missing:
        raise UnsupportedModelError(f"rope scaling {rope_type!r} is missing {', '.join(missing)}")
    return out


_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "freq_factors": ("factors",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "dynamic": ("factor",),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


def _quantization(d: dict[str, Any]) -> Quantization | None:
    try:
        return quantization_from_hf_dict(d)
    except UnsupportedQuantization as e:  # refused now, never a KeyError on a packed tensor at load
        raise UnsupportedModelError(str(e)) from None


def _mixture_of_experts(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE, Mixtral or GLM-4.5 config.json ({} for a dense model).

    Qwen3-MoE: the sparse block replaces the MLP of every decoder_sparse_step-th layer not listed in
    mlp_only_layers (those keep a dense MLP of intermediate_size); the top-k probabilities are renormalized
    when norm_topk_prob is set. Mixtral: every layer, experts of intermediate_size, always renormalized.
    GLM-4.5: the layers from first_k_dense_replace on, n_shared_experts experts' width of shared MLP, and
    DeepSeek-V3's router (n_group, topk_group, routed_scaling_factor; norm_topk_prob by default).
    """
    if model_type not in ("qwen3_moe", "mixtral", "glm4_moe"):
        return {}
    # transformers>=5 writes num_local_experts for both; Qwen's own files say num_experts, GLM's n_routed_experts.
    experts = d.get("num_experts") or d.get("num_local_experts") or d.get("n_routed_experts")
    if not experts or not d.get("num_experts_per_tok"):
        raise UnsupportedModelError(f"{model_type} config.json lacks num_experts / num_experts_per_tok")
    layers = range(d["num_hidden_layers"])
    if model_type == "mixtral":
        if d.get("sliding_window"):
            raise UnsupportedModelError("Mixtral with sliding_window set is not supported")
        fields = dict(num_experts=experts, num_experts_per_tok=d["num_experts_per_tok"],
                      moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True, moe_layers=tuple(layers))
    elif model_type == "glm4_moe":
        groups, top_groups = d.get("n_group") or 1, d.get("topk_group") or 1
        if experts % groups or not 1 <= top_groups <= groups:
            raise UnsupportedModelError(f"glm4_moe: {experts} experts in n_group {groups}, topk_group {top_groups}")
        fields = dict(num_experts=experts, num_experts_per_tok=d["num_experts_per_tok"],
                      moe_intermediate_size=d["moe_intermediate_size"], norm_topk_prob=d.get("norm_topk_prob", True),
                      moe_layers=tuple(i for i in layers if i >= d.get("first_k_dense_replace", 1)),
                      moe_router="sigmoid", moe_groups=groups, moe_top_groups=top_groups,
                      routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
                      shared_expert_intermediate_size=d["moe_intermediate_size"] * d.get("n_shared_experts", 1),
                      extra_checkpoint_layers=d.get("num_nextn_predict_layers") or d.get("num_mtp_layers") or 0)
    else:
        step, dense = d.get("decoder_sparse_step", 1) or 1, set(d.get("mlp_only_layers") or ())
        fields = dict(num_experts=experts, num_experts_per_tok=d["num_experts_per_tok"],
                      moe_intermediate_size=d["moe_intermediate_size"], norm_topk_prob=bool(d.get("norm_topk_prob")),
                      moe_layers=tuple(i for i in layers if i not in dense and (i + 1) % step == 0))
    quantization = _quantization(d)
    if quantization is not None:  # FP8 experts: refused now if they cannot be stacked, not at load
        block, projs = ("block_sparse_moe", ("w1", "w3", "w2")) if model_type == "mixtral" else \
            ("mlp", ("gate_proj", "up_proj", "down_proj"))
        names = (f"model.layers.{i}.{block}.experts.{e}.{p}" for i in fields["moe_layers"] for e in range(experts)
                 for p in projs)
        try:
            check_experts(quantization, names, fields["moe_intermediate_size"])
        except UnsupportedQuantization as e:
            raise UnsupportedModelError(str(e)) from None
    return fields


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)

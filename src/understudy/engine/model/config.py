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

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")

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
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architectures: tuple[str, ...] = field(default=())

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise unsupported(f"model_type {model_type!r} (architectures {d.get('architectures')}) is not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise unsupported(f"hidden_act {act!r} is not supported (only 'silu')")
        if d.get("use_sliding_window"):
            raise unsupported("sliding-window attention (use_sliding_window=true) is not supported")

        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        # transformers>=5 folds rope_theta into rope_parameters; older files have both keys at top level.
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = normalize_rope_scaling(d.get("rope_scaling") or rope_params)

        if model_type == "llama":
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
            qk_norm=model_type == "qwen3",
            dtype=_DTYPES[dtype_name],
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_ids(d.get("eos_token_id")),
            architectures=tuple(d.get("architectures") or ()),
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


def normalize_rope_scaling(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return None for plain RoPE, else a dict whose "rope_type" we implement."""
    if not raw:
        return None
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    out = {k: v for k, v in raw.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = rope_type
    missing = [k for k in _ROPE_REQUIRED_KEYS.get(rope_type, ()) if k not in out]
    if missing:
        raise UnsupportedModelError(f"rope scaling {rope_type!r} is missing {', '.join(missing)}")
    return out


_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "freq_factors": ("factors",),
}


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)

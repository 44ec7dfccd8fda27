"""How the families beyond Llama / Qwen read into ModelConfig's flags (one decoder serves them all).

  Mistral     sliding-window attention on every layer (config sliding_window; null: none)
  Qwen2/Qwen3 use_sliding_window: the layers from max_window_layers on slide (or as layer_types says)
  Gemma 2     (1 + weight) RMSNorm, norms before and after attention and the MLP, embeddings times
              sqrt(hidden_size), GELU (tanh) MLP, attention scale query_pre_attn_scalar^-0.5, attention
              and final logit soft-capping, sliding and global layers alternating (layer_types)
  Gemma 3     Gemma 2 without attention soft-capping, plus q/k norms, sliding layers every
              sliding_window_pattern-1 of sliding_window_pattern, and their own RoPE base (rope_local_base_freq)
  Phi-3/Phi-4 fused qkv_proj and gate_up_proj in the checkpoint (loaded as they are), longrope,
              partial rotary (partial_rotary_factor), sliding_window when set
  GLM-4.5     partial rotary (half of each head unless the file says), q/k/v biases (attention_bias), q/k
              norms (use_qk_norm), a mixture of experts with shared experts (config.py, model/experts.py)

`family_fields` returns the keyword arguments of ModelConfig that differ from Llama's.
"""

from __future__ import annotations

from typing import Any

GEMMA = ("gemma2", "gemma3_text")
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedFamilyFeature(ValueError):
    """A family feature this decoder does not implement (config.py raises it as UnsupportedModelError)."""


def family_fields(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Gemma's config names the MLP activation hidden_activation (hidden_act is an old alias).
    act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    if model_type in GEMMA and act == "gelu":
        act = "gelu_pytorch_tanh"  # what transformers runs for Gemma whatever the old key says
    if act not in _ACTIVATIONS:
        raise UnsupportedFamilyFeature(f"hidden_act {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    out["hidden_act"] = act
    out.update(_sliding(d, model_type))
    if model_type in GEMMA:
        if d.get("use_bidirectional_attention"):
            raise UnsupportedFamilyFeature("use_bidirectional_attention (Gemma embedding models) is not supported")
        out.update(norm_offset=True, sandwich_norms=True, embed_scale=float(d["hidden_size"]) ** 0.5,
                   query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256),
                   final_logit_softcap=d.get("final_logit_softcapping"))
        if model_type == "gemma2":  # Gemma 3's attention ignores attn_logit_softcapping, as transformers does
            out["attn_logit_softcap"] = d.get("attn_logit_softcapping")
        else:
            out["local_rope_theta"] = _gemma3_local_theta(d)
    if model_type == "phi3":
        out["fused_checkpoint"] = True
    rope = d.get("rope_parameters") or {}
    unset = 0.5 if model_type == "glm4_moe" else 1.0  # GLM-4.5 turns half of each head when its file says nothing
    out["partial_rotary_factor"] = float(d.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or unset)
    return out


def _sliding(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    """sliding_window and the layers that use it ({} when none does)."""
    window, n = d.get("sliding_window"), d["num_hidden_layers"]
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window"):
        window = None  # Qwen configs carry a sliding_window that is off unless use_sliding_window is set
    if not window or model_type in ("llama", "mixtral"):
        return {}
    types = d.get("layer_types")
    if types and model_type not in ("mistral", "phi3"):  # transformers ignores layer_types for these two
        unknown = sorted(set(types) - set(_LAYER_TYPES))
        if unknown or len(types) != n:
            raise UnsupportedFamilyFeature(f"layer_types {unknown or types} is not supported "
                                        f"(need {n} of {', '.join(_LAYER_TYPES)})")
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif model_type in ("qwen2", "qwen3", "qwen3_moe"):
        layers = [i for i in range(n) if i >= d.get("max_window_layers", 28)]
    elif model_type == "gemma2":
        layers = [i for i in range(n) if i % 2 == 0]
    elif model_type == "gemma3_text":
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        layers = [i for i in range(n) if (i + 1) % pattern]
    else:  # mistral, phi3: every layer
        layers = list(range(n))
    return {"sliding_window": int(window), "sliding_layers": tuple(layers)} if layers else {}


def _gemma3_local_theta(d: dict[str, Any]) -> float:
    """The RoPE base of Gemma 3's sliding layers (their RoPE is never scaled)."""
    local = (d.get("rope_parameters") or {}).get("sliding_attention")
    if local is None:
        return float(d.get("rope_local_base_freq") or 10000.0)
    if (local.get("rope_type") or "default") != "default":
        raise UnsupportedFamilyFeature(f"rope scaling {local.get('rope_type')!r} on Gemma 3's sliding layers is "
                                    f"not supported (only their rope_theta)")
    return float(local.get("rope_theta") or d.get("rope_local_base_freq") or 10000.0)

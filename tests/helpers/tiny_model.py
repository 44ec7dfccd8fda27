"""A tiny random Llama checkpoint whose heads divide by 2 (the built-in SmolLM2 has 9 heads, 3 KV heads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024,
          "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": None,
          "hidden_act": "silu"}


def write_byte_tokenizer(d: Path) -> None:
    """A byte-level BPE with no merges: 256 tokens, enough for `understudy serve` on random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(d / "tokenizer.json"))


def llama_weight_shapes(cfg: dict, layers: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape of an HF Llama with this config.json and this many layers."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def make_tiny_llama(d: Path, seed: int = 0, **overrides) -> Path:
    """config.json + model.safetensors + tokenizer.json; weights drawn with a large init (0.2) so that
    logits are peaked and greedy choices are not near-ties between the TP=1 and TP=2 sums."""
    from safetensors.torch import save_file

    cfg = {**CONFIG, **overrides}
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    write_byte_tokenizer(d)
    shapes = llama_weight_shapes(cfg, cfg["num_hidden_layers"])
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = 0.2 * torch.randn(shape, generator=gen)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d

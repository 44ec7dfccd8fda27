"""Read model configs and weights from a Hugging Face directory or a GGUF file.

Weights are produced as a stream of (hf_name, tensor) pairs, one tensor at a
time, so peak host memory stays near one tensor and the consumer decides where
each one goes (a local GPU, or a separate memory service).

GGUF files use llama.cpp's tensor names and, for Llama, a permuted row order of
the q/k projections; both are translated back so the stream looks exactly like
the Hugging Face checkpoint of the same model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from understudy.engine.layers import quant
from understudy.engine.layers.attention import AttentionFn, reference_attention
from understudy.common.gguf_file import gguf_field, open_gguf  # noqa: F401  (loader's callers use them from here)
from understudy.engine.model.config import ModelConfig, UnsupportedModelError, normalize_rope_scaling
from understudy.engine.model.decoder import CausalLM
from understudy.engine.model.layout import parameter_of
from understudy.engine.model.quantization import with_quantization

PathLike = str | os.PathLike


def is_gguf(path: PathLike) -> bool:
    return Path(path).is_file() and str(path).endswith(".gguf")


def load_config(path: PathLike) -> ModelConfig:
    """ModelConfig for a HF model directory (config.json) or a .gguf file (its metadata)."""
    if is_gguf(path):
        return gguf_config(path)
    return ModelConfig.from_pretrained(_hf_dir(path))


def iter_weights(path: PathLike, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) for every weight, on the CPU, cast to `dtype` when given.

    Without `dtype`, safetensors keep their stored dtype and GGUF tensors come out
    in float32 (quantized types are dequantized). FP8 weights and their scales keep
    their stored dtype in any case (the model says what it keeps them in: quant.fit).
    """
    if is_gguf(path):
        yield from iter_gguf_weights(path, dtype)
    else:
        yield from iter_safetensors_weights(path, dtype)


def load_model(
    path: PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    attention_fn: AttentionFn = reference_attention,
    quantization: str | None = None,
) -> CausalLM:
    """Build the model on the meta device and stream the checkpoint into it; `quantization` "fp8":
    an unquantized checkpoint's linears quantized to FP8 as they load (what `serve --quantization fp8`
    does when it publishes)."""
    config = with_quantization(load_config(path), quantization)
    dtype = dtype or config.dtype
    with torch.device("meta"):
        model = quant.cast_model(CausalLM(config, attention_fn), dtype)
    weights = iter_weights(path, dtype)
    if config.quantization is not None and config.quantization.online:
        weights = quant.quantize_online(model, weights, lambda n: parameter_of(n, config))
    model.load_weights(weights, device=device)
    model.set_kv_scales(read_kv_scales(path, config.num_hidden_layers))
    return model.eval()


def read_kv_scales(path: PathLike, num_layers: int) -> list[list[float]] | None:
    """The checkpoint's per-layer FP8 KV-cache scales (quant.kv_scales), reading only those tensors."""
    if is_gguf(path):
        return None
    from safetensors import safe_open

    found = []
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            found += [(name, f.get_tensor(name)) for name in f.keys() if quant.is_kv_scale(name)]
    return quant.kv_scales(found, num_layers)


# --------------------------------------------------------------------------- HF safetensors


def _hf_dir(path: PathLike) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a model directory with config.json")
    return path


def safetensors_files(model_dir: PathLike) -> list[Path]:
    model_dir = _hf_dir(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        # The index names the shards; other *.safetensors in the folder (e.g. a
        # consolidated copy) would duplicate weights.
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir} (PyTorch .bin checkpoints are not supported)")
    return files


def iter_safetensors_weights(
    model_dir: PathLike, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)  # reads just this tensor
                keep = dtype is None or quant.is_quantized_storage(name, tensor) or quant.is_kv_scale(name)
                yield name, tensor if keep else tensor.to(dtype)


# --------------------------------------------------------------------------- GGUF

# llama.cpp name -> HF name; "{}" is the layer index.
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Not weights of the model: folded into the config instead (see gguf_config).
_GGUF_SKIP = {"rope_freqs.weight"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = _GGUF_LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _GGUF_LAYER_NAMES:
        raise UnsupportedModelError(f"GGUF tensor {name!r} has no counterpart in the supported architectures")
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _f32(x: float) -> float:
    # GGUF stores floats as float32; print-and-parse recovers the intended decimal (1e-05, not 9.99e-06).
    return float(str(np.float32(x)))


def gguf_config(path: PathLike) -> ModelConfig:
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:  # GGUF: the dense Llama / Qwen names only (other families: HF directories)
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (GGUF files of: "
                                    f"{', '.join(_ARCHITECTURES)}; other families load from HF directories)")
    tensors = {t.name: t for t in reader.tensors}
    if gguf_field(reader, f"{arch}.expert_count", 0):  # Mixtral GGUFs say llama: their experts are not read
        raise UnsupportedModelError("GGUF mixture-of-experts models are not supported (their stacked, quantized "
                                    "expert tensors are not read); serve the Hugging Face safetensors checkpoint")

    def arch_key(key: str, default: Any = ...) -> Any:
        value = gguf_field(reader, f"{arch}.{key}", default)
        if value is ...:
            raise UnsupportedModelError(f"GGUF metadata key {arch}.{key} is missing from {path}")
        return value

    hidden = arch_key("embedding_length")
    heads = arch_key("attention.head_count")
    head_dim = arch_key("attention.key_length", hidden // heads)
    if arch_key("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError("partial rotary embeddings (rope.dimension_count < head_dim) are not supported")
    vocab = arch_key("vocab_size", None) or int(tensors["token_embd.weight"].shape[1])

    rope_scaling = None
    scaling_type = arch_key("rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        # Llama 3.1-style GGUFs ship the per-frequency divisors precomputed.
        factors = _dequantize(tensors["rope_freqs.weight"]).reshape(-1).tolist()
        rope_scaling = {"rope_type": "freq_factors", "factors": factors}
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": arch_key("rope.scaling.factor")}
    elif scaling_type != "none":
        rope_scaling = normalize_rope_scaling({"rope_type": scaling_type})  # raises: unsupported

    # Quantized weights are dequantized to fp32; pure f16/bf16 files keep their dtype.
    matrix_types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    dtype = {frozenset({"F16"}): torch.float16, frozenset({"BF16"}): torch.bfloat16}.get(
        frozenset(matrix_types), torch.float32
    )

    eos = [gguf_field(reader, k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return ModelConfig(
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=arch_key("feed_forward_length"),
        num_hidden_layers=arch_key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=arch_key("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=_f32(arch_key("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(arch_key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=arch_key("context_length"),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        dtype=dtype,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
        architectures=(_ARCHITECTURES[arch],),
    )


def _dequantize(t) -> np.ndarray:
    """Any GGUF tensor as fp32 numpy in HF (row-major [out, in]) shape."""
    from gguf.quants import dequantize

    # GGUF lists dims innermost-first; the reader's array is already [rows, ...] and
    # dequantize() maps its packed bytes back to [rows, cols].
    return dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))


def _unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's convert_hf_to_gguf permute() of Llama q/k rows.

    llama.cpp rotates interleaved pairs (x0,x1),(x2,x3)...; HF rotates the two halves
    of each head. The converter reorders each head's rows from [half0, half1] to
    interleaved; this puts them back.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(path: PathLike, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    config = gguf_config(path)
    reader = open_gguf(path)
    for t in reader.tensors:
        if t.name in _GGUF_SKIP:
            continue
        name = gguf_to_hf_name(t.name)
        array = _dequantize(t)
        if not array.flags.writeable:  # f32 tensors are views of the read-only mmap
            array = array.copy()
        tensor = torch.from_numpy(array)
        if config.model_type == "llama":
            if t.name.endswith(("attn_q.weight", "attn_q.bias")):
                tensor = _unpermute_rows(tensor, config.num_attention_heads)
            elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
                tensor = _unpermute_rows(tensor, config.num_key_value_heads)
        yield name, tensor.to(dtype or config.dtype)

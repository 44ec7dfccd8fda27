"""GGUF import: tiny transformers models written the way llama.cpp's converter writes them,
then read back through our loader, must behave exactly like the original."""

import math

import gguf
import numpy as np
import pytest
import torch

from understudy.engine.model.config import UnsupportedModelError
from understudy.engine.model.loader import iter_weights, load_config, load_model

from tests.helpers.engine import build_hf_model, greedy_generate, hf_greedy

PROMPT = [17, 200, 3, 99, 45, 45, 128, 7, 250, 31, 64]

# HF -> llama.cpp names, written out independently of the loader's own table.
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    # Verbatim logic of LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(hf, family: str, path, matrix_type=gguf.GGMLQuantizationType.F32):
    cfg = hf.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(path), family)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(hf.config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if family == "llama":
        # Like the converter for Llama 3.1: per-frequency divisors in a rope_freqs tensor.
        base = 1.0 / (hf.config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        w.add_tensor("rope_freqs.weight", (base / hf.model.rotary_emb.inv_freq).numpy().astype(np.float32))
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.numpy().astype(np.float32)
        if family == "llama" and name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, heads, heads)
        elif family == "llama" and name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, heads, kv_heads)
        if name in _GLOBAL:
            gname = _GLOBAL[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{_LAYER[rest]}"
        if data.ndim == 2 and matrix_type != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(data, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_gguf_f32_matches_transformers(hf_model_dir, tmp_path, family):
    hf, hf_dir = hf_model_dir(family)
    path = write_gguf(hf, family, tmp_path / f"{family}.gguf")

    from_gguf, from_hf = load_config(path), load_config(hf_dir)
    for field in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "tie_word_embeddings",
        "qkv_bias",
        "o_bias",
        "qk_norm",
    ):
        assert getattr(from_gguf, field) == getattr(from_hf, field), field

    ours = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        expected_logits = hf(torch.tensor([PROMPT])).logits[0, -1]
    assert greedy_generate(ours, [PROMPT], 16) == [hf_greedy(hf, PROMPT, 16)]
    from understudy.engine.layers.attention import AttentionMetadata

    meta = AttentionMetadata.build([len(PROMPT)], [len(PROMPT)], [[0, 1, 2]], block_size=4)
    caches = [
        (torch.zeros(3, 4, 2, ours.config.head_dim), torch.zeros(3, 4, 2, ours.config.head_dim)) for _ in range(2)
    ]
    torch.testing.assert_close(
        ours(torch.tensor(PROMPT), meta.positions(), meta, caches)[0], expected_logits, atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "qtype, dtype, tol",
    [
        (gguf.GGMLQuantizationType.F16, torch.float16, 1e-3),
        (gguf.GGMLQuantizationType.BF16, torch.bfloat16, 1e-2),
        (gguf.GGMLQuantizationType.Q8_0, torch.float32, 2e-2),
    ],
)
def test_gguf_types_dequantize_to_hf_weights(tmp_path, qtype, dtype, tol):
    hf = build_hf_model("llama", seed=3)
    path = write_gguf(hf, "llama", tmp_path / "m.gguf", matrix_type=qtype)
    assert load_config(path).dtype == dtype  # pure f16/bf16 files keep their dtype, quantized -> fp32
    expected = hf.state_dict()
    got = dict(iter_weights(path, dtype=torch.float32))
    assert sorted(got) == sorted(expected)
    for name, ref in expected.items():
        scale = ref.abs().max().item()
        err = (got[name] - ref).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err} vs scale {scale}"


def test_gguf_llama_q_k_rows_are_unpermuted(tmp_path):
    hf = build_hf_model("llama", seed=4)
    path = write_gguf(hf, "llama", tmp_path / "m.gguf")
    got = dict(iter_weights(path))
    q = hf.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    k = hf.state_dict()["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], q)
    assert torch.equal(got["model.layers.1.self_attn.k_proj.weight"], k)
    # and the file really held them permuted, so the test above is not vacuous
    reader = gguf.GGUFReader(str(path))
    raw_q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    assert not np.array_equal(np.asarray(raw_q.data), q.numpy())


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, qwen2, qwen3"):
        load_config(path)


def test_rope_freqs_tensor_reproduces_llama3_frequencies(hf_model_dir, tmp_path):
    from understudy.engine.model.decoder import rope_inv_freq

    hf, hf_dir = hf_model_dir("llama")
    path = write_gguf(hf, "llama", tmp_path / "m.gguf")
    from_gguf = rope_inv_freq(load_config(path))
    from_hf_config = rope_inv_freq(load_config(hf_dir))
    torch.testing.assert_close(from_gguf, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(from_hf_config, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert not math.isclose(from_hf_config[-1].item(), 1.0 / 10000 ** ((16 - 2) / 16))  # scaling did act

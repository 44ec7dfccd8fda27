"""Model construction, weight attachment, KV-cache discipline and config errors."""

import json

import pytest
import torch

from understudy.engine.layers.attention import AttentionMetadata, store_kv
from understudy.engine.model.decoder import CausalLM
from understudy.engine.model.config import ModelConfig, UnsupportedModelError
from understudy.engine.model.layout import checkpoint_view
from understudy.engine.model.loader import iter_weights, load_config, load_model

from tests.helpers.engine import PagedKV


def test_meta_construction_then_streamed_load(hf_model_dir):
    hf, path = hf_model_dir("qwen3")
    cfg = load_config(path)
    with torch.device("meta"):
        model = CausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    names = {n for n, _ in model.named_parameters()}
    # HF checkpoint names, except q/k/v and gate/up: rows of one qkv_proj / gate_up_proj (model/layout.py)
    targets = {checkpoint_view(n, cfg, dict(model.named_parameters()).__getitem__)[0] for n in hf.state_dict()}
    assert names == targets and "model.layers.0.self_attn.qkv_proj.weight" in names
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in names)
    model.load_weights(iter_weights(path, torch.float32))
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    params = dict(model.named_parameters())
    for name, t in hf.state_dict().items():
        assert torch.equal(checkpoint_view(name, cfg, params.__getitem__)[1], t), name


def test_load_state_dict_assign_works_too(hf_model_dir):
    """With the model's own names (what the memory service holds)."""
    _, path = hf_model_dir("llama")
    state = load_model(path, dtype=torch.float32).state_dict()
    with torch.device("meta"):
        model = CausalLM(load_config(path))
    model.load_state_dict(state, assign=True, strict=True)
    assert not any(p.is_meta for p in model.parameters())


def test_tied_model_has_no_lm_head_and_ignores_a_stored_copy(hf_model_dir):
    hf, path = hf_model_dir("qwen2")
    model = load_model(path, dtype=torch.float32)
    assert model.lm_head is None
    weights = list(iter_weights(path)) + [("lm_head.weight", hf.model.embed_tokens.weight.detach().clone())]
    with torch.device("meta"):
        again = CausalLM(model.config)
    again.load_weights(weights)  # the redundant copy is skipped, not an error


def test_load_weights_rejects_missing_unexpected_and_misshaped(hf_model_dir):
    _, path = hf_model_dir("llama")
    cfg = load_config(path)
    weights = dict(iter_weights(path))

    def fresh():
        with torch.device("meta"):
            return CausalLM(cfg)

    partial = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(KeyError, match="missing 1 weights.*model.norm.weight"):
        fresh().load_weights(partial.items())
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        fresh().load_weights(list(weights.items()) + [("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    bad = dict(weights, **{"model.norm.weight": torch.zeros(7)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        fresh().load_weights(bad.items())


def test_forward_writes_only_the_given_slots(hf_model_dir):
    _, path = hf_model_dir("llama")
    model = load_model(path, dtype=torch.float32)
    kv = PagedKV(model.config, num_blocks=8, block_size=4)
    ptrs = [(k.data_ptr(), v.data_ptr()) for k, v in kv.caches]
    # Second sequence: 3 tokens cached already (slots in block 6), 2 new ones.
    meta = AttentionMetadata.build([5, 2], [5, 5], [[2, 7], [6, 1]], block_size=4)
    assert meta.slot_mapping.tolist() == [8, 9, 10, 11, 28, 27, 4]
    model(torch.tensor([1, 2, 3, 4, 5, 6, 7]), meta.positions(), meta, kv.caches)
    written = torch.zeros(8 * 4, dtype=torch.bool)
    written[meta.slot_mapping] = True
    for (k, v), (kp, vp) in zip(kv.caches, ptrs):
        assert (k.data_ptr(), v.data_ptr()) == (kp, vp)  # same memory, nothing reallocated
        touched = (k.flatten(0, 1).abs().sum((1, 2)) > 0) | (v.flatten(0, 1).abs().sum((1, 2)) > 0)
        assert torch.equal(touched, written)


def test_store_kv_skips_padding_slots():
    k_cache, v_cache = torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 3)
    k = torch.arange(9.0).view(3, 1, 3) + 1
    store_kv(k, -k, k_cache, v_cache, torch.tensor([3, -1, 0]))
    assert torch.equal(k_cache.view(4, 3)[3], k[0, 0]) and torch.equal(k_cache.view(4, 3)[0], k[2, 0])
    assert torch.equal(v_cache.view(4, 3)[0], -k[2, 0])
    assert k_cache.view(4, 3)[1:3].abs().sum() == 0


def test_metadata_build_validates():
    with pytest.raises(ValueError, match="too short"):
        AttentionMetadata.build([4], [9], [[0, 1]], block_size=4)
    with pytest.raises(ValueError, match="query_len <= context_len"):
        AttentionMetadata.build([5], [4], [[0, 1]], block_size=4)
    meta = AttentionMetadata.build([3, 1], [3, 6], [[0], [4, 5]], block_size=4)
    assert meta.positions().tolist() == [0, 1, 2, 5]
    assert meta.last_token_indices().tolist() == [2, 3]
    assert meta.block_tables.tolist() == [[0, 0], [4, 5]]


def _write_config(tmp_path, **d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


BASE = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    path = _write_config(tmp_path, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], **BASE)
    with pytest.raises(UnsupportedModelError, match=r"'deepseek_v3'.*llama, qwen2, qwen3.*LlamaForCausalLM"):
        load_config(path)


def test_unsupported_rope_scaling_is_rejected(tmp_path):
    path = _write_config(tmp_path, model_type="llama", rope_scaling={"type": "mrope", "factor": 4.0}, **BASE)
    with pytest.raises(UnsupportedModelError, match="mrope"):
        load_config(path)


def test_legacy_config_keys(tmp_path):
    # Files written by transformers 4.x: top-level rope_theta / rope_scaling, torch_dtype,
    # and stop tokens split between config.json and generation_config.json.
    path = _write_config(
        tmp_path,
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        torch_dtype="bfloat16",
        eos_token_id=128001,
        bos_token_id=128000,
        **BASE,
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    cfg = load_config(path)
    assert isinstance(cfg, ModelConfig)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.dtype == torch.bfloat16
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert cfg.head_dim == 4 and cfg.num_key_value_heads == 2


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a .gguf file nor a model directory"):
        load_config(tmp_path / "nope")

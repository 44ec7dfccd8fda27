"""Weights through the memory service: the first engine publishes, later ones import."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from understudy.engine.model import weights
from understudy.engine.model.layout import checkpoint_view
from understudy.engine.model.loader import load_config, load_model
from understudy.memory import read_status


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # byte-for-byte, and converted
def test_publish_then_import_with_zero_copies(server, hf_model_dir, dtype):
    hf, path = hf_model_dir("llama")
    config = load_config(path)
    stored = load_file(str(next(path.glob("*.safetensors"))))
    model, client, stats = weights.load(str(server.path), path, config, dtype, progress=False)
    assert stats["source"] == "published" and stats["GBps"] > 0
    state = model.state_dict()
    assert all(t.dtype == dtype for t in state.values())
    for name, t in stored.items():  # q_proj (...) as rows of the fused qkv_proj (...)
        assert torch.equal(checkpoint_view(name, config, state.__getitem__)[1], t.to(dtype)), name
    model2, client2, stats2 = weights.load(str(server.path), path, config, dtype, progress=False)
    assert stats2["source"] == "imported"
    # the second engine's tensors are views of the same shared bytes (different addresses, same memory)
    a = model.model.embed_tokens.weight
    b = model2.model.embed_tokens.weight
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert read_status(server.path)["pools"]["weights"]["readers"] == [client.session, client2.session]
    client.close()
    client2.close()


def test_another_model_is_refused_with_a_clear_error(server, hf_model_dir):
    _, llama = hf_model_dir("llama")
    _, qwen = hf_model_dir("qwen2")
    _, c, _ = weights.load(str(server.path), llama, load_config(llama), torch.float32, progress=False)
    with pytest.raises(weights.WeightsMismatch, match="holds weights of"):
        weights.load(str(server.path), qwen, load_config(qwen), torch.float32, progress=False)
    c.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # Qwen2: q/k/v biases, fused too
def test_published_weights_hold_fused_projections_and_a_shadow_imports_them(server, hf_model_dir, family):
    """The pool holds one qkv_proj and one gate_up_proj per layer (model/layout.py), none of the checkpoint's
    q_proj / k_proj / v_proj / gate_proj / up_proj; an engine built with the same config imports that layout
    and holds what a model loaded straight from the checkpoint does."""
    _, path = hf_model_dir(family)
    config = load_config(path)
    model, client, _ = weights.load(str(server.path), path, config, torch.float32, progress=False)
    shadow, client2, stats = weights.load(str(server.path), path, config, torch.float32, progress=False)
    try:
        names = set(client.layout.tensors)
        assert stats["source"] == "imported" and set(client2.layout.tensors) == names
        for layer in range(config.num_hidden_layers):
            p = f"model.layers.{layer}."
            assert {p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"} <= names
            assert (p + "self_attn.qkv_proj.bias" in names) == (family == "qwen2")
        separate = (".q_proj", ".k_proj", ".v_proj", ".gate_proj", ".up_proj")
        assert not [n for n in names if n.rpartition(".")[0].endswith(separate)]
        attn = shadow.model.layers[0].self_attn.qkv_proj.weight
        assert attn.shape == (config.q_size + 2 * config.kv_size, config.hidden_size)
        local = load_model(path, dtype=torch.float32).state_dict()
        assert all(torch.equal(t, local[n]) for n, t in shadow.state_dict().items())
    finally:
        client.close()
        client2.close()

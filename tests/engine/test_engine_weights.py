"""Weights through the memory service: the first engine publishes, later ones import."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from understudy.engine.model import weights
from understudy.engine.model.loader import load_config
from understudy.memory import read_status


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # byte-for-byte, and converted
def test_publish_then_import_with_zero_copies(server, hf_model_dir, dtype):
    hf, path = hf_model_dir("llama")
    config = load_config(path)
    stored = load_file(str(next(path.glob("*.safetensors"))))
    model, client, stats = weights.load(str(server.path), path, config, dtype, progress=False)
    assert stats["source"] == "published" and stats["GBps"] > 0
    for name, t in model.state_dict().items():
        assert t.dtype == dtype
        assert torch.equal(t, stored[name].to(dtype)), name
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

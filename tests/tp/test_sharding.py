"""How a checkpoint is cut into ranks (engine/tp.py) and published shard by shard (engine/weights.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from understudy.engine.model import weights
from understudy.engine.model.loader import load_config
from understudy.engine.model.sharding import TensorParallel, check_shardable, rank_config, shard_dim, shard_tensor

from tests.helpers.tiny_model import make_tiny_llama


def test_which_tensors_are_cut_and_along_which_dimension():
    assert shard_dim("model.layers.0.self_attn.q_proj.weight") == 0
    assert shard_dim("model.layers.3.self_attn.v_proj.bias") == 0
    assert shard_dim("model.layers.0.mlp.up_proj.weight") == 0
    assert shard_dim("model.layers.0.self_attn.o_proj.weight") == 1
    assert shard_dim("model.layers.0.mlp.down_proj.weight") == 1
    for replicated in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                       "model.layers.0.self_attn.o_proj.bias", "model.layers.0.self_attn.q_norm.weight",
                       "model.layers.0.input_layernorm.weight"):
        assert shard_dim(replicated) is None, replicated


def test_shards_put_back_together_are_the_tensor():
    t = torch.randn(8, 6)
    for name, dim in (("x.self_attn.k_proj.weight", 0), ("x.mlp.down_proj.weight", 1)):
        pieces = [shard_tensor(name, t, r, 2) for r in range(2)]
        assert torch.equal(torch.cat(pieces, dim), t)
    assert shard_tensor("model.norm.weight", t, 1, 2) is t


def test_a_model_that_does_not_divide_is_refused_with_the_reason(tmp_path):
    config = load_config(make_tiny_llama(tmp_path / "m", num_attention_heads=6, num_key_value_heads=3,
                                         hidden_size=48, intermediate_size=96))
    with pytest.raises(ValueError, match="does not divide the model's 3 KV heads"):
        check_shardable(config, 2)
    share = rank_config(config, 3)
    assert (share.num_attention_heads, share.num_key_value_heads, share.intermediate_size) == (2, 1, 32)
    assert (share.hidden_size, share.head_dim, share.vocab_size) == (48, 8, 256)


def test_each_rank_publishes_its_own_shard(server, tmp_path):
    """Rank r's pool holds exactly rank r's slices, read straight from the file (dim 0) or through a
    safetensors slice (dim 1); its identity names the rank, so another rank or a TP=1 engine refuses it."""
    path = make_tiny_llama(tmp_path / "m")
    config = load_config(path)
    full = load_file(str(path / "model.safetensors"))
    noop = lambda t: None  # noqa: E731 - no collective runs here
    tp = TensorParallel(1, 2, noop)
    model, client, stats = weights.load(str(server.path), path, config, torch.float32, progress=False, tp=tp)
    try:
        assert stats["source"] == "published" and model.config == rank_config(config, 2)
        state = model.state_dict()
        for name, tensor in full.items():
            assert torch.equal(state[name].cpu(), shard_tensor(name, tensor, 1, 2)), name  # the pool may be on a GPU
        assert client.layout.extra["tensor_parallel"] == [1, 2]
        for other in (TensorParallel(0, 2, noop), None):
            with pytest.raises(weights.WeightsMismatch, match="rank 1's shard of a --tensor-parallel 2 group"):
                weights.load(str(server.path), path, config, torch.float32, progress=False, tp=other, timeout=5)
    finally:
        client.close()

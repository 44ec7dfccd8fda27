"""How a checkpoint is cut into ranks (engine/tp.py) and published shard by shard (engine/weights.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from understudy.engine.model import weights
from understudy.engine.model.layout import checkpoint_view
from understudy.engine.model.loader import load_config
from understudy.engine.model.sharding import TensorParallel, check_shardable, rank_config, shard_dim, shard_tensor

from tests.helpers.tiny_model import make_tiny_llama


def test_which_tensors_are_cut_and_along_which_dimension():
    assert shard_dim("model.layers.0.self_attn.q_proj.weight") == 0
    assert shard_dim("model.layers.3.self_attn.v_proj.bias") == 0
    assert shard_dim("model.layers.0.mlp.up_proj.weight") == 0
    assert shard_dim("model.layers.0.self_attn.qkv_proj.weight") == 0  # fused: part by part (below)
    assert shard_dim("model.layers.0.self_attn.qkv_proj.bias") == 0
    assert shard_dim("model.layers.0.mlp.gate_up_proj.weight") == 0
    assert shard_dim("model.layers.0.mlp.experts.3.up_proj.weight") == 0
    assert shard_dim("model.layers.0.self_attn.o_proj.weight") == 1
    assert shard_dim("model.layers.0.mlp.down_proj.weight") == 1
    assert shard_dim("model.layers.0.block_sparse_moe.experts.3.w2.weight") == 1
    assert shard_dim("model.layers.0.mlp.experts.gate_up_proj") == 1  # stacked [E, 2I, H]
    assert shard_dim("model.layers.0.mlp.experts.down_proj") == 2  # stacked [E, H, I]
    for replicated in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                       "model.layers.0.self_attn.o_proj.bias", "model.layers.0.self_attn.q_norm.weight",
                       "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.gate.weight"):
        assert shard_dim(replicated) is None, replicated


def test_shards_put_back_together_are_the_tensor(tmp_path):
    config = load_config(make_tiny_llama(tmp_path / "m"))
    t = torch.randn(8, 6)
    for name, dim in (("x.self_attn.k_proj.weight", 0), ("x.mlp.down_proj.weight", 1)):
        pieces = [shard_tensor(name, t, r, 2, config) for r in range(2)]
        assert torch.equal(torch.cat(pieces, dim), t)
    assert shard_tensor("model.norm.weight", t, 1, 2, config) is t


def test_a_rank_holds_its_rows_of_each_part_of_a_fused_tensor(tmp_path):
    """qkv_proj = [q; k; v] with 4 query heads and 2 KV heads of 16: rank r of 2 holds its 2 query heads,
    then its KV head of k, then of v, which is the fused layout of its rank config (1/2 of every count)."""
    config = load_config(make_tiny_llama(tmp_path / "m"))
    q, k, v = torch.randn(64, 64), torch.randn(32, 64), torch.randn(32, 64)
    for r in range(2):
        got = shard_tensor("model.layers.0.self_attn.qkv_proj.weight", torch.cat([q, k, v]), r, 2, config)
        want = torch.cat([q[32 * r:32 * (r + 1)], k[16 * r:16 * (r + 1)], v[16 * r:16 * (r + 1)]])
        assert torch.equal(got, want), r
        bias = shard_tensor("model.layers.0.self_attn.qkv_proj.bias", torch.arange(128.0), r, 2, config)
        assert bias.tolist() == [*range(32 * r, 32 * r + 32), *range(64 + 16 * r, 80 + 16 * r),
                                 *range(96 + 16 * r, 112 + 16 * r)]
        gate, up = torch.randn(128, 64), torch.randn(128, 64)
        got = shard_tensor("model.layers.0.mlp.gate_up_proj.weight", torch.cat([gate, up]), r, 2, config)
        assert torch.equal(got, torch.cat([gate[64 * r:64 * (r + 1)], up[64 * r:64 * (r + 1)]]))
    share = rank_config(config, 2)
    assert (share.q_size + 2 * share.kv_size, 2 * share.intermediate_size) == (64, 128)


def test_phi3_fused_checkpoint_is_shardable(tmp_path):
    """Phi-3 stores qkv_proj and gate_up_proj fused: cut part by part, it is no longer refused."""
    from tests.engine.test_families import build

    path = tmp_path / "phi3"
    build("phi3").save_pretrained(path, safe_serialization=True)
    config = load_config(path)
    assert config.fused_checkpoint
    check_shardable(config, 2)  # no error


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
    tp = TensorParallel(1, 2, noop, noop)
    model, client, stats = weights.load(str(server.path), path, config, torch.float32, progress=False, tp=tp)
    try:
        assert stats["source"] == "published" and model.config == rank_config(config, 2)
        state = {n: t.cpu() for n, t in model.state_dict().items()}  # the pool may be on a GPU
        for name, tensor in full.items():  # q_proj's shard: its rows of the rank's qkv_proj (model/layout.py)
            got = checkpoint_view(name, model.config, state.__getitem__)[1]
            assert torch.equal(got, shard_tensor(name, tensor, 1, 2, config)), name
        assert client.layout.extra["tensor_parallel"] == [1, 2]
        for other in (TensorParallel(0, 2, noop, noop), None):
            with pytest.raises(weights.WeightsMismatch, match="rank 1's shard of a --tensor-parallel 2 group"):
                weights.load(str(server.path), path, config, torch.float32, progress=False, tp=other, timeout=5)
    finally:
        client.close()


def test_each_rank_publishes_its_rows_of_each_part_of_a_fused_checkpoint(server, tmp_path):
    """Phi-3's stored qkv_proj / gate_up_proj: rank 1's pool holds its rows of q, k and v (gate, up), read
    through safetensors slices, part by part."""
    from tests.engine.test_families import build

    hf = build("phi3")
    path = tmp_path / "phi3"
    hf.save_pretrained(path, safe_serialization=True)
    config = load_config(path)
    tp = TensorParallel(1, 2, lambda t: None, lambda t: None)  # no collective runs here
    model, client, _ = weights.load(str(server.path), path, config, torch.float32, progress=False, tp=tp)
    try:
        state, full = model.state_dict(), hf.state_dict()
        q, kv, i = config.q_size, config.kv_size, config.intermediate_size
        qkv = full["model.layers.1.self_attn.qkv_proj.weight"]
        want = torch.cat([qkv[q // 2:q], qkv[q + kv // 2:q + kv], qkv[q + kv + kv // 2:]])
        assert torch.equal(state["model.layers.1.self_attn.qkv_proj.weight"].cpu(), want)
        gate_up = full["model.layers.1.mlp.gate_up_proj.weight"]
        want = torch.cat([gate_up[i // 2:i], gate_up[i + i // 2:]])
        assert torch.equal(state["model.layers.1.mlp.gate_up_proj.weight"].cpu(), want)
    finally:
        client.close()

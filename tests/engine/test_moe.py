"""Mixture of experts (Qwen3-MoE, Mixtral, GLM-4.5): the model against transformers, the fused Triton kernel against
the reference, tensor parallelism, and the stacked expert weights through the memory service; FP8 experts
(checkpoints quantized here per channel and in 128x128 blocks, served against their dequantized twins on
the reference and through the Triton kernels in the interpreter; `--quantization fp8` published and imported).

Tiny random models built with transformers' own config classes and saved with save_pretrained, so the
checkpoints carry the per-expert names real ones do (mlp.experts.E.gate_proj / block_sparse_moe.experts.E.w1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from understudy.engine.layers import moe
from understudy.engine.layers.attention import AttentionMetadata
from understudy.engine.model.loader import load_config, load_model

from tests.helpers.engine import greedy_generate, hf_greedy
from tests.helpers.interpreter import INTERPRETING, run_interpreted_tests

NEW_TOKENS = 12
PROMPT = [17, 200, 3, 99, 45, 45, 128, 7, 250, 31, 64]
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=256, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
FAMILIES = {
    # layer 1 keeps a dense MLP (mlp_only_layers); top-k probabilities used as they are (norm_topk_prob off)
    "qwen3_moe": dict(num_hidden_layers=3, head_dim=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False),
    # every layer sparse, top-2 renormalized
    "mixtral": dict(num_hidden_layers=2, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    # layer 0 dense (first_k_dense_replace); DeepSeek-V3's router: the top 2 of 4 groups of 2 experts, the
    # weights renormalized and scaled; two experts' width of shared MLP; q/k/v biases, q/k norms, RoPE on
    # half of each head
    "glm4_moe": dict(num_hidden_layers=3, head_dim=32, intermediate_size=96, n_routed_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2, n_group=4, topk_group=2,
                     first_k_dense_replace=1, routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True),
}

# compressed-tensors' per-channel FP8 (scales stored [N, 1]) and the fp8 method's 128x128 blocks
CHANNEL = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
           "config_groups": {"group_0": {"targets": ["Linear"],
                                         "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                         "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                               "dynamic": True}}}}
BLOCK = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
         "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate"]}  # the routers, as Qwen's list them


def build_hf_moe(family: str, seed: int = 0, **shape):
    import transformers

    config_cls, model_cls = {"qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
                             "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
                             "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM)}[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **FAMILIES[family], **shape})).eval().to(torch.float32)
    with torch.no_grad():  # norms away from 1, so a weight loaded under the wrong name shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
        for name, b in model.named_buffers():  # GLM-4.5's choice bias (zeros): one that changes the choice
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            from tests.helpers.tiny_model import write_byte_tokenizer

            model = build_hf_moe(family)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path, safe_serialization=True)
            write_byte_tokenizer(path)
            cache[family] = (model, path)
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_says_which_layers_are_sparse(moe_dir, family):
    _, path = moe_dir(family)
    cfg = load_config(path)
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (8, 2)
    if family == "qwen3_moe":
        assert cfg.moe_layers == (0, 2) and cfg.moe_intermediate_size == 32 and not cfg.norm_topk_prob
        assert cfg.qk_norm
    elif family == "glm4_moe":
        assert cfg.moe_layers == (1, 2) and cfg.shared_expert_intermediate_size == 64 and cfg.norm_topk_prob
        assert (cfg.moe_router, cfg.moe_groups, cfg.moe_top_groups, cfg.routed_scaling_factor) == ("sigmoid", 4, 2, 2.5)
        assert cfg.qk_norm and cfg.qkv_bias and cfg.rotary_dim == 16 and cfg.extra_checkpoint_layers == 1
    else:
        assert cfg.moe_layers == (0, 1) and cfg.moe_intermediate_size == 48 and cfg.norm_topk_prob


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_and_logits_match_transformers(moe_dir, family):
    hf, path = moe_dir(family)
    ours = load_model(path, dtype=torch.float32)
    sparse = ours.model.layers[ours.config.moe_layers[0]].mlp.experts
    assert sparse.gate_up_proj.shape == (8, 2 * ours.config.moe_intermediate_size, 64)  # stacked at load
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0]
    meta = AttentionMetadata.build([len(PROMPT)], [len(PROMPT)], [[5, 1, 3]], block_size=4)
    caches = [(torch.zeros(6, 4, 2, ours.config.head_dim), torch.zeros(6, 4, 2, ours.config.head_dim))
              for _ in range(ours.config.num_hidden_layers)]
    got = ours(torch.tensor(PROMPT), meta.positions(), meta, caches, logits_indices=torch.arange(len(PROMPT)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    reference = hf_greedy(hf, PROMPT, NEW_TOKENS)
    assert len(set(reference)) > 1, "degenerate reference: the comparison would prove little"
    # one prompt, then a batch mixing prefill chunks and decodes
    assert greedy_generate(ours, [PROMPT], NEW_TOKENS) == [reference]
    prompts = [PROMPT, [5, 9, 200], [42]]
    assert greedy_generate(ours, prompts, NEW_TOKENS, chunk_size=4) == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("qconfig,why", [
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "per-tensor weight scales"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
     "width 32 is not a whole number of 128-row blocks"),  # the tiny model's experts are 32 wide
    ({**CHANNEL, "ignore": ["lm_head", "model.layers.2.mlp.experts.5.down_proj"]},
     "leaves expert model.layers.2.mlp.experts.5.down_proj unquantized"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}}},
     "static activation scales"),
])
def test_fp8_moe_checkpoints_the_experts_cannot_take_are_refused_when_read(moe_dir, qconfig, why):
    import json

    from understudy.engine.model.config import ModelConfig, UnsupportedModelError

    _, path = moe_dir("qwen3_moe")
    d = json.loads((path / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match=f"mixture-of-experts checkpoint .*{why}"):
        ModelConfig.from_hf_dict({**d, "quantization_config": qconfig})
    ModelConfig.from_hf_dict({**d, "quantization_config": CHANNEL})  # while per-channel experts are served


@pytest.mark.parametrize("renormalize,groups,top_groups", [(True, 4, 2), (False, 1, 1), (True, 8, 3)])
def test_biased_routing_chooses_and_weighs_as_transformers(renormalize, groups, top_groups):
    """moe.route_biased against transformers' GLM-4.5 router on 64 random tokens: the same experts and weights."""
    import transformers
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    config = transformers.Glm4MoeConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=groups,
                                        topk_group=top_groups, norm_topk_prob=renormalize, routed_scaling_factor=1.8)
    torch.manual_seed(groups + top_groups)
    router = Glm4MoeTopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
        router.e_score_correction_bias.normal_(0.0, 0.3)
    x = torch.randn(64, 32)
    logits, want_weights, want_ids = router(x)
    weights, ids = moe.route_biased(logits, router.e_score_correction_bias, 4, groups, top_groups, renormalize, 1.8)
    order, want_order = ids.sort(dim=-1), want_ids.sort(dim=-1)  # the order within a token's top k is free
    assert torch.equal(order.values, want_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), want_weights.gather(1, want_order.indices))


def test_gguf_mixture_of_experts_is_refused_when_read(tmp_path):
    import gguf
    import numpy as np

    from understudy.engine.model.config import UnsupportedModelError

    path = tmp_path / "mixtral.gguf"
    w = gguf.GGUFWriter(str(path), "llama")  # llama.cpp files Mixtral under llama, with an expert count
    w.add_block_count(1)
    w.add_expert_count(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="GGUF mixture-of-experts models are not supported"):
        load_config(path)


def _stacked(path: Path, family: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's expert matrices stacked as the model holds them, by parameter name."""
    from safetensors.torch import load_file

    stored = load_file(str(path / "model.safetensors"))
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    out = {}
    for layer in load_config(path).moe_layers:
        src, dst = f"model.layers.{layer}.{block}.experts", f"model.layers.{layer}.mlp.experts"
        out[f"{dst}.gate_up_proj"] = torch.stack([torch.cat([stored[f"{src}.{e}.{gate}.weight"],
                                                             stored[f"{src}.{e}.{up}.weight"]]) for e in range(8)])
        out[f"{dst}.down_proj"] = torch.stack([stored[f"{src}.{e}.{down}.weight"] for e in range(8)])
    return {name: t.to(dtype) for name, t in out.items()}


@pytest.mark.parametrize("family,dtype", [("qwen3_moe", torch.float32), ("mixtral", torch.bfloat16),
                                          ("glm4_moe", torch.bfloat16)])
def test_stacked_experts_are_published_and_imported_with_zero_copies(server, moe_dir, family, dtype):
    """float32: each expert's matrix read from the file straight into its slice; bfloat16: converted (GLM-4.5's
    router kept in float32, as transformers keeps it)."""
    from understudy.engine.model import weights

    _, path = moe_dir(family)
    config = load_config(path)
    model, client, stats = weights.load(str(server.path), path, config, dtype, progress=False)
    model2, client2, stats2 = weights.load(str(server.path), path, config, dtype, progress=False)
    try:
        assert (stats["source"], stats2["source"]) == ("published", "imported")
        state, state2 = model.state_dict(), model2.state_dict()
        for name, want in _stacked(path, family, dtype).items():
            assert torch.equal(state[name], want), name
            # the shadow's stacked tensor maps the same bytes at another address
            assert torch.equal(state2[name], want) and state2[name].data_ptr() != state[name].data_ptr()
        router = f"model.layers.{config.moe_layers[0]}.mlp.gate.weight"
        assert router in state  # Mixtral's router under the model's name
        if family == "glm4_moe":
            assert state[router].dtype == torch.float32 and state2[router].dtype == torch.float32
        ids = torch.tensor(PROMPT)
        meta = AttentionMetadata.build([len(PROMPT)], [len(PROMPT)], [[5, 1, 3]], block_size=4)

        def logits(m):
            shape = (6, 4, 2, m.config.head_dim)
            caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                      for _ in range(m.config.num_hidden_layers)]
            return m(ids, meta.positions(), meta, caches)

        assert torch.equal(logits(model), logits(model2))
    finally:
        client.close()
        client2.close()


def test_a_checkpoints_multi_token_prediction_layer_is_not_loaded(server, moe_dir, tmp_path):
    """GLM-4.5's checkpoints hold a layer past the model's (num_nextn_predict_layers: model.layers.{L}.*), which
    transformers does not load: neither do loading nor publishing, which never read its bytes; a layer past
    that is still an error."""
    import shutil

    from safetensors.torch import save_file

    from understudy.engine.model import weights

    hf, path = moe_dir("glm4_moe")
    copy = tmp_path / "with-mtp"
    shutil.copytree(path, copy)
    mtp = {"model.layers.3.eh_proj.weight": torch.randn(64, 128),
           "model.layers.3.mlp.experts.0.gate_proj.weight": torch.randn(32, 64)}
    save_file(mtp, str(copy / "model-mtp.safetensors"))
    assert greedy_generate(load_model(copy, dtype=torch.float32), [PROMPT], NEW_TOKENS) == \
        [hf_greedy(hf, PROMPT, NEW_TOKENS)]
    model, client, stats = weights.load(str(server.path), copy, load_config(copy), torch.float32, progress=False)
    client.close()
    assert stats["source"] == "published"
    save_file({"model.layers.4.eh_proj.weight": torch.randn(64, 128)}, str(copy / "model-mtp.safetensors"))
    with pytest.raises(KeyError, match="model.layers.4.eh_proj.weight"):
        load_model(copy, dtype=torch.float32)


def test_each_rank_publishes_its_slice_of_every_expert(server, moe_dir):
    """Rank 1 of 2 holds rows [I/2, I) of each expert's gate and up and those columns of its down."""
    from understudy.engine.model import weights
    from understudy.engine.model.sharding import TensorParallel

    _, path = moe_dir("qwen3_moe")
    tp = TensorParallel(1, 2, lambda t: None, lambda t: None)  # no collective runs here
    model, client, _ = weights.load(str(server.path), path, load_config(path), torch.float32, progress=False, tp=tp)
    try:
        state, half = model.state_dict(), 16
        for name, full in _stacked(path, "qwen3_moe", torch.float32).items():
            if name.endswith("gate_up_proj"):
                want = torch.cat([full[:, half:2 * half], full[:, 3 * half:]], dim=1)
            else:
                want = full[:, :, half:]
            assert torch.equal(state[name], want), name
    finally:
        client.close()


@pytest.mark.parametrize("family", ["mixtral", "glm4_moe"])
def test_tensor_parallel_2_gives_transformers_tokens(moe_dir, family):
    """`understudy serve --tensor-parallel 2` on gloo (two ranks, each with its own memory service): the
    experts' partial sums (and GLM-4.5's shared experts') all-reduced, greedy tokens as transformers' (which
    the TP=1 model matches above)."""
    from tests.helpers.procs import tp2_group
    from tests.helpers.streams import body, ndjson, tokens_of

    hf, path = moe_dir(family)
    with tp2_group(path, "moe-test", "--max-model-len", "256") as http:
        for prompt in (PROMPT, [5, 9, 200]):
            got = tokens_of(ndjson(http.post("/engine/generate", json=body(prompt, NEW_TOKENS))))
            assert got == hf_greedy(hf, prompt, NEW_TOKENS)
        assert http.get("/health").json()["tensor_parallel"] == 2


# ------------------------------------------------------------------------------------------
# FP8 experts
# ------------------------------------------------------------------------------------------

# experts 128 wide (a whole block), hidden 160 (a ragged second column block and row block)
FP8_SHAPE = {"qwen3_moe": dict(hidden_size=160, moe_intermediate_size=128),
             "mixtral": dict(hidden_size=160, intermediate_size=128),
             "glm4_moe": dict(hidden_size=160, moe_intermediate_size=128)}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def fp8_moe_pair(root: Path, family: str, scheme: str, seed: int = 1) -> tuple[Path, Path]:
    """(an FP8 checkpoint of a tiny random MoE: every projection, experts included, quantized per channel or
    in 128x128 blocks, the routers and lm_head not; its dequantized float32 twin, unquantized)."""
    from safetensors.torch import load_file, save_file

    from understudy.engine.layers import quant
    from tests.helpers.tiny_model import write_byte_tokenizer

    model = build_hf_moe(family, seed, **FP8_SHAPE[family])
    fp8_dir, twin_dir = root / f"{family}-{scheme}-fp8", root / f"{family}-{scheme}-twin"
    for d in (fp8_dir, twin_dir):
        model.save_pretrained(d, safe_serialization=True)
        write_byte_tokenizer(d)
    block = (128, 128) if scheme == "block" else None
    quantized, dequantized = {}, {}
    for name, t in load_file(str(twin_dir / "model.safetensors")).items():
        if name.endswith(".weight") and name.rsplit(".", 2)[1] in PROJECTIONS:
            w8, scale = quant.quantize(t, scheme, block)
            quantized[name] = w8
            if scheme == "block":
                quantized[name.removesuffix("weight") + "weight_scale_inv"] = scale
            else:
                quantized[name.removesuffix("weight") + "weight_scale"] = scale.reshape(-1, 1)
            dequantized[name] = quant.dequantize(w8, scale, scheme, block)
        else:
            quantized[name] = dequantized[name] = t
    save_file(quantized, str(fp8_dir / "model.safetensors"))
    save_file(dequantized, str(twin_dir / "model.safetensors"))
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = BLOCK if scheme == "block" else CHANNEL
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return fp8_dir, twin_dir


def _prompt_logits(model, prompt=PROMPT):
    meta = AttentionMetadata.build([len(prompt)], [len(prompt)], [[5, 1, 3]], block_size=4)
    shape = (6, 4, model.config.num_key_value_heads, model.config.head_dim)
    dtype = model.model.embed_tokens.weight.dtype
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
              for _ in range(model.config.num_hidden_layers)]
    return model(torch.tensor(prompt), meta.positions(), meta, caches, logits_indices=torch.arange(len(prompt)))


FP8_CASES = [("qwen3_moe", "block"), ("qwen3_moe", "channel"), ("mixtral", "block"), ("glm4_moe", "block")]


@pytest.mark.parametrize("family,scheme", FP8_CASES)
def test_fp8_moe_checkpoint_serves_as_its_dequantized_twin(tmp_path, family, scheme):
    fp8_dir, twin_dir = fp8_moe_pair(tmp_path, family, scheme)
    fp8, twin = load_model(fp8_dir, dtype=torch.float32), load_model(twin_dir, dtype=torch.float32)
    sparse = fp8.model.layers[fp8.config.moe_layers[0]].mlp
    experts = sparse.experts
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float8_e4m3fn
    scales = experts.scales()
    assert scales.gate_up.dtype == torch.float32
    if scheme == "block":  # [E, 2I/128, cdiv(H, 128)], [E, cdiv(H, 128), I/128]
        assert (scales.gate_up.shape, scales.down.shape) == ((8, 2, 2), (8, 2, 1))
        assert hasattr(experts, "gate_up_proj_scale_inv")  # transformers' name for block scales
    else:
        assert (scales.gate_up.shape, scales.down.shape) == ((8, 256), (8, 160))
    assert sparse.gate.weight.dtype == torch.float32  # the router is never quantized
    if family == "glm4_moe":  # the shared experts are (a dense MLP's FP8 linears; unfused: 96-row dense MLPs)
        shared = sparse.shared_experts
        assert (shared.gate_up_proj if shared.fused else shared.gate_proj).weight.dtype == torch.float8_e4m3fn
    # The CPU path is the exact reference: each expert dequantized, then the twin's math.
    torch.testing.assert_close(_prompt_logits(fp8), _prompt_logits(twin), rtol=1e-5, atol=1e-5)
    prompts = [PROMPT, [5, 9, 200], [42]]
    expected = greedy_generate(twin, prompts, NEW_TOKENS, chunk_size=4)
    assert len(set(expected[0])) > 1, "degenerate reference: the comparison would prove little"
    assert greedy_generate(fp8, prompts, NEW_TOKENS, chunk_size=4) == expected
    if family == "qwen3_moe" and scheme == "block":  # bf16, the serving dtype on GPUs: the same roundings
        fp8, twin = load_model(fp8_dir, dtype=torch.bfloat16), load_model(twin_dir, dtype=torch.bfloat16)
        assert torch.equal(_prompt_logits(fp8), _prompt_logits(twin))


def test_quantization_fp8_publishes_fp8_experts_a_shadow_imports(server, moe_dir):
    """`--quantization fp8` on a bf16-style MoE: every expert quantized per channel when published (the
    attention and dense MLP linears too, the routers not); a second engine maps the same FP8 bytes."""
    from understudy.engine.model import weights
    from understudy.engine.model.quantization import with_quantization

    _, path = moe_dir("qwen3_moe")
    config = with_quantization(load_config(path), "fp8")
    model, client, stats = weights.load(str(server.path), path, config, torch.float32, progress=False)
    model2, client2, stats2 = weights.load(str(server.path), path, config, torch.float32, progress=False)
    try:
        assert (stats["source"], stats2["source"]) == ("published", "imported")
        pool = {name: client.tensor(name) for name in model.state_dict()}
        for layer in (0, 2):
            prefix = f"model.layers.{layer}.mlp"
            assert pool[f"{prefix}.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
            assert pool[f"{prefix}.experts.down_proj"].dtype == torch.float8_e4m3fn
            assert pool[f"{prefix}.experts.gate_up_proj_scale"].shape == (8, 64)
            assert pool[f"{prefix}.experts.down_proj_scale"].dtype == torch.float32
            assert pool[f"{prefix}.gate.weight"].dtype == torch.float32
        assert pool["model.layers.1.mlp.gate_up_proj.weight"].dtype == torch.float8_e4m3fn  # the dense layer
        # the same model quantized the same way without the memory service, and the shadow's mapping
        local = load_model(path, dtype=torch.float32, quantization="fp8")
        want = local.state_dict()
        for name, t in model2.state_dict().items():
            assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                               want[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else want[name]), name
        shadow = model2.model.layers[0].mlp.experts.gate_up_proj
        assert shadow.data_ptr() != model.model.layers[0].mlp.experts.gate_up_proj.data_ptr()
        assert torch.equal(_prompt_logits(model2), _prompt_logits(local))
        assert greedy_generate(model2, [PROMPT], NEW_TOKENS) == greedy_generate(local, [PROMPT], NEW_TOKENS)
    finally:
        client.close()
        client2.close()


def test_quantization_fp8_takes_stacked_checkpoint_experts_expert_by_expert(moe_dir):
    """A checkpoint that stores the experts stacked (transformers>=5 names) is quantized per expert matrix:
    the same bytes as its per-expert tensors give."""
    from understudy.engine.layers import quant
    from understudy.engine.model.decoder import CausalLM
    from understudy.engine.model.layout import parameter_of
    from understudy.engine.model.quantization import with_quantization

    _, path = moe_dir("qwen3_moe")
    config = with_quantization(load_config(path), "fp8")
    with torch.device("meta"):
        model = quant.cast_model(CausalLM(config), torch.float32)
    stacked = _stacked(path, "qwen3_moe", torch.float32)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    out = dict(quant.quantize_online(model, [(name, stacked[name])], lambda n: parameter_of(n, config)))
    assert out[name].dtype == torch.float8_e4m3fn and out[f"{name}_scale"].shape == (8, 64)
    w8, scale = quant.quantize(stacked[name][3], "channel")
    assert torch.equal(out[name][3].view(torch.uint8), w8.view(torch.uint8))
    assert torch.equal(out[f"{name}_scale"][3], scale)


def test_fp8_experts_are_refused_under_tensor_parallelism(moe_dir):
    from understudy.engine.model.quantization import with_quantization
    from understudy.engine.model.sharding import check_shardable

    _, path = moe_dir("qwen3_moe")
    with pytest.raises(ValueError, match="FP8 weights .* not supported with --tensor-parallel 2"):
        check_shardable(with_quantization(load_config(path), "fp8"), 2)


# ------------------------------------------------------------------------------------------
# The fused Triton MoE: in the interpreter on the CPU, compiled on a GPU
# ------------------------------------------------------------------------------------------

# The interpreter must be on before Triton is first imported, so these run in a child pytest started with
# TRITON_INTERPRET=1 (as in test_fused.py); in the parent they are skipped and one test runs the child.
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.timeout(660)  # the child's own limit, 600 s, and its start (the default 300 s is too short)
def test_moe_kernels_in_the_interpreter():
    run_interpreted_tests(__file__, timeout=600)


@pytest.fixture
def interpreted(monkeypatch):
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_moe_kernels_in_the_interpreter")
    from understudy.engine.layers import _moe_kernels

    monkeypatch.setattr(moe, "_KERNELS", _moe_kernels)


def _case(T: int, E: int, top_k: int, H: int, I: int, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) * H**-0.5).to(dtype)  # outputs of size ~1
    down = (torch.randn(E, H, I, generator=gen) * I**-0.5).to(dtype)
    weights, ids = moe.route(torch.randn(T, E, generator=gen), top_k, renormalize=True)
    return [t.to(device) for t in (x, gate_up, down, weights, ids)]


def test_routed_experts_on_the_cpu_is_route_then_experts():
    x, gate_up, down, _, _ = _case(3, 8, 2, 32, 16, torch.float32)
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for renormalize in (True, False):
        want = moe.experts(x, gate_up, down, *moe.route(logits, 2, renormalize))
        assert torch.equal(moe.routed_experts(x, logits, gate_up, down, 2, renormalize), want)


# decode (one token), a small batch, more slots than one pass of the aligner takes (128), several experts
# hit by no token; fp16 for the half path (the interpreter's bf16 dot is not numpy's to give)
SHAPES = [(1, 8, 2, 64, 32), (5, 4, 2, 48, 40), (40, 16, 4, 64, 96), (3, 64, 8, 32, 16)]


@pytest.mark.parametrize("T,E,top_k,H,I,dtype", [(*s, torch.float32) for s in SHAPES]
                         + [(*SHAPES[1], torch.float16)])
def test_interpreted_experts_match_the_reference(interpreted, dtype, T, E, top_k, H, I):
    x, gate_up, down, weights, ids = _case(T, E, top_k, H, I, dtype)
    want = moe.experts_ref(x.float(), gate_up.float(), down.float(), weights, ids)
    got = moe.experts_triton(x, gate_up, down, weights, ids)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)


# the GEMV path (at most 16 tokens): one token, experts shared by several tokens (8 experts, 16 tokens
# top-4: each expert's program serves many rows), K and N not multiples of the tiles, 128 experts top-8
GEMV_SHAPES = [(1, 8, 2, 64, 32), (5, 4, 2, 48, 40), (16, 8, 4, 64, 96), (8, 128, 8, 40, 24)]
# several K and column tiles per program at these shapes: the tensor-core kernels, the CUDA-core ones
SMALL_MMA = moe.GemvConfig(("mma", 16, 16, 4, 1), ("mma", 16, 32, 4, 1))
SMALL_FMA = moe.GemvConfig(("fma", 4, 16, 4, 1), ("fma", 8, 32, 2, 1))


@pytest.mark.parametrize("path,config,T,E,top_k,H,I,dtype",
                         [(p, c, *s, torch.float32) for s in GEMV_SHAPES for p, c in
                          (("gemv", None), ("gemv", SMALL_MMA), ("gemv", SMALL_FMA), ("grouped", None))]
                         + [("gemv", c, *GEMV_SHAPES[2], torch.float16) for c in (None, SMALL_FMA)])
def test_interpreted_small_batch_paths_match_the_reference(interpreted, path, config, dtype, T, E, top_k, H, I):
    x, gate_up, down, weights, ids = _case(T, E, top_k, H, I, dtype)
    want = moe.experts_ref(x.float(), gate_up.float(), down.float(), weights, ids)
    got = moe.experts_triton(x, gate_up, down, weights, ids, path=path, config=config)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)


def test_interpreted_gemv_path_reads_strided_rows(interpreted):
    """x a view with a row stride wider than H (a slice of a larger buffer), as the decoder may pass."""
    x, gate_up, down, weights, ids = _case(3, 8, 2, 32, 16, torch.float32)
    wide = torch.zeros(3, 48)
    wide[:, 8:40] = x
    got = moe.experts_triton(wide[:, 8:40], gate_up, down, weights, ids, path="gemv")
    torch.testing.assert_close(got, moe.experts_ref(x, gate_up, down, weights, ids), rtol=1e-5, atol=1e-5)


# decode: one and two tokens, top-8 and top-2, H and I not multiples of the tiles (the defaults' and small ones)
DECODE_SHAPES = [(1, 16, 8, 40, 24), (2, 16, 8, 40, 24), (1, 8, 2, 64, 32), (2, 12, 2, 48, 40)]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("config", [None, SMALL_FMA], ids=["default", "small"])
@pytest.mark.parametrize("T,E,top_k,H,I", DECODE_SHAPES)
def test_interpreted_routed_decode_matches_the_reference(interpreted, T, E, top_k, H, I, config, renormalize):
    """The block after its router GEMM at 1-2 tokens (the routing kernel, then the CUDA-core kernels): the
    reference's routing and experts."""
    x, gate_up, down, _, _ = _case(T, E, top_k, H, I, torch.float32)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E)) * 3
    want = moe.experts_ref(x, gate_up, down, *moe.route_ref(logits, top_k, renormalize))
    assert (config or moe._gemv_config(T, fp8=False)).gate_up[0] == "fma"
    got = moe.experts_triton(x, gate_up, down, *moe.route_triton(logits, top_k, renormalize), config=config)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,top_k", [(1, 16, 2), (2, 128, 8), (2, 12, 8)])  # each has ties
def test_interpreted_routing_breaks_ties_by_the_lower_id(interpreted, T, E, top_k, renormalize):
    """bf16 logits with repeated values: the routing kernel picks the same probabilities as torch, tied
    experts in ascending id order, with torch's weights."""
    gen = torch.Generator().manual_seed(E)
    logits = (torch.randint(-3, 4, (T, E), generator=gen) * 0.5).to(torch.bfloat16)  # many exact ties
    weights, ids = moe.route_triton(logits, top_k, renormalize)
    want_weights, want_ids = moe.route_ref(logits, top_k, renormalize)
    probs = probs_of(logits, ids)
    torch.testing.assert_close(probs, probs_of(logits, want_ids), rtol=0, atol=0)
    tied = probs[:, 1:] == probs[:, :-1]
    assert tied.any() and (ids[:, 1:] > ids[:, :-1])[tied].all()
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)


def test_interpreted_align_groups_every_slot_by_expert(interpreted):
    _, _, _, _, ids = _case(70, 16, 4, 8, 8, torch.float32)  # 280 slots: three passes
    block_m = 16
    slots, block_expert, num_padded = moe.align(ids, 16, block_m)
    used = int(num_padded)
    counts = torch.bincount(ids.flatten(), minlength=16)
    assert used == int(sum(-(-c // block_m) * block_m for c in counts.tolist()))
    flat = ids.flatten()
    rows = slots[:used].view(-1, block_m)
    real = rows[rows < flat.numel()].long()
    assert sorted(real.tolist()) == list(range(flat.numel()))  # every slot once
    for b, row in enumerate(rows):  # a block holds one expert's slots
        assert all(flat[s] == block_expert[b] for s in row.tolist() if s < flat.numel())


@pytest.mark.parametrize("family", ["mixtral", "glm4_moe"])
def test_interpreted_kernels_in_the_model(interpreted, monkeypatch, moe_dir, family):
    """The whole forward with the fused MoE (and every other fused op) on the Triton path (GLM-4.5: its
    router's choice, in torch's ops, into the same kernels, and its shared experts' MLP)."""
    from understudy.engine.layers import fused

    _, path = moe_dir(family)
    model = load_model(path, dtype=torch.float32)
    meta = AttentionMetadata.build([len(PROMPT)], [len(PROMPT)], [[5, 1, 3]], block_size=4)

    def run():
        shape = (6, 4, 2, model.config.head_dim)
        caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.config.num_hidden_layers)]
        return model(torch.tensor(PROMPT), meta.positions(), meta, caches, torch.arange(len(PROMPT)))

    want = run()
    monkeypatch.setattr(fused, "_use_triton", lambda x: True)
    torch.testing.assert_close(run(), want, rtol=1e-4, atol=1e-4)


def _fp8_case(T: int, E: int, top_k: int, H: int, I: int, dtype, block, device="cpu", seed=0):
    """(x, FP8 gate_up, FP8 down, weights, ids, their Fp8Scales, the dequantized gate_up and down in fp32)."""
    from understudy.engine.layers import quant

    x, gate_up, down, weights, ids = _case(T, E, top_k, H, I, torch.float32, device, seed)
    kind = "block" if block else "channel"
    out = []
    for w in (gate_up, down):
        pairs = [quant.quantize(m, kind, block) for m in w]
        w8, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        out.append((w8, s, torch.stack([quant.dequantize(q, sc, kind, block) for q, sc in pairs])))
    (gu8, gus, gu), (dn8, dns, dn) = out
    return x.to(dtype), gu8, dn8, weights, ids, moe.Fp8Scales(gus, dns, block), gu, dn


# per channel; 128x128 blocks with a ragged edge (H 160); small 32x32 blocks (many per matrix, K tiles cut
# to 32 columns); the GEMV path and the grouped one; fp16 for the half path
FP8_KERNEL_CASES = [(3, 8, 2, 48, 40, None), (40, 16, 4, 64, 96, None), (3, 8, 2, 160, 128, (128, 128)),
                    (40, 8, 2, 160, 128, (128, 128)), (5, 4, 2, 64, 32, (32, 32)), (24, 8, 4, 96, 64, (32, 32))]


@pytest.mark.parametrize("path,T,E,top_k,H,I,block,dtype",
                         [(p, *c, torch.float32) for c in FP8_KERNEL_CASES for p in ("gemv", "grouped")
                          if p == "grouped" or c[0] <= 16]  # the GEMV path takes at most 16 tokens
                         + [(p, *FP8_KERNEL_CASES[i], torch.float16) for i in (0, 4) for p in ("gemv", "grouped")])
def test_interpreted_fp8_experts_match_the_dequantized_reference(interpreted, path, dtype, T, E, top_k, H, I, block):
    x, gu8, dn8, weights, ids, scales, gu, dn = _fp8_case(T, E, top_k, H, I, dtype, block)
    want = moe.experts_ref(x.float(), gu, dn, weights, ids)
    # the reference on FP8 weights is the dequantized reference
    torch.testing.assert_close(moe.experts_ref(x.float(), gu8, dn8, weights, ids, scales), want, rtol=0, atol=0)
    got = moe.experts_triton(x, gu8, dn8, weights, ids, path=path, scales=scales)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)


# decode on the CUDA-core kernels with FP8 weights: per channel, 128x128 blocks (ragged H), 32x32 blocks (K
# tiles cut to the block's 32 columns), top-8 and top-2, one and two tokens
FP8_DECODE_CASES = [(1, 8, 2, 48, 40, None), (2, 16, 8, 40, 24, None), (2, 8, 2, 160, 128, (128, 128)),
                    (1, 16, 8, 64, 32, (32, 32))]


@pytest.mark.parametrize("T,E,top_k,H,I,block", FP8_DECODE_CASES)
def test_interpreted_fp8_decode_matches_the_dequantized_reference(interpreted, T, E, top_k, H, I, block):
    x, gu8, dn8, weights, ids, scales, gu, dn = _fp8_case(T, E, top_k, H, I, torch.float32, block)
    config = moe.GemvConfig(("fma", 4, 64, 4, 1), ("fma", 4, 64, 2, 1))
    want = moe.experts_ref(x, gu, dn, weights, ids)
    got = moe.experts_triton(x, gu8, dn8, weights, ids, path="gemv", config=config, scales=scales)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,scheme", [("qwen3_moe", "block"), ("mixtral", "channel")])
def test_interpreted_fp8_moe_model_serves_as_its_twin(interpreted, monkeypatch, tmp_path, family, scheme):
    """An FP8 MoE's whole forward with the Triton MoE kernels (and every other fused op): the dequantized
    twin's logits and greedy tokens (the prompt takes the grouped path, the decode steps the GEMV one)."""
    from understudy.engine.layers import fused

    fp8_dir, twin_dir = fp8_moe_pair(tmp_path, family, scheme)
    fp8, twin = load_model(fp8_dir, dtype=torch.float32), load_model(twin_dir, dtype=torch.float32)
    want_logits = _prompt_logits(twin)
    want_tokens = greedy_generate(twin, [PROMPT], 4)
    monkeypatch.setattr(fused, "_use_triton", lambda x: True)
    torch.testing.assert_close(_prompt_logits(fp8), want_logits, rtol=1e-4, atol=1e-4)
    assert greedy_generate(fp8, [PROMPT], 4) == want_tokens


@cuda_only
@pytest.mark.parametrize("block", [None, (128, 128)])
@pytest.mark.parametrize("path,T", [("gemv", 1), ("gemv", 3), ("grouped", 3), ("grouped", 32), ("grouped", 200)])
def test_cuda_fp8_experts_match_the_dequantized_reference(path, block, T):
    """Qwen3-30B-A3B's shape in bf16: the W8A16 kernels against the dequantized weights."""
    x, gu8, dn8, weights, ids, scales, gu, dn = _fp8_case(T, 128, 8, 2048, 768, torch.bfloat16, block, "cuda")
    want = moe.experts_ref(x.float(), gu, dn, weights, ids)
    got = moe.experts_triton(x, gu8, dn8, weights, ids, path=path, scales=scales)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,E,top_k,H,I", SHAPES + [(128, 128, 8, 2048, 768), (1000, 8, 2, 512, 1024)])
def test_cuda_experts_match_the_reference(dtype, T, E, top_k, H, I):
    x, gate_up, down, weights, ids = _case(T, E, top_k, H, I, dtype, device="cuda")
    want = moe.experts_ref(x.float(), gate_up.float(), down.float(), weights, ids)
    got = moe.experts(x, gate_up, down, weights, ids)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.float(), want, **tol)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["gemv", "grouped"])
@pytest.mark.parametrize("T", [1, 3, 8, 16])
def test_cuda_small_batch_paths_match_the_reference(dtype, path, T):
    """Both paths at Qwen3-30B-A3B's shape and the batch sizes the GEMV path may take."""
    x, gate_up, down, weights, ids = _case(T, 128, 8, 2048, 768, dtype, device="cuda")
    want = moe.experts_ref(x.float(), gate_up.float(), down.float(), weights, ids)
    got = moe.experts_triton(x, gate_up, down, weights, ids, path=path)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.float(), want, **tol)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", ["default", "mma"])
@pytest.mark.parametrize("T,top_k", [(1, 8), (2, 8), (1, 2), (2, 2)])
def test_cuda_decode_configs_match_the_reference(dtype, config, T, top_k):
    """The block after its router GEMM at 1-2 tokens at Qwen3-30B-A3B's shape: the GEMV path's configs (the
    CUDA-core kernels by default, the tensor-core ones)."""
    x, gate_up, down, _, _ = _case(T, 128, top_k, 2048, 768, dtype, device="cuda")
    logits = torch.randn(T, 128, device="cuda") * 3
    want = moe.experts_ref(x.float(), gate_up.float(), down.float(), *moe.route_ref(logits, top_k, True))
    cfg = {"default": None, "mma": moe.MMA_GEMV}[config]
    got = moe.experts_triton(x, gate_up, down, *moe.route(logits, top_k, True), config=cfg)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.float(), want, **tol)


@cuda_only
@pytest.mark.parametrize("block", [None, (128, 128)])
@pytest.mark.parametrize("T", [1, 2])
def test_cuda_fp8_routed_decode_matches_the_dequantized_reference(block, T):
    x, gu8, dn8, _, _, scales, gu, dn = _fp8_case(T, 128, 8, 2048, 768, torch.bfloat16, block, "cuda")
    logits = torch.randn(T, 128, device="cuda") * 3
    want = moe.experts_ref(x.float(), gu, dn, *moe.route_ref(logits, 8, True))
    got = moe.routed_experts(x, logits, gu8, dn8, 8, True, scales=scales)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_routing_matches_the_reference(dtype):
    logits = (torch.randn(257, 128, device="cuda") * 3).to(dtype)
    weights, ids = moe.route(logits, 8, renormalize=True)
    want_weights, want_ids = moe.route_ref(logits, 8, renormalize=True)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        assert torch.equal(ids, want_ids)
    else:  # bf16 logits tie often: torch.topk may order tied experts otherwise (the lower id wins here)
        assert torch.equal(probs_of(logits, ids), probs_of(logits, want_ids))


def probs_of(logits, ids):
    return torch.softmax(logits.float(), -1).gather(1, ids)


@cuda_only
@pytest.mark.parametrize("T", [1, 2, 32])  # the GEMV path, the grouped one
def test_cuda_experts_replay_in_a_graph(T):
    """No host sync: the routing, the aligner and the GEMMs are captured; new routing replays correctly."""
    x, gate_up, down, _, _ = _case(T, 64, 8, 256, 128, torch.bfloat16, device="cuda")
    router = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        return moe.routed_experts(x, x @ router, gate_up, down, 8, renormalize=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = step()
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,top_k", [(1, 8, 2), (7, 128, 8), (3, 60, 4)])
def test_interpreted_routing_matches_the_reference(interpreted, renormalize, T, E, top_k):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(E)) * 3
    weights, ids = moe.route_triton(logits, top_k, renormalize)
    want_weights, want_ids = moe.route_ref(logits, top_k, renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-6)

"""FP8 on the CPU: checkpoints quantized here (per tensor, per channel, 128x128 blocks) served against their
dequantized twins, `--quantization fp8` published once and imported by a second engine, the FP8 KV cache
(reference vs the Triton kernels in the interpreter, vs an unquantized cache), the Triton FP8 GEMM and the
decode GEMV in the interpreter, and quantization methods refused when config.json is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.engine import PagedKV, greedy_generate
from tests.helpers.tiny_model import make_tiny_llama
from understudy.engine.layers import quant
from understudy.engine.layers.attention import AttentionMetadata, reference_attention
from understudy.engine.model.config import ModelConfig, UnsupportedModelError
from understudy.engine.model.loader import load_model
from understudy.engine.model.quantization import Quantization
from tests.helpers.interpreter import INTERPRETING, run_interpreted_tests

PROMPTS = [[17, 200, 3, 99, 45, 45, 128, 7, 250, 31, 64], [5, 9, 200]]
NEW_TOKENS = 8
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# hidden 128 and intermediate 384: several whole 128x128 blocks per matrix; 192 (below) leaves ragged ones.
SHAPE = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)

# (name, quantization_config, how the checkpoint stores the weight scales)
SCHEMES = {
    "tensor": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"],
                                              "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
                                              "input_activations": {"num_bits": 8, "type": "float",
                                                                    "strategy": "tensor", "dynamic": False}}}},
               "weight_scale", lambda s, n: s.reshape(1)),
    "channel": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                 "config_groups": {"group_0": {"targets": ["Linear"],
                                               "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                               "input_activations": {"num_bits": 8, "type": "float",
                                                                     "strategy": "token", "dynamic": True}}}},
                "weight_scale", lambda s, n: s.reshape(n, 1)),
    "block": ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
              "weight_scale_inv", lambda s, n: s),
}


def _quantized_pair(root: Path, scheme: str, seed: int = 0, kv_scales: dict | None = None, **shape):
    """(FP8 checkpoint dir, its dequantized float32 twin dir) of one tiny random Llama."""
    from safetensors.torch import load_file, save_file

    qconfig, scale_name, store_scale = SCHEMES[scheme]
    twin = make_tiny_llama(root / f"{scheme}-twin", seed=seed, **{**SHAPE, **shape})
    fp8 = make_tiny_llama(root / f"{scheme}-fp8", seed=seed, **{**SHAPE, **shape})
    tensors = load_file(str(twin / "model.safetensors"))
    kind = "block" if scheme == "block" else scheme
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        if name.rpartition(".")[0].rpartition(".")[2] in LINEARS:
            w8, scale = quant.quantize(t, kind, (128, 128) if kind == "block" else None)
            dequantized[name] = quant.dequantize(w8, scale, kind, (128, 128))
            quantized[name] = w8
            quantized[name.removesuffix("weight") + scale_name] = store_scale(scale, t.shape[0])
            if scheme == "tensor":  # a static activation scale: read, and used on CUDA only (the CPU is exact)
                quantized[name.removesuffix("weight") + "input_scale"] = torch.tensor([0.05])
        else:
            quantized[name] = dequantized[name] = t
    for layer, (k, v) in (kv_scales or {}).items():
        quantized[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(k)
        quantized[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(v)
    save_file(quantized, str(fp8 / "model.safetensors"))
    save_file(dequantized, str(twin / "model.safetensors"))
    cfg = json.loads((fp8 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**cfg, "quantization_config": qconfig}))
    return fp8, twin


def _logits(model, prompt):
    meta = AttentionMetadata.build([len(prompt)], [len(prompt)], [[3, 1, 2, 5]], block_size=4)
    kv = PagedKV(model.config, 6, 4)
    return model(torch.tensor(prompt), meta.positions(), meta, kv.caches, logits_indices=torch.arange(len(prompt)))


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_fp8_checkpoint_serves_as_its_dequantized_twin(tmp_path, scheme):
    fp8_dir, twin_dir = _quantized_pair(tmp_path, scheme)
    fp8, twin = load_model(fp8_dir, dtype=torch.float32), load_model(twin_dir, dtype=torch.float32)
    assert fp8.config.quantization.weights == scheme
    layer = fp8.model.layers[0].mlp.down_proj
    assert isinstance(layer, quant.Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert layer.scales.dtype == torch.float32
    assert fp8.lm_head.weight.dtype == torch.float32  # lm_head and embeddings are never quantized
    # The CPU path is the exact reference: dequantize, then the same matmul as the twin.
    torch.testing.assert_close(_logits(fp8, PROMPTS[0]), _logits(twin, PROMPTS[0]), rtol=1e-5, atol=1e-5)
    expected = greedy_generate(twin, PROMPTS, NEW_TOKENS)
    assert len(set(expected[0])) > 1, "degenerate reference: the comparison would prove little"
    assert greedy_generate(fp8, PROMPTS, NEW_TOKENS) == expected


# scheme -> (q/k/v fused, gate/up fused) for heads of 128 (q 256 rows, k and v 128 each) and an MLP of 384
FUSES = {"tensor": (False, False), "channel": (True, True), "block": (True, True)}


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_fp8_layers_are_fused_where_their_scales_cut_along_the_rows(tmp_path, scheme):
    """Per-channel scales and whole 128x128 blocks concatenate with the parts' rows (one qkv_proj, one
    gate_up_proj); a per-tensor scale differs per part, so those layers stay apart. Either way the model
    serves as the dequantized twin does."""
    fp8_dir, twin_dir = _quantized_pair(tmp_path, scheme, seed=5, hidden_size=256, num_attention_heads=2,
                                        num_key_value_heads=1)
    fp8, twin = load_model(fp8_dir, dtype=torch.float32), load_model(twin_dir, dtype=torch.float32)
    attn, mlp = fp8.model.layers[0].self_attn, fp8.model.layers[0].mlp
    assert (fp8.config.fuse_qkv, fp8.config.fuse_gate_up) == FUSES[scheme]
    assert (hasattr(attn, "qkv_proj"), hasattr(mlp, "gate_up_proj")) == FUSES[scheme]
    if scheme != "tensor":
        assert isinstance(attn.qkv_proj, quant.Fp8Linear)
        assert attn.qkv_proj.scales.shape == ((512,) if scheme == "channel" else (4, 2))
        assert mlp.gate_up_proj.scales.shape == ((768,) if scheme == "channel" else (6, 2))
    torch.testing.assert_close(_logits(fp8, PROMPTS[0]), _logits(twin, PROMPTS[0]), rtol=1e-5, atol=1e-5)
    assert twin.config.fuse_qkv and hasattr(twin.model.layers[0].self_attn, "qkv_proj")  # unquantized: fused


def test_layers_whose_blocks_are_ragged_or_parts_partly_ignored_stay_apart():
    block = Quantization("fp8", "block", "dynamic", (128, 128), "weight_scale_inv")
    layers = [["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]]
    assert block.fuses((256, 128), layers) and not block.fuses((256, 64), layers)  # 64 rows: half a block
    some = Quantization("compressed-tensors", "channel", "dynamic", ignore=("model.layers.0.self_attn.k_proj",))
    assert not some.fuses((256, 128), layers)  # q FP8, k not: one linear cannot be both
    both = Quantization("compressed-tensors", "channel", "dynamic", ignore=("re:.*layers\\.0\\..*_proj",))
    assert both.fuses((256, 128), layers) and not both.quantizes("model.layers.0.self_attn.qkv_proj")
    static = Quantization("fp8", "channel", "static")
    assert not static.fuses((256, 128), layers)  # one input_scale per part


def test_ragged_blocks_and_bf16(tmp_path):
    """Dims that are not multiples of 128 (edge blocks cut short) in bf16, the serving dtype on GPUs."""
    fp8_dir, twin_dir = _quantized_pair(tmp_path, "block", seed=3, hidden_size=192, intermediate_size=320)
    fp8, twin = load_model(fp8_dir, dtype=torch.bfloat16), load_model(twin_dir, dtype=torch.bfloat16)
    assert fp8.model.layers[0].mlp.up_proj.weight_scale_inv.shape == (3, 2)
    assert greedy_generate(fp8, PROMPTS, NEW_TOKENS) == greedy_generate(twin, PROMPTS, NEW_TOKENS)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("qconfig, named", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, "'awq'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "'gptq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}, "4-bit int"),
])
def test_other_quantization_methods_are_refused_when_the_config_is_read(tmp_path, qconfig, named):
    d = make_tiny_llama(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": qconfig}))
    with pytest.raises(UnsupportedModelError, match=rf"{named}.*not supported.*compressed-tensors FP8.*--quantization fp8"):
        ModelConfig.from_pretrained(d)
    with pytest.raises(UnsupportedModelError, match=named):  # load_model never gets to a KeyError on qweight
        load_model(d)


# ------------------------------------------------------------------------------------------ --quantization fp8


def _serve_config(model_dir: Path, socket_dir, **kv):
    from understudy.engine.serve_config import (
        DeviceOptions,
        KVOptions,
        ModelOptions,
        OutputOptions,
        ServeConfig,
    )

    return ServeConfig(model=ModelOptions(model=str(model_dir), dtype="float32", quantization="fp8",
                                          max_model_len=48),  # a short warm-up
                       device=DeviceOptions(backend="host", socket_dir=str(socket_dir), memory_service="connect"),
                       kv=KVOptions(kv_cache_memory=4 << 20, max_num_seqs=4, max_num_batched_tokens=256, **kv),
                       output=OutputOptions(no_progress=True))


def test_quantization_fp8_publishes_fp8_weights_a_second_engine_imports_and_adopts_an_fp8_kv_pool(
        server, socket_dir, tmp_path, monkeypatch):
    from understudy.engine.core.sampling import SamplingParams
    from understudy.engine.launch import build_engine

    d = make_tiny_llama(tmp_path / "m", **SHAPE)
    config = _serve_config(d, socket_dir, kv_cache_dtype="fp8")
    prompt, greedy = [7, 99, 3, 45, 45, 128, 17, 200, 3, 99, 64, 31, 5, 9, 200, 1, 2, 3, 4], \
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    a = build_engine(config)
    try:
        assert a.weights_stats["source"] == "published"
        layout = a.worker.weights.layout.tensors
        # gate and up quantized per channel, part by part, into the fused gate_up_proj (model/layout.py)
        assert layout["model.layers.0.mlp.gate_up_proj.weight"].dtype == "float8_e4m3fn"
        assert layout["model.layers.0.mlp.gate_up_proj.weight_scale"].dtype == "float32"
        assert tuple(layout["model.layers.0.self_attn.qkv_proj.weight_scale"].shape) == (128 + 2 * 64,)
        assert "model.layers.0.mlp.gate_proj.weight" not in layout
        assert layout["lm_head.weight"].dtype == "float32"
        assert a.engine.kv.spec.dtype == "float8_e4m3fn"
        assert a.engine.kv.layers[0][0].dtype == torch.float8_e4m3fn
        # the same model quantized the same way without the memory service (loader.load_model)
        local = load_model(d, dtype=torch.float32, quantization="fp8")
        kv = PagedKV(local.config, 64, 16, dtype=torch.float8_e4m3fn)
        expected = greedy_generate(local, [prompt], 10, block_size=16, kv=kv)[0]
        assert a.engine.generate([prompt], greedy) == [expected]
    finally:
        a.close()  # as if it died: its KV pool and weights stay in the memory service

    def no_requantizing(*args, **kwargs):
        raise AssertionError("an importing engine quantized weights")

    monkeypatch.setattr(quant, "quantize", no_requantizing)
    b = build_engine(config)
    try:
        assert b.weights_stats["source"] == "imported"  # zero copies: it maps the pool's FP8 bytes
        w = b.engine.model.model.layers[1].self_attn.o_proj
        assert isinstance(w, quant.Fp8Linear) and w.weight.dtype == torch.float8_e4m3fn
        assert b.engine.kv.adopted and b.engine.adopt_prefix_cache() > 0  # the FP8 pool and its prefix index
        computed = b.engine.prompt_tokens_computed
        assert b.engine.generate([prompt], greedy) == [expected]
        assert b.engine.prompt_tokens_computed - computed < len(prompt)  # the cached prefix was reused
    finally:
        b.close()


def test_an_unquantized_engine_does_not_import_fp8_weights(server, socket_dir, tmp_path):
    from understudy.engine.model import weights
    from understudy.engine.model.loader import load_config
    from understudy.engine.model.quantization import with_quantization

    d = make_tiny_llama(tmp_path / "m")
    config = load_config(d)
    _, client, stats = weights.load(str(server.path), d, with_quantization(config, "fp8"), torch.float32,
                                    progress=False)
    assert stats["source"] == "published"
    with pytest.raises(weights.WeightsMismatch):
        weights.load(str(server.path), d, config, torch.float32, progress=False, timeout=5)
    client.close()


def test_quantize_round_trip_error_is_within_fp8_precision():
    torch.manual_seed(0)
    w = torch.randn(256, 384) * torch.logspace(-2, 1, 256)[:, None]  # rows of very different ranges
    for weights, block in (("tensor", None), ("channel", None), ("block", (128, 128))):
        w8, scale = quant.quantize(w, weights, block)
        err = (quant.dequantize(w8, scale, weights, block) - w).abs()
        # e4m3: 3 mantissa bits, so at most 1/16 of the value, plus half a subnormal step of the group's scale
        group_scale = quant.dequantize(torch.ones_like(w8), scale, weights, block)
        assert (err <= w.abs() / 16 + group_scale * 2 ** -10 + 1e-12).all(), weights


# ------------------------------------------------------------------------------------------ FP8 KV cache


def test_fp8_kv_cache_is_close_to_the_unquantized_cache(tmp_path):
    model = load_model(make_tiny_llama(tmp_path / "m", **SHAPE), dtype=torch.float32)
    prompt = PROMPTS[0]
    meta = AttentionMetadata.build([len(prompt)], [len(prompt)], [[3, 1, 2, 5]], block_size=4)
    out = {}
    for dtype in (torch.float32, torch.float8_e4m3fn):
        kv = PagedKV(model.config, 6, 4, dtype=dtype)
        out[dtype] = model(torch.tensor(prompt), meta.positions(), meta, kv.caches, torch.arange(len(prompt)))
        if dtype == torch.float8_e4m3fn:
            assert kv.caches[0][0].abs().float().sum() > 0  # written, in FP8
    ref, fp8 = out[torch.float32], out[torch.float8_e4m3fn]
    # e4m3 keeps 3 mantissa bits (~6% per element): this large-weight random model moves ~12% (a wrong scale
    # or layout would leave nothing of the logits)
    assert (fp8 - ref).norm() < 0.2 * ref.norm()
    assert torch.nn.functional.cosine_similarity(fp8, ref, dim=-1).min() > 0.97


def test_kv_scales_come_from_the_checkpoint_and_divide_what_is_stored(tmp_path):
    fp8_dir, _ = _quantized_pair(tmp_path, "channel", kv_scales={0: (0.5, 2.0), 1: (0.25, 4.0)})
    model = load_model(fp8_dir, dtype=torch.float32)
    attn = [layer.self_attn for layer in model.model.layers]
    assert [(a.k_scale, a.v_scale) for a in attn] == [(0.5, 2.0), (0.25, 4.0)]
    k = torch.randn(3, 2, 16) * 4
    kc, vc = torch.zeros(4, 4, 2, 16, dtype=torch.float8_e4m3fn), torch.zeros(4, 4, 2, 16, dtype=torch.float8_e4m3fn)
    from understudy.engine.layers.attention import store_kv

    store_kv(k, k, kc, vc, torch.tensor([4, 5, 6]), 0.5, 2.0)
    assert torch.equal(kc.view(-1, 2, 16)[4:7].float(), (k / 0.5).to(torch.float8_e4m3fn).float())
    assert torch.equal(vc.view(-1, 2, 16)[4:7].float(), (k / 2.0).to(torch.float8_e4m3fn).float())


# ------------------------------------------------------------------------------------------ Triton kernels
# The interpreter must be on before Triton is first imported, so these run in a child pytest started with
# TRITON_INTERPRET=1 (as in test_fused.py); in the parent they are skipped and one test runs the child.
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_triton_fp8_kernels_in_the_interpreter():
    run_interpreted_tests(__file__, timeout=600)


@pytest.fixture
def interpreted():
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_fp8_kernels_in_the_interpreter")


def _gemm_case(weights: str, m: int, n: int, k: int, dtype, device="cpu", bias=True):
    torch.manual_seed(m * 7 + n)
    block = (128, 128) if weights == "block" else None
    w8, scale = quant.quantize(torch.randn(n, k, device=device), weights, block)
    x = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    layer = Quantization("test", weights, "dynamic", block, "weight_scale")
    ref = torch.nn.functional.linear(x.float(), quant.dequantize(w8, scale, weights, block), b if b is None else b.float())
    return x, w8, scale, b, layer, ref


# The interpreter's tl.dot on bf16 gives garbage (numpy has no bf16): fp32 and fp16 here, bf16 on the GPU.
@pytest.mark.parametrize("weights", ["tensor", "channel", "block"])
@pytest.mark.parametrize("m,n,k,dtype", [(1, 96, 320, torch.float32), (40, 80, 384, torch.float32),
                                         (5, 256, 128, torch.float16)])  # ragged N, K and blocks
def test_interpreted_fp8_gemm_matches_the_dequantized_reference(interpreted, dtype, weights, m, n, k):
    x, w8, scale, b, layer, ref = _gemm_case(weights, m, n, k, dtype)
    out = quant.fp8_linear(x, w8, scale, b, layer)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)


# The GEMV (decode rows): (m, n, k, config, dtype). One, 3 and 8 rows; N and K off the tiles; configs
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps) with K split (partial sums added by the reduce kernel) or not,
# K tiles inside one 128-column scale block (one scale per tile) and wider ones (a scale per column), two
# warps; None: gemv_config's default. bf16 works here: the GEMV has no tl.dot.
GEMV_CASES = [(1, 44, 200, (8, 64, 2, 1), torch.float32), (1, 130, 260, None, torch.bfloat16),
              (3, 72, 330, (16, 64, 3, 1), torch.float32), (3, 36, 300, (4, 256, 1, 1), torch.bfloat16),
              (8, 40, 264, (8, 128, 1, 2), torch.float32), (8, 20, 520, (8, 256, 2, 1), torch.bfloat16)]


@pytest.mark.parametrize("weights", ["tensor", "channel", "block"])
@pytest.mark.parametrize("m,n,k,config,dtype", GEMV_CASES)
def test_interpreted_fp8_gemv_matches_the_dequantized_reference(interpreted, weights, m, n, k, config, dtype):
    x, w8, scale, b, layer, ref = _gemm_case(weights, m, n, k, dtype)
    out = quant.gemv(x, w8, scale, b, layer, config)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    without_bias = quant.gemv(x, w8, scale, None, layer, config)
    torch.testing.assert_close(without_bias.float(), ref - b.float(), **tol)


def _fp8_attention_case(device, dtype):
    from understudy.engine.layers.attention import AttentionMetadata

    torch.manual_seed(1)
    q_lens, ctx, block_size, hkv, group, d = [4, 1, 17, 30], [4, 20, 17, 100], 16, 2, 4, 16
    per_seq = [-(-c // block_size) for c in ctx]
    perm = (torch.randperm(sum(per_seq) + 3) + 1).tolist()
    tables = [perm[sum(per_seq[:i]):sum(per_seq[:i + 1])] for i in range(len(ctx))]
    shape = (max(perm) + 1, block_size, hkv, d)
    kc = (torch.randn(shape, device=device) * 3).to(torch.float8_e4m3fn)
    vc = (torch.randn(shape, device=device) * 3).to(torch.float8_e4m3fn)
    T = sum(q_lens)
    q = torch.randn(T, hkv * group, d, dtype=dtype, device=device)
    k, v = torch.randn(T, hkv, d, dtype=dtype, device=device), torch.randn(T, hkv, d, dtype=dtype, device=device)
    return q, k, v, kc, vc, AttentionMetadata.build(q_lens, ctx, tables, block_size, device=device)


def _check_fp8_attention(device, dtype, tol):
    from understudy.engine.layers.triton_attention import fast_attention

    from understudy.engine.layers.attention import store_kv

    q, k, v, kc, vc, meta = _fp8_attention_case(device, dtype)
    scale, k_scale, v_scale = q.shape[-1] ** -0.5, 0.5, 2.0
    store_kv(k, v, kc, vc, meta.slot_mapping, k_scale, v_scale)  # the model's RoPE step stores them
    kc2, vc2 = kc.clone(), vc.clone()
    ref = reference_attention(q, k, v, kc, vc, meta, scale, k_scale=k_scale, v_scale=v_scale)
    out = fast_attention(q, k, v, kc2, vc2, meta, scale, k_scale=k_scale, v_scale=v_scale, prefill_kernel=True)
    assert torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8))  # attention only reads the caches
    assert torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8))
    torch.testing.assert_close(out, ref, **tol)
    # and the cache holds k / k_scale: reading it back as the unquantized cache would give 2x the keys
    wrong = reference_attention(q, k, v, kc.clone(), vc.clone(), meta, scale, k_scale=1.0, v_scale=1.0)
    assert not torch.allclose(wrong, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_fp8_kv_prefill_attention_matches_the_reference(interpreted, dtype):
    _check_fp8_attention("cpu", dtype, dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else
                         dict(rtol=2e-3, atol=2e-3))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fp8_kv_attention_matches_the_reference(dtype):
    _check_fp8_attention("cuda", dtype, dict(rtol=2e-2, atol=2e-2))
    from understudy.engine.layers.triton_attention import paged_decode_attention

    q, _, _, kc, vc, meta = _fp8_attention_case("cuda", dtype)
    one = q[:len(meta.context_lens_host)].contiguous()  # one query token per sequence: the decode kernel
    ref_meta = type(meta).build([1] * len(meta.context_lens_host), list(meta.context_lens_host),
                                [row[: -(-c // 16)] for row, c in zip(meta.block_tables.tolist(),
                                                                       meta.context_lens_host)], 16, device="cuda")
    from understudy.engine.layers.attention import from_cache

    out = paged_decode_attention(one, kc, vc, ref_meta.block_tables, ref_meta.context_lens, 0.25, 0.5, 2.0)
    for i, c in enumerate(meta.context_lens_host):
        blocks = ref_meta.block_tables[i, : -(-c // 16)].long()
        keys = from_cache(kc[blocks].flatten(0, 1)[:c], torch.float32, 0.5)
        values = from_cache(vc[blocks].flatten(0, 1)[:c], torch.float32, 2.0)
        att = torch.softmax(torch.einsum("hd,thd->ht", one[i].float().view(2, 4, 16).flatten(0, 0).reshape(8, 16),
                                         keys.repeat_interleave(4, 1)) * 0.25, -1)
        expected = torch.einsum("ht,thd->hd", att, values.repeat_interleave(4, 1))
        torch.testing.assert_close(out[i].float(), expected, rtol=3e-2, atol=3e-2)


@cuda_only
@pytest.mark.parametrize("weights", ["tensor", "channel", "block"])
@pytest.mark.parametrize("m", [1, 8, 32, 200])
def test_cuda_fp8_linear_matches_the_dequantized_reference(weights, m):
    x, w8, scale, b, layer, ref = _gemm_case(weights, m, 1024, 512, torch.bfloat16, "cuda")
    lin = quant.Fp8Linear(512, 1024, True, layer).cuda()
    lin.weight.data, lin.bias.data = w8, b
    setattr(lin, layer.scale_name, torch.nn.Parameter(scale, requires_grad=False))
    scaled_mm = m > quant.GEMV_MAX_M and weights != "block"
    # the layer's path: torch._scaled_mm quantizes activations per token (FP8 precision, not bf16's); the GEMV
    # (m <= GEMV_MAX_M) and the Triton GEMM keep bf16 activations
    rel = (lin(x).float() - ref).norm() / ref.norm()
    assert rel < (0.05 if scaled_mm else 0.01), rel
    # the Triton W8A16 GEMM takes every scale layout at every size (bf16 activations: bf16 precision)
    rel = (quant.fp8_linear(x, w8, scale, b, layer).float() - ref).norm() / ref.norm()
    assert rel < 0.01, rel


@cuda_only
@pytest.mark.parametrize("weights", ["tensor", "channel", "block"])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("config", [None, (8, 512, 1, 1), (16, 256, 4, 1), (8, 1024, 2, 2), (4, 128, 3, 1)])
def test_cuda_fp8_gemv_matches_the_dequantized_reference_and_repeats_its_bits(weights, m, config):
    x, w8, scale, b, layer, ref = _gemm_case(weights, m, 1000, 4096, torch.bfloat16, "cuda")  # N off the tiles
    out = quant.gemv(x, w8, scale, b, layer, config)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.01, rel
    # split-K partial sums are added in a fixed order by a second launch: the same bits every time
    assert torch.equal(out, quant.gemv(x, w8, scale, b, layer, config))

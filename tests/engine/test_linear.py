"""layers/linear.py: the decoder's unquantized projections. The GEMV it routes one row to (quant.gemv with no
scales, the FP8 layers' kernel) against torch in Triton's interpreter; on the CPU every projection is
F.linear whatever DENSE_GEMV_CONFIGS says; on a GPU, the routing, its bits and a CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from understudy.engine.layers import linear, quant
from understudy.engine.model.config import ModelConfig
from understudy.engine.model.decoder import CausalLM
from understudy.engine.model.experts import SoftmaxRouter
from tests.helpers.interpreter import INTERPRETING, run_interpreted_tests

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_triton_linear_kernels_in_the_interpreter():
    run_interpreted_tests(__file__, timeout=600)


@pytest.fixture
def interpreted():
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_linear_kernels_in_the_interpreter")


def _case(m: int, n: int, k: int, dtype, device="cpu", bias=True, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    w = (torch.randn(n, k, generator=g, device=device) * 0.1).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    return x, w, b, F.linear(x.float(), w.float(), None if b is None else b.float())


# (m, n, k, config, dtype): rows 1 and 2, N and K off the tiles (odd), configs (BLOCK_N, BLOCK_K, SPLIT_K,
# num_warps) with K split (the reduce kernel adds the partial sums and the bias) or not, two warps; None:
# gemv_config's rule. bf16 works in the interpreter: the GEMV has no tl.dot.
DENSE_CASES = [(1, 37, 203, (8, 64, 3, 1), torch.bfloat16), (1, 129, 517, (4, 128, 1, 1), torch.bfloat16),
               (1, 45, 333, (4, 128, 1, 2), torch.float16), (2, 45, 333, (8, 64, 2, 1), torch.bfloat16),
               (2, 70, 261, None, torch.float16), (1, 33, 101, (4, 32, 4, 1), torch.float32)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,n,k,config,dtype", DENSE_CASES)
def test_interpreted_unquantized_gemv_matches_torch(interpreted, m, n, k, config, dtype, bias):
    x, w, b, ref = _case(m, n, k, dtype, bias=bias)
    out = quant.gemv(x, w, None, b, None, config)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), ref, **tol)


def test_cpu_projections_are_f_linear_whatever_the_table_says(monkeypatch):
    def no_gemv(*args, **kwargs):
        raise AssertionError("the GEMV ran on CPU tensors")

    monkeypatch.setattr(quant, "gemv", no_gemv)
    monkeypatch.setitem(linear.DENSE_GEMV_CONFIGS, (37, 203), (4, 128, 1, 1))
    layer = linear.Linear(203, 37, bias=True).to(torch.bfloat16)
    for shape in [(1, 203), (203,), (1, 1, 203), (2, 203)]:
        x = torch.randn(shape).to(torch.bfloat16)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert torch.equal(linear.linear(x, layer.weight), F.linear(x, layer.weight))


def test_every_projection_of_the_decoder_goes_through_linear():
    """q/k/v, o, gate/up, down, the MoE router and lm_head are linear.Linear (FP8 ones quant.Fp8Linear)."""
    config = ModelConfig.from_hf_dict(dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, head_dim=32, num_hidden_layers=2, intermediate_size=96,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1],
        tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=256))
    with torch.device("meta"):
        model = CausalLM(config)
    projections = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {name.rsplit(".", 1)[-1] for name in projections} == {"qkv_proj", "o_proj", "gate", "gate_up_proj",
                                                                 "down_proj", "lm_head"}
    # every one is a linear.Linear; the router's subclass (model/experts.py) adds route() and keeps its forward
    assert all(issubclass(t, linear.Linear) for t in projections.values())
    assert {t for t in projections.values() if t is not linear.Linear} == {SoftmaxRouter}
    assert SoftmaxRouter.forward is linear.Linear.forward


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,config", [(1, (4, 512, 1, 1)), (1, (8, 256, 4, 1)), (2, (4, 512, 2, 1)), (1, None)])
def test_cuda_unquantized_gemv_matches_torch_and_repeats_its_bits(dtype, m, config):
    x, w, b, ref = _case(m, 1001, 4099, dtype, "cuda")  # N and K off the tiles
    out = quant.gemv(x, w, None, b, None, config)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.01, rel
    assert torch.equal(out, quant.gemv(x, w, None, b, None, config))


@cuda_only
@pytest.mark.parametrize("config", [(4, 512, 1, 1), (8, 256, 4, 1)])
def test_cuda_linear_routes_one_row_to_the_listed_gemv_inside_a_graph(monkeypatch, config):
    x, w, b, _ = _case(1, 1001, 4099, torch.bfloat16, "cuda")
    monkeypatch.setitem(linear.DENSE_GEMV_CONFIGS, (1001, 4099), config)
    gemv = quant.gemv(x, w, None, b, None, config)
    assert torch.equal(linear.linear(x, w, b), gemv)
    assert torch.equal(linear.linear(x[0], w, b), gemv[0])
    two = torch.cat([x, x])  # two rows, an fp32 row, a shape not listed: cuBLAS
    assert torch.equal(linear.linear(two, w, b), F.linear(two, w, b))
    assert torch.equal(linear.linear(x.float(), w.float()), F.linear(x.float(), w.float()))
    monkeypatch.delitem(linear.DENSE_GEMV_CONFIGS, (1001, 4099))
    assert torch.equal(linear.linear(x, w, b), F.linear(x, w, b))
    # captured (shapes decide the path; nothing allocated by value, no sync) and replayed on new input
    monkeypatch.setitem(linear.DENSE_GEMV_CONFIGS, (1001, 4099), config)
    static_x = x.clone()
    linear.linear(static_x, w, b)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = linear.linear(static_x, w, b)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(static_out, quant.gemv(static_x, w, None, b, None, config))


# A gate_up projection's GEMV applying the MLP's activation in its epilogue (quant.gemv gated=): the bits of
# the projection, then the standalone activation kernel.
def _gate_up_case(m: int, dtype, device: str, fp8: bool):
    from understudy.engine.model.quantization import Quantization

    x, w, b, _ = _case(m, 2 * 36, 200, dtype, device)
    if not fp8:
        return x, w, None, b, None
    w8, scale = quant.quantize(w.float(), "channel")
    return x, w8, scale, b, Quantization("test", "channel", "dynamic", None, "weight_scale")


def _check_gated_gemv(device: str, dtype, m: int, config, fp8: bool, act: str) -> None:
    from understudy.engine.layers import fused

    x, w, scale, b, q = _gate_up_case(m, dtype, device, fp8)
    gate, up = quant.gemv(x, w, scale, b, q, config).chunk(2, dim=-1)
    expected = fused._silu_and_mul_triton(gate, up, gelu=act == "gelu_tanh")
    assert torch.equal(quant.gemv(x, w, scale, b, q, config, gated=act), expected)


# configs: K split (the reduce kernel applies the activation) or not, rows 1 and 3, fp32 and bf16 sums
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m,config,dtype,act", [(1, (4, 64, 1, 1), torch.bfloat16, "silu"),
                                                (1, (2, 64, 3, 1), torch.float32, "gelu_tanh"),
                                                (3, (8, 128, 2, 2), torch.bfloat16, "silu")])
def test_interpreted_gate_up_gemv_applies_the_activation_in_its_epilogue(interpreted, m, config, dtype, act, fp8):
    _check_gated_gemv("cpu", dtype, m, config, fp8, act)


def test_a_gated_gemv_refuses_block_scales_and_odd_rows():
    from understudy.engine.model.quantization import Quantization

    blocks = Quantization("test", "block", "dynamic", (128, 128), "weight_scale_inv")
    assert not quant._can_gate(torch.empty(256, 128), blocks)
    assert not quant._can_gate(torch.empty(7, 128), None) and not quant.gemv_takes_gated(torch.empty(7, 128), None)
    with pytest.raises(ValueError, match="gated GEMV"):
        quant.gemv(torch.randn(1, 128), torch.randn(256, 128).to(torch.float8_e4m3fn), torch.ones(2, 1), None,
                   blocks, (4, 128, 1, 1), gated="silu")
    with pytest.raises(ValueError, match="gated GEMV"):
        quant.gemv(torch.randn(1, 128), torch.randn(7, 128), None, None, None, (4, 128, 1, 1), gated="silu")


@cuda_only
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_cuda_gate_up_gemv_applies_the_activation_in_its_epilogue(monkeypatch, act, fp8):
    from understudy.engine.layers import fused

    monkeypatch.setitem(quant.GATED_EPILOGUE, "fp8", True)  # the layer routes FP8 through it where this says

    for config in [(4, 128, 2, 1), (2, 1024, 1, 4)]:
        _check_gated_gemv("cuda", torch.bfloat16, 1, config, fp8, act)
    # the layers route one row through it (Linear: where DENSE_GEMV_CONFIGS lists the shape), more rows not
    x, w, scale, b, q = _gate_up_case(1, torch.bfloat16, "cuda", fp8)
    if fp8:
        layer = quant.Fp8Linear(200, 72, True, q).cuda()
        layer.weight.data, layer.bias.data = w, b
        setattr(layer, q.scale_name, torch.nn.Parameter(scale, requires_grad=False))
    else:
        monkeypatch.setitem(linear.DENSE_GEMV_CONFIGS, (72, 200), (4, 128, 2, 1))
        layer = linear.Linear(200, 72, bias=True).to("cuda", torch.bfloat16)
        layer.weight.data, layer.bias.data = w, b
    for rows in (x, torch.cat([x, x])):
        assert torch.equal(layer.gated(rows, act), fused.act_and_mul(*layer(rows).chunk(2, dim=-1), act))

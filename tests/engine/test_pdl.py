"""Programmatic dependent launch (layers/pdl.py). CPU tensors (the interpreter's) never ask for it. On a
Hopper GPU, kernels that overlap the one before them must still see its results: a chain of kernels that
each read the previous one's output, and whole models' steps, give the same bits with PDL as without it (a
kernel that read its input before the kernel writing it had ended would not). GPU tests skip elsewhere."""

from __future__ import annotations

import pytest
import torch

from understudy.engine.layers import pdl

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA device with PDL (sm_90 or later)")


@pytest.fixture
def pdl_switch():
    """Set pdl.ENABLED for a test; restored afterwards."""
    before = pdl.ENABLED
    yield lambda on: setattr(pdl, "ENABLED", on)
    pdl.ENABLED = before


def test_cpu_tensors_never_ask_for_pdl(pdl_switch):
    for on in (True, False):
        pdl_switch(on)
        assert pdl.launch_kwargs(torch.device("cpu")) == {"PDL": False}


@needs_hopper
def test_cuda_kernels_ask_for_pdl_only_when_enabled(pdl_switch):
    pdl_switch(True)
    assert pdl.launch_kwargs(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}
    pdl_switch(False)
    assert pdl.launch_kwargs(torch.device("cuda")) == {"PDL": False}


def _chain(x: torch.Tensor, weights: list, norm: torch.Tensor) -> torch.Tensor:
    """Each kernel reads what the one before wrote: norm -> GEMV (bf16, then FP8 with split-K) -> SiLU*mul."""
    from understudy.engine.layers import fused, quant
    from understudy.engine.model.quantization import Quantization

    fp8 = Quantization("online", "channel", "dynamic")
    for w16, (w8, s8) in weights:
        h = fused.rms_norm(x, norm, 1e-6)
        g = quant.gemv(h, w16, None, None, None)  # [1, 2K]
        u = quant.gemv(g[:, :x.shape[1]] * 0.5, w8, s8, None, fp8)  # [1, 2K]
        x = fused.silu_and_mul(u[:, :x.shape[1]], u[:, x.shape[1]:]) + x
    return x


@needs_hopper
def test_a_chain_of_dependent_kernels_gives_the_same_bits_with_pdl(pdl_switch):
    from understudy.engine.layers import quant

    torch.manual_seed(0)
    K = 1024
    weights = []
    for _ in range(12):
        w16 = (torch.randn(2 * K, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
        w8, s8 = quant.quantize(torch.randn(2 * K, K, device="cuda") * K ** -0.5, "channel")
        weights.append((w16, (w8, s8)))
    norm = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    pdl_switch(False)
    expected = _chain(x, weights, norm)
    pdl_switch(True)
    assert torch.equal(_chain(x, weights, norm), expected)  # eager launches
    _chain(x, weights, norm)  # compiled before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = _chain(x, weights, norm)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(20):  # replays: the kernels' overlap differs from run to run, the bits must not
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


def _run_engine(path, prompts, *, graphs: bool) -> list:
    """(token, logprob, top logprobs) of every step of greedy requests on a bf16 engine with the Triton
    attention, CUDA graphs (decode and mixed steps) when `graphs`."""
    from understudy.engine.core.kv_cache import KVCache, KVSpec
    from understudy.engine.core.llm_engine import EngineLimits, LLMEngine
    from understudy.engine.core.sampling import SamplingParams
    from understudy.engine.layers.triton_attention import attention_for
    from understudy.engine.model.loader import load_model

    model = load_model(path, dtype=torch.bfloat16, device="cuda", attention_fn=attention_for("triton"))
    spec = KVSpec.for_budget(model.config, 16 << 20, 16, torch.bfloat16)
    engine = LLMEngine(model, KVCache.local(spec, "cuda"), limits=EngineLimits(max_num_seqs=8, max_model_len=256),
                       device="cuda")
    if graphs:
        engine.enable_cuda_graphs(mixed_steps=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2))
    seen = []
    while engine.has_work:
        for o in engine.step():
            lp = o.logprobs[0]
            seen.append((o.request_id, o.new_token_ids[0], lp.logprob, lp.top))
    return sorted(seen)


@needs_hopper
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_models_give_the_same_bits_with_pdl(family, graphs, hf_model_dir, tmp_path, pdl_switch):
    if family == "qwen3_moe":
        from tests.engine.test_moe import build_hf_moe

        build_hf_moe(family).save_pretrained(tmp_path, safe_serialization=True)
        path = tmp_path
    else:
        _, path = hf_model_dir(family)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (1, 7, 30, 64)]
    pdl_switch(False)
    expected = _run_engine(path, prompts, graphs=graphs)
    pdl_switch(True)
    assert _run_engine(path, prompts, graphs=graphs) == expected

"""The CUDA graphs' step layout (core/cuda_graphs.py) checked on the CPU: each bucket's static inputs and
padding, run through the Triton kernels in Triton's interpreter instead of replayed, give the tokens of
eager steps. (The replay itself is checked on a GPU: tests/engine/test_cuda_paths.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.interpreter import INTERPRETING, run_interpreted_tests


def test_step_graphs_in_the_interpreter():
    run_interpreted_tests(__file__, timeout=900)


@pytest.fixture
def interpreted(monkeypatch):
    """fused's and the attention's Triton kernels on CPU tensors, interpreted (the decode kernel too: the
    interpreter child takes loaded loop bounds, tests/helpers/interpreter.py)."""
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_step_graphs_in_the_interpreter")
    from understudy.engine.layers import fused

    monkeypatch.setattr(fused, "_use_triton", lambda x: True)


def _engine(model, graphs: bool, max_num_seqs: int = 4):
    from understudy.engine.core.cuda_graphs import StepGraphs
    from understudy.engine.core.kv_cache import KVCache, KVSpec
    from understudy.engine.core.llm_engine import EngineLimits, LLMEngine

    class Interpreted(StepGraphs):
        """The buckets' inputs and padding as the graphs see them, run instead of replayed."""

        def capture(self):
            self.graphs = {b: None for b in self.decode_buckets + self.mixed_buckets}

        def _replay(self, b):
            self.outputs[b] = self._forward(b)

    spec = KVSpec.for_budget(model.config, 1 << 20, 4, torch.float32)
    engine = LLMEngine(model, KVCache.local(spec, "cpu"), limits=EngineLimits(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=24, max_model_len=64))
    if graphs:
        engine.graphs = Interpreted(model, engine.kv.layers, **engine.graph_shape(True), device=engine.device)
        engine.graphs.capture()
        engine.replayed = []
        run = engine.graphs.run
        engine.graphs.run = lambda *a, **k: (engine.replayed.append(engine.graphs.bucket(a[1])), run(*a, **k))[1]
    return engine


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_interpreted_graph_buckets_give_the_eager_tokens(interpreted, hf_model_dir, family):
    from understudy.engine.core.sampling import SamplingParams
    from understudy.engine.layers.triton_attention import attention_for
    from understudy.engine.model.loader import load_model

    _, path = hf_model_dir(family)
    model = load_model(path, dtype=torch.float32)
    for layer in model.model.layers:
        layer.self_attn.attention_fn = attention_for("triton")
    # prompts that share a prefix (cache hits), a long one that is chunked (24 tokens a step), short ones
    base = [5, 9, 13, 2, 7, 7, 30, 41]
    prompts = [base + [3], base + [4, 8], list(range(1, 40)), [11], [12, 13, 14]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = _engine(model, graphs=False).generate(prompts, params)
    engine = _engine(model, graphs=True)
    assert engine.generate(prompts, params) == want
    kinds = {(b.decode, b.tokens) for b in engine.replayed if b is not None}
    assert any(decode for decode, _ in kinds) and any(not decode for decode, _ in kinds), kinds
    # every step fit a bucket: the largest mixed one takes max_num_batched_tokens
    assert engine.graphs.mixed_buckets[-1].tokens == 24 and len(engine.replayed) == engine.steps

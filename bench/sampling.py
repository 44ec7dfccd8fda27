"""The sampler's time per step, next to the old per-row-loop sampler measured in the same run.

Logits [B, V] (random, float32 from bf16 on CUDA as a model gives them), every row non-greedy; the time of
one sample() call including the copy of the sampled ids to the host (what a step waits for). Modes:
  plain      temperature 0.8
  penalties  temperature 0.8, top_k 50, top_p 0.95, min_p 0.05, presence / frequency / repetition penalties,
             a logit_bias of 4 tokens, min_tokens; prompts of --prompt tokens, --output tokens generated so far
  logprobs   temperature 0.8, logprobs 5 (the sampled token's logprob and rank, the top 5)
Baseline: the sampler this one replaced (one torch.multinomial per row, a torch.Generator per seeded
request), copied below; it has no penalties and no logprobs, so it runs its temperature + top_k + top_p
for every mode.

    python bench/sampling.py                           # CUDA if there is one; vocab 128256 (Llama 3)
    python bench/sampling.py --device cpu --vocab 49152 --batches 1 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from understudy.common.params import SamplingParams  # noqa: E402
from understudy.engine.core.sampling import sample  # noqa: E402
from understudy.engine.core.sequence import Sequence  # noqa: E402


# -- the baseline: the old sampler, as it was ------------------------------------------------------------------

def old_sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One next token per row of logits [B, V]."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        probs = _old_filtered_probs(logits[idx], [params[i] for i in rows])
        for j, i in enumerate(rows):
            out[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return out.tolist()


def _old_filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    logits = logits / temperature
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits.softmax(dim=-1)


# -- the measurement ---------------------------------------------------------------------------------------------

MODES = {
    "plain": dict(temperature=0.8),
    "penalties": dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05, presence_penalty=0.5,
                      frequency_penalty=0.5, repetition_penalty=1.1, logit_bias=((11, 2.0), (12, -2.0), (13, 5.0),
                                                                                 (14, -100.0)), min_tokens=1000),
    "logprobs": dict(temperature=0.8, logprobs=5),
}


def per_step_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary size (128256: Llama 3)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens of each request (the penalties read them)")
    ap.add_argument("--output", type=int, default=128, help="tokens each request generated so far")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, vocab {args.vocab}, prompts {args.prompt} + {args.output} output tokens; ms per step "
          f"(ids on the host); old = the per-row-loop sampler (temperature / top_k / top_p only)")
    print(f"{'batch':>6} {'mode':>10} {'new ms':>9} {'old ms':>9} {'old/new':>8}")
    gen = torch.Generator().manual_seed(0)
    for batch in args.batches:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        logits = torch.randn(batch, args.vocab, generator=gen).mul_(3).to(device, dtype)
        for mode, fields in MODES.items():
            seqs = []
            for i in range(batch):
                s = Sequence(f"r{i}", torch.randint(0, args.vocab, (args.prompt,), generator=gen).tolist(),
                             SamplingParams(seed=i, **fields), seed=i)
                s.output = torch.randint(0, args.vocab, (args.output,), generator=gen).tolist()
                seqs.append(s)

            def new():
                out = sample(logits, seqs, eos_token_ids=(2,))
                out.token_ids.tolist()
                if out.logprobs is not None:
                    [t.tolist() for t in out.logprobs.tensors()]

            old_params = [SamplingParams(**{k: v for k, v in fields.items() if k in ("temperature", "top_k", "top_p")})
                          for _ in seqs]
            generators = [torch.Generator(device).manual_seed(i) for i in range(batch)]
            new_ms = per_step_ms(new, device, args.repeats)
            old_ms = per_step_ms(lambda: old_sample(logits, old_params, generators), device, args.repeats)
            print(f"{batch:>6} {mode:>10} {new_ms:>9.3f} {old_ms:>9.3f} {old_ms / new_ms:>7.1f}x", flush=True)


if __name__ == "__main__":
    main()

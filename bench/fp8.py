"""FP8 decode speed: a Llama-3-8B-shaped model with random weights, bf16 vs FP8 weights + FP8 KV, same run.

Both engines are built as `understudy serve` builds them (a memory service of their own, weights published
into it, CUDA graphs, warm-up) from the same bf16 checkpoint: the second with `--quantization fp8
--kv-cache-dtype fp8`, so its weights are quantized (per channel) as they are published. Prints decode
tokens/s per batch size for both, their ratio (goal: >= 1.7x at batch 1) and the roofline: the bytes one
decode step must read (every weight but the embedding table, which is only indexed) x steps/s over the
device's memory bandwidth (measured by a device copy).

    PYTHONPATH=src python bench/fp8.py                      # Llama-3-8B shape, batches 1 8 32
    PYTHONPATH=src python bench/fp8.py --layers 4 --tokens 32   # a quick smoke run on a GPU
    PYTHONPATH=src python bench/fp8.py --cpu                # a tiny model on the CPU (checks the wiring only)
    PYTHONPATH=src python bench/fp8.py --gemm               # the FP8 GEMM alone per Llama-3-8B matrix and tile config
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine import bandwidths, cached_checkpoint

GiB = 1 << 30
MODES = {"bf16": dict(quantization="none", kv_cache_dtype="auto"),
         "fp8": dict(quantization="fp8", kv_cache_dtype="fp8")}
# --scaled-mm-everywhere: a third run with every FP8 matmul on torch._scaled_mm (quant.SMALL_M = 0)
SCALED_MM = dict(quantization="fp8", kv_cache_dtype="fp8")


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def decode_rate(engine, batch: int, prompt_len: int, tokens: int, vocab: int, cuda: bool) -> float:
    """Decode tokens/s: steps after every sequence has its first token, tokens counted per step."""
    from understudy.engine.core.sampling import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    for r in range(batch):
        engine.add_request(f"b{batch}-{r}-{time.monotonic_ns()}",
                           torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(),
                           SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    decode_s, decoded = 0.0, 0
    while engine.has_work:
        prefill = any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting
        _sync(cuda)
        t0 = time.perf_counter()
        outs = engine.step()
        _sync(cuda)
        if not prefill:
            decode_s += time.perf_counter() - t0
            decoded += sum(len(o.new_token_ids) for o in outs)
    return decoded / decode_s


def step_bytes(model) -> int:
    """Bytes one decode step reads: every parameter except the embedding table (unless lm_head is tied)."""
    tied = model.lm_head is None
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if tied or n != "model.embed_tokens.weight")


def run_mode(mode: str, ckpt: Path, args, cuda: bool) -> dict:
    from understudy.engine.launch import build_engine
    from understudy.engine.layers import quant

    small_m = quant.SMALL_M
    if mode == "fp8-scaled_mm":
        quant.SMALL_M = 0
    try:
        return _run_mode(mode, ckpt, args, cuda, build_engine)
    finally:
        quant.SMALL_M = small_m


def _run_mode(mode: str, ckpt: Path, args, cuda: bool, build_engine) -> dict:
    from understudy.engine.serve_config import (
        DeviceOptions,
        KVOptions,
        ModelOptions,
        OutputOptions,
        ServeConfig,
    )

    config = ServeConfig(
        model=ModelOptions(model=str(ckpt), dtype="bfloat16" if cuda else "float32", prefill_attention="reference",
                           max_model_len=args.prompt_len + args.tokens + 16,
                           quantization={**MODES, "fp8-scaled_mm": SCALED_MM}[mode]["quantization"]),
        device=DeviceOptions(backend="cuda" if cuda else "host", socket_dir=tempfile.mkdtemp(prefix="us-", dir="/tmp")),
        kv=KVOptions(kv_cache_memory=(8 * GiB) if cuda else (64 << 20), block_size=16,
                     max_num_seqs=max(args.batches), max_num_batched_tokens=8192,
                     kv_cache_dtype={**MODES, "fp8-scaled_mm": SCALED_MM}[mode]["kv_cache_dtype"]),
        output=OutputOptions(no_progress=True))
    t0 = time.perf_counter()
    built = build_engine(config)
    try:
        engine = built.engine
        out = {"build_s": round(time.perf_counter() - t0, 1), "publish_s": built.weights_stats["seconds"],
               "step_bytes": step_bytes(engine.model), "kv_dtype": engine.kv.spec.dtype,
               "kv_tokens": engine.kv.spec.num_blocks * engine.kv.spec.block_size, "tok_s": {}}
        print(f"# {mode}: engine built in {out['build_s']}s (publish {out['publish_s']}s), "
              f"{out['step_bytes'] / 1e9:.2f} GB read per decode step, KV {out['kv_dtype']} "
              f"({out['kv_tokens']} tokens)", flush=True)
        vocab = engine.model.config.vocab_size
        for b in args.batches:
            out["tok_s"][b] = decode_rate(engine, b, args.prompt_len, args.tokens, vocab, cuda)
            print(f"{mode} batch {b:>4}: {out['tok_s'][b]:>9.1f} tok/s", flush=True)
    finally:
        built.close()
    del engine, built
    if cuda:
        torch.cuda.empty_cache()
    return out


GEMM_CONFIGS = [None, (16, 16, 256, 4, 4), (16, 32, 512, 4, 4), (16, 16, 1024, 8, 3), (16, 32, 256, 4, 5),
                (16, 64, 128, 4, 3), (16, 16, 512, 8, 4)]


def gemm_sweep(hbm: float) -> None:
    """Each Llama-3-8B projection at 1, 8 and 32 rows: bf16 F.linear against the FP8 GEMM (its default tile
    config first, then others), as GB/s of weight bytes and the fraction of the copy bandwidth."""
    from triton.testing import do_bench_cudagraph

    from understudy.engine.layers import quant
    from understudy.engine.model.quantization import ONLINE_FP8

    for n, k, what in ((4096, 4096, "q/o"), (1024, 4096, "k/v"), (14336, 4096, "gate/up"), (4096, 14336, "down")):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w8, scale = quant.quantize(w, "channel")
        for m in (1, 8, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf = do_bench_cudagraph(lambda: torch.nn.functional.linear(x, w)) * 1e-3
            times = {}
            for cfg in GEMM_CONFIGS if m == 1 else [None]:
                times[cfg] = do_bench_cudagraph(lambda: quant.fp8_linear(x, w8, scale, None, ONLINE_FP8, cfg)) * 1e-3
            best = min(times, key=times.get)
            lin = quant.Fp8Linear(k, n, False, ONLINE_FP8).cuda()
            lin.weight.data, lin.weight_scale.data = w8, scale
            t_mm = do_bench_cudagraph(lambda: lin._scaled_mm(x, None)) * 1e-3
            print(f"{what:>8} {n}x{k} m={m:>2}: bf16 {w.numel() * 2 / t_bf / 1e9:6.0f} GB/s ({t_bf * 1e6:6.1f} us); "
                  f"fp8 default {w8.numel() / times[None] / 1e9:6.0f} GB/s ({times[None] * 1e6:6.1f} us, "
                  f"{w8.numel() / times[None] / 1e9 / (hbm / 2):.0%} of read bw)"
                  + (f"; best {best} {w8.numel() / times[best] / 1e9:.0f} GB/s" if m == 1 else "")
                  + f"; _scaled_mm + row quant {w8.numel() / t_mm / 1e9:.0f} GB/s ({t_mm * 1e6:.1f} us)", flush=True)


def tiny_checkpoint(work: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.tiny_model import make_tiny_llama

    return make_tiny_llama(work / "tiny", hidden_size=128, intermediate_size=384, num_attention_heads=4,
                           num_key_value_heads=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8 32 (--cpu: 1 4)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens generated per request (default 128; --cpu 8)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--cpu", action="store_true", help="a tiny random model on the CPU: checks the wiring only")
    ap.add_argument("--workdir", default=None, help="where the checkpoint is written (reused between runs)")
    ap.add_argument("--gemm", action="store_true", help="time the FP8 GEMM alone (GPU), then the engines")
    ap.add_argument("--gemm-only", action="store_true", help="time the FP8 GEMM alone and stop")
    ap.add_argument("--scaled-mm-everywhere", action="store_true",
                    help="a third engine whose FP8 matmuls all take torch._scaled_mm (decode too)")
    args = ap.parse_args()
    cuda = not args.cpu
    args.batches = args.batches or ([1, 8, 32] if cuda else [1, 4])
    args.tokens = args.tokens or (128 if cuda else 8)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="us-bench-fp8-"))
    work.mkdir(parents=True, exist_ok=True)
    if cuda:
        _, hbm = bandwidths()
        print(f"# device memory {hbm:.0f} GB/s (copy, read+write)", flush=True)
        if args.gemm or args.gemm_only:
            gemm_sweep(hbm)
            if args.gemm_only:
                return
        ckpt = cached_checkpoint(work, args.layers)
    else:
        ckpt, hbm = tiny_checkpoint(work), float("nan")
    results = {mode: run_mode(mode, ckpt, args, cuda) for mode in MODES}
    if args.scaled_mm_everywhere:
        other = run_mode("fp8-scaled_mm", ckpt, args, cuda)
        print("fp8 with torch._scaled_mm at every size: " + ", ".join(
            f"batch {b} {other['tok_s'][b]:.1f} tok/s ({other['tok_s'][b] / results['bf16']['tok_s'][b]:.2f}x bf16)"
            for b in args.batches))
    print()
    print(f"{'batch':>6} {'bf16 tok/s':>11} {'fp8 tok/s':>10} {'ratio':>6}   roofline bf16 / fp8")
    for b in args.batches:
        bf, f8 = results["bf16"]["tok_s"][b], results["fp8"]["tok_s"][b]
        # a decode step reads the weights once whatever the batch: steps/s = tok/s / b
        roof = [results[m]["step_bytes"] * results[m]["tok_s"][b] / b / (hbm * 1e9) for m in MODES]
        print(f"{b:>6} {bf:>11.1f} {f8:>10.1f} {f8 / bf:>5.2f}x   {roof[0]:>5.0%} / {roof[1]:.0%}")
    b1 = args.batches[0]
    print(f"fp8 / bf16 at batch {b1}: {results['fp8']['tok_s'][b1] / results['bf16']['tok_s'][b1]:.2f}x (goal >= 1.7x); "
          f"bytes per step {results['bf16']['step_bytes'] / 1e9:.2f} GB (bf16) vs "
          f"{results['fp8']['step_bytes'] / 1e9:.2f} GB (fp8 weights; lm_head stays bf16)")
    print("json", json.dumps({"results": results, "hbm_GBps": hbm}))


if __name__ == "__main__":
    main()

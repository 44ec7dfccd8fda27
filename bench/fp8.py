"""FP8 decode speed: a Llama-3-8B-shaped model with random weights, bf16 vs FP8 weights + FP8 KV, same run.

Both engines are built as `understudy serve` builds them (a memory service of their own, weights published
into it, CUDA graphs, warm-up) from the same bf16 checkpoint: the second with `--quantization fp8
--kv-cache-dtype fp8`, so its weights are quantized (per channel) as they are published. Prints decode
tokens/s per batch size for both (the median decode step's, as bench/engine.py), their ratio (goal: >= 1.7x at batch 1) and the roofline: the bytes one
decode step must read (every weight but the embedding table, which is only indexed) x steps/s over the
device's memory bandwidth (measured by a device copy).

    PYTHONPATH=src python bench/fp8.py                      # Llama-3-8B shape, batches 1 8 32
    PYTHONPATH=src python bench/fp8.py --layers 4 --tokens 32   # a quick smoke run on a GPU
    PYTHONPATH=src python bench/fp8.py --cpu                # a tiny model on the CPU (checks the wiring only)
    PYTHONPATH=src python bench/fp8.py --gemm-only          # the FP8 GEMV alone: per matrix, rows and tile config
    PYTHONPATH=src python bench/fp8.py --gemm-only --gemm-dtype bf16   # the bf16 GEMV vs cuBLAS (layers/linear.py)
    PYTHONPATH=src python bench/fp8.py --gemm --batches 1 8 --tokens 64   # that sweep, then the engines
    PYTHONPATH=src python bench/fp8.py --batches 1 --tokens 64 --gated-ab   # gated gate_up epilogue on/off
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
from common import (decode_steps, device_sync, fmt_steps, profile_engine, recapture_graphs,  # noqa: E402
                    without_pdl)
from engine import bandwidths, cached_checkpoint

GiB = 1 << 30
MODES = {"bf16": dict(quantization="none", kv_cache_dtype="auto"),
         "fp8": dict(quantization="fp8", kv_cache_dtype="fp8")}
# --scaled-mm-everywhere: a third run with every FP8 matmul on torch._scaled_mm (quant.GEMV_MAX_M = 0)
SCALED_MM = dict(quantization="fp8", kv_cache_dtype="fp8")


def step_bytes(model) -> int:
    """Bytes one decode step reads: every parameter except the embedding table (unless lm_head is tied)."""
    tied = model.lm_head is None
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if tied or n != "model.embed_tokens.weight")


def run_mode(mode: str, ckpt: Path, args, cuda: bool) -> dict:
    from understudy.engine.launch import build_engine
    from understudy.engine.layers import quant

    gemv_max_m = quant.GEMV_MAX_M
    if mode == "fp8-scaled_mm":
        quant.GEMV_MAX_M = 0
    try:
        return _run_mode(mode, ckpt, args, cuda, build_engine)
    finally:
        quant.GEMV_MAX_M = gemv_max_m


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
            steps = decode_steps(engine, b, args.prompt_len, args.tokens, vocab, device_sync(engine.device))
            out["tok_s"][b] = steps["tok_s"]  # the median step's: one slow step would skew a mean
            print(f"{mode} batch {b:>4}: {fmt_steps(steps)}", flush=True)
        if cuda:  # the first batch with no PDL (layers/pdl.py), same run
            steps = without_pdl(engine, lambda e: decode_steps(e, args.batches[0], args.prompt_len, args.tokens,
                                                               vocab, device_sync(e.device)))
            out["tok_s_no_pdl"] = steps["tok_s"]
            print(f"{mode} batch {args.batches[0]:>4}, without PDL: {fmt_steps(steps)}", flush=True)
        if args.gated_ab and cuda:
            ab = gated_epilogue_ab(engine, "unquantized" if mode == "bf16" else "fp8", lambda e: decode_steps(
                e, args.batches[0], args.prompt_len, args.tokens, vocab, device_sync(e.device))["tok_s"])
            out["gated_ab"] = ab
            print(f"{mode} batch {args.batches[0]:>4}: gate_up GEMV's gated epilogue on "
                  + " ".join(f"{t:.1f}" for t in ab["on"]) + " | off " + " ".join(f"{t:.1f}" for t in ab["off"])
                  + " tok/s (alternating)", flush=True)
        if args.profile and cuda:
            profile_engine(engine, mode, batch=args.batches[0], prompt_len=args.prompt_len, vocab=vocab)
    finally:
        built.close()
    del engine, built
    if cuda:
        torch.cuda.empty_cache()
    return out


def gated_epilogue_ab(engine, kind: str, measure, rounds: int = 3) -> dict[str, list[float]]:
    """measure(engine) (tok/s) with the gate_up GEMV's gated epilogue on and off for this kind of weights
    (quant.GATED_EPILOGUE: "unquantized" or "fp8"), alternating `rounds` times, the engine's CUDA graphs
    captured anew each time; the setting is restored after."""
    from understudy.engine.layers import quant

    kept = quant.GATED_EPILOGUE[kind]
    out = {"on": [], "off": []}
    try:
        for _ in range(rounds):
            for label in out:
                quant.GATED_EPILOGUE[kind] = label == "on"
                recapture_graphs(engine)
                out[label].append(measure(engine))
    finally:
        quant.GATED_EPILOGUE[kind] = kept
        recapture_graphs(engine)
    return out


# The Llama-3-8B matrices a decode step multiplies (q/k/v and gate/up fused, as the engine serves them)
GEMV_SHAPES = ((6144, 4096, "qkv"), (4096, 4096, "o"), (28672, 4096, "gate_up"), (4096, 14336, "down"))
# (BLOCK_N, BLOCK_K, num_warps) the sweep tries, each with SPLIT_K 1, 2, 4, 8 where that splits K differently
# (per thread: BLOCK_N x BLOCK_K / (32 x warps) weights; past ~64 the rows > 1 variants spill registers)
GEMV_TILES = ((4, 256, 1), (8, 256, 1), (4, 512, 1), (8, 512, 1), (16, 512, 1), (16, 256, 2), (16, 512, 4),
              (16, 1024, 4))
ROTATE_BYTES = 256 << 20  # weights cycled through per timing: 5x the H200's 50 MB L2, so reads come from HBM
# --gemm-dtype bf16/fp16: the unquantized one-row projections of layers/linear.py, Llama-3-8B's and
# Qwen3-30B-A3B's (hidden 2048, 32 q heads and 4 kv heads of 128; the MoE router: 128 experts)
DENSE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DENSE_SHAPES = GEMV_SHAPES + ((128256, 4096, "lm_head"), (5120, 2048, "moe qkv"), (2048, 4096, "moe o"),
                              (128, 2048, "moe router"), (151936, 2048, "moe lm_head"))
# the small matrices are latency: also few rows per program and all of K in one or two tiles (more warps)
DENSE_TILES = GEMV_TILES + ((2, 512, 1), (2, 1024, 2), (2, 2048, 4), (4, 1024, 4))
MIN_SPEEDUP = 1.03  # a one-row shape joins linear.DENSE_GEMV_CONFIGS when the GEMV is this much faster
# One FP8 row: wider tiles too, 32-128 weight bytes per thread (docs/logs/bench_fp8_h200_gemv_round8.log:
# they won on every shape; that run also measured 16-byte loads and widening e4m3 by integer ops, both slower)
FP8_ROW_TILES = tuple((bn, bk, w) for bn in (2, 4, 8, 16) for bk in (512, 1024, 2048, 4096) for w in (1, 2, 4, 8)
                      if 32 <= bn * bk // (32 * w) <= 128 and bk // (32 * w) >= 8)


def gemv_candidates(n: int, k: int, m: int, tiles=GEMV_TILES, splits=(1, 2, 4, 8)) -> list[tuple[int, ...]]:
    """The GEMV configs swept for one shape: quant.gemv_config's default first, then tiles x SPLIT_K,
    leaving out splits that give the same split as a smaller one and grids of under one program per SM
    (per two rows for a matrix of fewer than 264)."""
    import triton

    from understudy.engine.layers import quant

    out = [quant.gemv_config(n, k, m)]
    for bn, bk, warps in tiles:
        for split in splits:
            k_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
            if triton.cdiv(k, k_split) != split or triton.cdiv(n, bn) * split < min(132, n // 2):
                continue
            if (bn, bk, split, warps) not in out:
                out.append((bn, bk, split, warps))
    return out


def fp8_candidates(n: int, k: int, m: int) -> list[tuple[int, int, int, int]]:
    """The FP8 sweep's configs: gemv_candidates', and for one row FP8_ROW_TILES' too."""
    out = gemv_candidates(n, k, m)
    if m == 1:
        out += [c for c in gemv_candidates(n, k, m, FP8_ROW_TILES, splits=(1, 2)) if c not in out]
    return out


def _warm_gemv(tasks: list) -> None:
    """Run each (n, k, m, scheme, config) GEMV once: a worker process of precompile (fills Triton's disk cache)."""
    from understudy.engine.layers import quant
    from understudy.engine.model.quantization import Quantization

    for n, k, m, scheme, cfg in tasks:
        if scheme in DENSE_DTYPES:  # unquantized weights: no scales (what runs is compiled, not the values)
            dtype = DENSE_DTYPES[scheme]
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            quant.gemv(x, torch.empty(n, k, device="cuda", dtype=dtype), None, None, None, cfg)
            continue
        block = (128, 128) if scheme == "block" else None
        w8, scale = quant.quantize(torch.randn(n, k, device="cuda"), scheme, block)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        quant.gemv(x, w8, scale, None, Quantization("fp8", scheme, "dynamic", block, "weight_scale"), cfg)
    torch.cuda.synchronize()


def precompile(tasks: list, workers: int) -> None:
    """Compile every GEMV variant the sweep times in `workers` processes at once (each config is its own
    kernel: compiling ~500 of them one after another would take most of the run); the timing loop then
    finds them in Triton's disk cache."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = [tasks[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_warm_gemv, [c for c in chunks if c]))


def graph_seconds(calls: list, launches: int = 240) -> float:
    """Seconds per call: `calls` (one per weight copy) run round-robin `launches` times inside one CUDA graph,
    so neither launch overhead nor the L2 (the copies together exceed it) flatters the kernel."""
    for c in calls:  # compile (or load from the cache) and allocate outside the capture
        c()
    torch.cuda.synchronize()
    launches = max(launches // len(calls), 1) * len(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            calls[i % len(calls)]()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / launches)
    del graph
    return sorted(times)[2]


def gemm_sweep(hbm: float, scheme: str, rows: list[int], workers: int) -> None:
    """Each Llama-3-8B matrix at each row count: cuBLAS bf16 F.linear, torch._scaled_mm (+ per-token
    activation quantization), the tl.dot Triton GEMM, the GEMV with its default config and with every
    candidate (gemv_candidates), as GB/s of weight bytes read; then the best GEMV config per shape as the
    quant.GEMV_CONFIGS dict to paste, and the largest row count where the GEMV beats both other FP8 paths."""
    import math

    import torch.nn.functional as F

    from understudy.engine.layers import quant
    from understudy.engine.model.quantization import Quantization

    block = (128, 128) if scheme == "block" else None
    q = Quantization("fp8", scheme, "dynamic", block, "weight_scale")
    tasks = [(n, k, m, scheme, cfg) for n, k, _ in GEMV_SHAPES for m in rows for cfg in fp8_candidates(n, k, m)]
    t0 = time.perf_counter()
    precompile(tasks, workers)
    print(f"# {len(tasks)} GEMV variants compiled in {time.perf_counter() - t0:.0f}s ({workers} processes); "
          f"{scheme} scales; GB/s = weight bytes / time, read bandwidth of the copy = {hbm / 2:.0f} GB/s", flush=True)
    best_cfgs, gemv_wins = {}, {m: True for m in rows}
    for n, k, what in GEMV_SHAPES:
        copies_8 = max(2, math.ceil(ROTATE_BYTES / (n * k)))
        copies_16 = max(2, math.ceil(ROTATE_BYTES / (2 * n * k)))
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies_16)]
        layers = []
        for i in range(copies_8):
            w8, scale = quant.quantize(w16[i % copies_16], scheme, block)
            lin = quant.Fp8Linear(k, n, False, q).cuda()
            lin.weight.data = w8
            setattr(lin, q.scale_name, torch.nn.Parameter(scale, requires_grad=False))
            layers.append(lin)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf = graph_seconds([lambda w=w: F.linear(x, w) for w in w16])
            t_dot = graph_seconds([lambda c=c: quant.fp8_linear(x, c.weight, c.scales, None, q) for c in layers])
            t_mm = graph_seconds([lambda c=c: c._scaled_mm(x, None) for c in layers]) if scheme != "block" else math.inf
            times = {cfg: graph_seconds([lambda c=c, cfg=cfg: quant.gemv(x, c.weight, c.scales, None, q, cfg)
                                         for c in layers])
                     for cfg in fp8_candidates(n, k, m)}
            default = quant.gemv_config(n, k, m)
            ranked = sorted(times, key=times.get)
            best = ranked[0]
            best_cfgs[n, k, m] = best, n * k / times[best] / 1e9
            gemv_wins[m] &= times[best] < min(t_mm, t_dot)

            def rate(t, nbytes=n * k):
                return f"{nbytes / t / 1e9:5.0f} GB/s {t * 1e6:6.1f} us"

            print(f"{what:>8} {n}x{k} m={m}: bf16 {rate(t_bf, 2 * n * k)} | _scaled_mm "
                  + (rate(t_mm) if t_mm < math.inf else "-") + f" | tl.dot GEMM {rate(t_dot)} | GEMV default "
                  f"{default} {rate(times[default])} | best {best} {rate(times[best])} "
                  f"({n * k / times[best] / 1e9 / (hbm / 2):.0%} of read bw, {t_bf / times[best]:.2f}x bf16's speed)"
                  "; next: " + ", ".join(f"{c} {n * k / times[c] / 1e9:.0f}" for c in ranked[1:4]), flush=True)
        del w16, layers
        torch.cuda.empty_cache()
    print("# paste into src/understudy/engine/layers/quant.py (best per shape, this run):")
    print("GEMV_CONFIGS: dict[tuple[int, int, int], tuple[int, int, int, int]] = {")
    for (n, k, m), (cfg, gbs) in best_cfgs.items():
        print(f"    ({n}, {k}, {m}): {cfg},  # {gbs:.0f} GB/s")
    print("}")
    wins = [m for m in rows if gemv_wins[m]]
    print(f"# GEMV faster than _scaled_mm and the tl.dot GEMM on every shape at rows {wins} "
          f"(quant.GEMV_MAX_M = {max(wins, default=0)}{'' if wins == rows[:len(wins)] else ', not contiguous: check'})")
    return {key: cfg for key, (cfg, _) in best_cfgs.items()}


def dense_sweep(hbm: float, name: str, rows: list[int], workers: int) -> None:
    """Each DENSE_SHAPES matrix in bf16/fp16 at each row count: cuBLAS (F.linear) and the GEMV with no scales
    (quant.gemv, every gemv_candidates config of DENSE_TILES), in the same run; then the one-row table of
    layers/linear.py to paste: each shape's best config, commented out where it is not MIN_SPEEDUP x faster
    than cuBLAS (linear.py routes only one row to the GEMV: other rows are printed for the record)."""
    import math

    import torch.nn.functional as F

    from understudy.engine.layers import quant

    dtype = DENSE_DTYPES[name]
    tasks = [(n, k, m, name, cfg) for n, k, _ in DENSE_SHAPES for m in rows
             for cfg in gemv_candidates(n, k, m, DENSE_TILES)]
    t0 = time.perf_counter()
    precompile(tasks, workers)
    print(f"# {len(tasks)} GEMV variants compiled in {time.perf_counter() - t0:.0f}s ({workers} processes); {name} "
          f"weights, no scales; TB/s = weight bytes / time (the device copy: {hbm / 1e3:.2f} TB/s read+write)",
          flush=True)
    table = []
    for n, k, what in DENSE_SHAPES:
        nbytes = 2 * n * k
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
                   for _ in range(max(2, math.ceil(ROTATE_BYTES / nbytes)))]
        launches = 240 if nbytes < ROTATE_BYTES else 48  # an lm_head reads 0.6-1 GB a call

        def rate(t):
            return f"{t * 1e6:6.1f} us {nbytes / t / 1e12:4.2f} TB/s"

        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            t_cublas = graph_seconds([lambda w=w: F.linear(x, w) for w in weights], launches)
            times = {cfg: graph_seconds([lambda w=w, cfg=cfg: quant.gemv(x, w, None, None, None, cfg)
                                         for w in weights], launches)
                     for cfg in gemv_candidates(n, k, m, DENSE_TILES)}
            ranked = sorted(times, key=times.get)
            best = ranked[0]
            speedup = t_cublas / times[best]
            print(f"{what:>12} {n}x{k} m={m}: cuBLAS {rate(t_cublas)} | GEMV best {best} {rate(times[best])} "
                  f"= {speedup:.2f}x cuBLAS's speed; next: "
                  + ", ".join(f"{c} {times[c] * 1e6:.1f} us" for c in ranked[1:4]), flush=True)
            if m == 1:
                table.append(("" if speedup >= MIN_SPEEDUP else "# ") + f"({n}, {k}): {best},  # {what}: "
                             f"{times[best] * 1e6:.1f} us {nbytes / times[best] / 1e12:.2f} TB/s, cuBLAS "
                             f"{t_cublas * 1e6:.1f} us {nbytes / t_cublas / 1e12:.2f} TB/s: {speedup:.2f}x")
        del weights
        torch.cuda.empty_cache()
    print(f"# paste into src/understudy/engine/layers/linear.py (python bench/fp8.py --gemm-only --gemm-dtype {name}, "
          f"this run; one row; commented out: under {MIN_SPEEDUP}x cuBLAS's speed, cuBLAS stays):")
    print("DENSE_GEMV_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {")
    for line in table:
        print(f"    {line}")
    print("}")


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
    ap.add_argument("--profile", action="store_true",
                    help="GPU: also print where a decode step's time goes at the first batch, per mode "
                         "(torch.profiler: wall, kernels, the gap, the top kernels)")
    ap.add_argument("--workdir", default=None, help="where the checkpoint is written (reused between runs)")
    ap.add_argument("--gemm", action="store_true",
                    help="sweep the FP8 GEMV alone (GPU), then the engines with the sweep's best configs")
    ap.add_argument("--gemm-only", action="store_true", help="sweep the FP8 GEMV alone and stop")
    ap.add_argument("--gemm-dtype", default="fp8", choices=["fp8", *DENSE_DTYPES],
                    help="weights of the sweep: fp8 (quant.GEMV_CONFIGS), or bf16/fp16 unquantized against cuBLAS "
                         "at the Llama-3-8B and Qwen3-30B-A3B shapes (linear.DENSE_GEMV_CONFIGS)")
    ap.add_argument("--gemm-rows", type=int, nargs="+", default=None,
                    help="rows the sweep times (default 1 2 4 8; bf16/fp16: 1 2)")
    ap.add_argument("--gemm-scheme", default="channel", choices=["tensor", "channel", "block"],
                    help="weight scales of the sweep (channel: what --quantization fp8 makes)")
    ap.add_argument("--compile-workers", type=int, default=12, help="processes compiling the sweep's kernels")
    ap.add_argument("--gated-ab", action="store_true",
                    help="GPU: also time each engine's first batch with the gate_up GEMV's gated epilogue on and off "
                         "(quant.GATED_EPILOGUE), alternating three times")
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
            if args.gemm_dtype == "fp8":
                best = gemm_sweep(hbm, args.gemm_scheme, args.gemm_rows or [1, 2, 4, 8], args.compile_workers)
                from understudy.engine.layers import quant

                quant.GEMV_CONFIGS.update(best)  # --gemm: the engines below run with this run's best tiles
                print(f"# the engines below use this sweep's best GEMV configs ({len(best)} shapes)", flush=True)
            else:
                dense_sweep(hbm, args.gemm_dtype, args.gemm_rows or [1, 2], args.compile_workers)
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

"""The MoE block alone on a GPU (router GEMM, routing, experts), the sorted grouped-GEMM path next to the
small-batch GEMV path, each replayed from a CUDA graph, against the bytes the block must read.

Qwen3-30B-A3B's shape by default (hidden 2048, 128 experts, top-8, experts 768 wide, bf16, random weights).
Each graph runs the block over --layers layers with their own weights (about 1.2 GB a layer), so the
experts' bytes come from HBM as in a decode step, not from L2. Per batch size T it prints, for each path,
microseconds per block and the fraction of the copy bandwidth (measured here, read + write counted, as
bench/moe.py does) that the block's bytes (the router, and gate/up/down of the distinct experts the T tokens
were routed to) would take at that time. Paths: grouped (route + align + two grouped GEMMs + the top-k sum:
what every batch ran before the GEMV path), gemv (at most 16 tokens), auto (what moe.routed_experts picks),
and at T <= 2 "before" (the GEMV path as it was before the CUDA-core kernels: a route launch and the
tensor-core tiles, moe.MMA_GEMV). The block is the router GEMM, moe.route_triton and moe.experts_triton:
what model/experts.py's SparseMoE runs (its router's route, then moe.experts: moe.routed_experts). --fp8 channel|block: the experts in FP8 (W8A16
kernels) with per-row or 128x128 block scales, one byte a weight plus the scales counted.

--sweep (at T = 1 and 2, about 2-3 minutes on an H200, most of it compiling): every gate_up candidate (tiles,
warps, stages of fma_gate_up and gemv_gate_up) alone and in the block (the down projection at
moe.GEMV_CONFIGS' current entry), then every down candidate likewise, then the best of each (by their times
alone) together; each line in microseconds and in the fraction of the copy bandwidth its bytes would take,
next to "before" and the current entry timed in the same run. It ends with the best GemvConfig per T as the
lines to paste into moe.GEMV_CONFIGS (GEMV_CONFIGS_FP8 with --fp8).

    PYTHONPATH=src python bench/moe_block.py                  # T = 1 2 8 32 128, about a minute on an H200
    PYTHONPATH=src python bench/moe_block.py --sweep          # T = 1 2 and the GEMV configs
    PYTHONPATH=src python bench/moe_block.py --sweep --fp8 channel   # the same for FP8 experts
"""

from __future__ import annotations

import argparse
import json

import torch

from understudy.engine.layers import moe

GiB = 1 << 30
SHAPE = dict(hidden=2048, experts=128, top_k=8, inter=768)
# (kernel, BLOCK_N, BLOCK_K, num_warps, num_stages) tried by --sweep; "fma" kernels unroll K (stages unused).
# At T = 1: fma_gate_up runs 8 * 768 / BLOCK_N programs of 2 * BLOCK_N rows x 2048, fma_down 2048 / BLOCK_N
# programs of 8 experts x BLOCK_N rows x 768; an fma tile wants BLOCK_N * BLOCK_K / (32 * warps) >= 8 weights
# a thread (16 for FP8) so that each load is 16 bytes.
GATE_UP = [("fma", 2, 256, 2, 1), ("fma", 2, 512, 4, 1), ("fma", 2, 1024, 8, 1), ("fma", 4, 256, 4, 1),
           ("fma", 4, 512, 4, 1), ("fma", 4, 512, 8, 1), ("fma", 4, 1024, 8, 1), ("fma", 8, 256, 4, 1),
           ("fma", 8, 256, 8, 1), ("fma", 8, 512, 8, 1), ("fma", 16, 256, 8, 1), ("fma", 16, 128, 4, 1),
           ("mma", 32, 128, 4, 4), ("mma", 16, 128, 4, 4), ("mma", 16, 256, 4, 3), ("mma", 32, 256, 4, 3)]
DOWN = [("fma", 2, 256, 2, 1), ("fma", 2, 512, 4, 1), ("fma", 4, 128, 2, 1), ("fma", 4, 256, 4, 1),
        ("fma", 4, 512, 4, 1), ("fma", 8, 128, 4, 1), ("fma", 8, 256, 4, 1), ("fma", 8, 256, 8, 1),
        ("fma", 16, 128, 8, 1), ("fma", 16, 256, 8, 1), ("mma", 16, 256, 4, 4), ("mma", 16, 128, 4, 4),
        ("mma", 32, 256, 4, 4), ("mma", 16, 512, 4, 3)]


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s, counting the bytes read and written by a 4 GiB copy."""
    src = torch.empty(4 * GiB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * 5 * src.numel() / (start.elapsed_time(end) / 1e3)


def make_layers(n: int, hidden: int, experts: int, inter: int, dtype: torch.dtype, fp8: str | None = None) -> list[tuple]:
    """(router [E, H], gate_up [E, 2I, H], down [E, H, I], FP8 scales or None) per layer, N(0, 0.02) like
    bench/moe.py; fp8 "channel" / "block": the experts quantized so (layers/quant.quantize, expert by expert)."""
    from understudy.engine.layers import quant

    gen = torch.Generator(device="cuda").manual_seed(0)

    def draw(*shape):
        return torch.empty(*shape, device="cuda", dtype=dtype).normal_(0.0, 0.02, generator=gen)

    def quantized(w):
        parts = [quant.quantize(m, fp8, (128, 128) if fp8 == "block" else None) for m in w]
        return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])

    layers = []
    for _ in range(n):
        router, gate_up, down = draw(experts, hidden), draw(experts, 2 * inter, hidden), draw(experts, hidden, inter)
        if fp8 is None:
            layers.append((router, gate_up, down, None))
            continue
        (gate_up, gu_scale), (down, down_scale) = quantized(gate_up), quantized(down)
        layers.append((router, gate_up, down, moe.Fp8Scales(gu_scale, down_scale, (128, 128) if fp8 == "block" else None)))
    return layers


def block(x, layer, top_k: int, path: str | None, config: moe.GemvConfig | None = None):
    """The block as SparseMoE runs it: the router GEMM, then moe.routed_experts' Triton path (route, experts)."""
    router, gate_up, down, scales = layer
    weights, ids = moe.route_triton(x @ router.T, top_k, renormalize=True)
    return moe.experts_triton(x, gate_up, down, weights, ids, path=path, config=config, scales=scales)


def replay_us(fn, reps: int = 20) -> float:
    """Microseconds per call of fn, captured once in a CUDA graph and replayed `reps` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def expert_bytes(layer) -> tuple[int, int]:
    """(gate_up bytes, down bytes) of one expert, its FP8 scales included."""
    _, gate_up, down, scales = layer
    gu, dn = gate_up[0].numel() * gate_up.element_size(), down[0].numel() * down.element_size()
    if scales is not None:
        gu, dn = gu + scales.gate_up[0].numel() * 4, dn + scales.down[0].numel() * 4
    return gu, dn


def routing(x, layers, top_k: int) -> list[tuple]:
    """(weights, ids) of x in each layer."""
    return [moe.route(x @ layer[0].T, top_k, renormalize=True) for layer in layers]


def block_bytes(x, layers, top_k: int) -> dict[str, float]:
    """Mean bytes per block that must be read: "gate_up" / "down" of the distinct selected experts, and
    "block" = those plus the router."""
    total = {"gate_up": 0, "down": 0, "block": 0}
    for layer, (_, ids) in zip(layers, routing(x, layers, top_k)):
        distinct = int(ids.unique().numel())
        gu, dn = expert_bytes(layer)
        total["gate_up"] += distinct * gu
        total["down"] += distinct * dn
        total["block"] += distinct * (gu + dn) + layer[0].numel() * layer[0].element_size()
    return {k: v / len(layers) for k, v in total.items()}


def sweep(x, layers, top_k: int, need: dict, bw: float, fp8: bool) -> tuple[moe.GemvConfig, dict]:
    """Time the GEMV candidates at this T (see the module docstring); returns the best config and the numbers."""
    T = x.shape[0]
    default = moe._gemv_config(T, fp8)
    routes = routing(x, layers, top_k)
    scales = [layer[3] for layer in layers]
    flat = [(w.reshape(-1).float().contiguous(), i) for w, i in routes]
    hidden = [moe._gemv_gate_up(x, layer[1], w, i, default.gate_up, s) for layer, (w, i), s in zip(layers, flat, scales)]

    def frac(us, what):
        return need[what] / (us * 1e-6) / bw

    def per_block(fn):
        return replay_us(lambda: [fn(layer) for layer in layers], reps=50) / len(layers)

    def block_us(config):
        return per_block(lambda layer: block(x, layer, top_k, "gemv", config))

    def line(label, us, what="block"):
        print(f"    T {T} {label}: {us:6.1f} us ({frac(us, what):4.0%})", flush=True)

    def gate_up_alone(tiles):
        return replay_us(lambda: [moe._gemv_gate_up(x, layer[1], w, i, tiles, s)
                                  for layer, (w, i), s in zip(layers, flat, scales)], reps=50) / len(layers)

    def down_alone(tiles):
        return replay_us(lambda: [moe._gemv_down(h, layer[2], i, tiles, s)
                                  for layer, h, (_, i), s in zip(layers, hidden, flat, scales)], reps=50) / len(layers)

    out = {"before": block_us(moe.MMA_GEMV), "default": block_us(default)}
    line(f"block before (route launch + {moe.MMA_GEMV.gate_up} / {moe.MMA_GEMV.down})", out["before"])
    line(f"block now    ({default})", out["default"])
    line("router GEMM alone", per_block(lambda layer: x @ layer[0].T), "block")
    line("router GEMM + route launch", per_block(lambda layer: moe.route(x @ layer[0].T, top_k, True)), "block")
    results = {}
    for name, candidates, alone in (("gate_up", GATE_UP, gate_up_alone), ("down", DOWN, down_alone)):
        results[name] = {}
        for tiles in candidates:
            config = default._replace(**{name: tiles})
            try:
                us_alone, us_block = alone(tiles), block_us(config)
            except Exception as e:  # a tile the compiler cannot fit (shared memory, registers): say so, go on
                print(f"    T {T} {name} {tiles}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue
            results[name][tiles] = us_alone
            print(f"    T {T} {name} {tiles}: alone {us_alone:6.1f} us ({frac(us_alone, name):4.0%} of its bytes)   "
                  f"block {us_block:6.1f} us ({frac(us_block, 'block'):4.0%})", flush=True)
    best_up = min(results["gate_up"], key=results["gate_up"].get)
    best_down = min(results["down"], key=results["down"].get)
    best = moe.GemvConfig(best_up, best_down)
    best_us = block_us(best)
    print(f"    T {T} best {best}: {best_us:.1f} us per block ({frac(best_us, 'block'):.0%}) vs "
          f"{out['before']:.1f} before and {out['default']:.1f} now", flush=True)
    out.update(best=list(best), best_us=best_us,
               **{name: {str(t): us for t, us in r.items()} for name, r in results.items()})
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="batch sizes T (default 1 2 8 32 128; with --sweep 1 2)")
    ap.add_argument("--layers", type=int, default=8, help="layers with their own weights in each graph")
    ap.add_argument("--fp8", choices=["channel", "block"], default=None,
                    help="FP8 experts (W8A16) with per-row or 128x128 block scales instead of bf16")
    ap.add_argument("--sweep", action="store_true",
                    help="time the GEMV path's configs (moe.GEMV_CONFIGS) at these T (at most 16) and print the best")
    args = ap.parse_args()
    tokens = args.tokens or ([1, 2] if args.sweep else [1, 2, 8, 32, 128])
    dtype = torch.bfloat16
    h, e, k, i = SHAPE["hidden"], SHAPE["experts"], SHAPE["top_k"], SHAPE["inter"]
    bw = copy_bandwidth()
    layers = make_layers(args.layers, h, e, i, dtype, args.fp8)
    experts = "bf16" if args.fp8 is None else f"FP8 experts ({args.fp8} scales), bf16 activations"
    print(f"# {args.layers} layers of H {h}, {e} experts top-{k}, I {i}, {experts}; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"GEMV path up to {moe.GEMV_MAX_TOKENS} tokens by default", flush=True)
    results, best = {}, {}
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(T, h, device="cuda", dtype=dtype)
            need = block_bytes(x, layers, k)
            paths = {"grouped": ("grouped", None), "auto": (None, None)}
            if T <= 16:
                paths["gemv"] = ("gemv", None)
            if T <= 2:
                paths["before"] = ("gemv", moe.MMA_GEMV)
            row = {}
            for name, (path, config) in paths.items():
                us = replay_us(lambda: [block(x, layer, k, path, config) for layer in layers]) / len(layers)
                row[name] = {"us": us, "fraction": need["block"] / (us * 1e-6) / bw}
            if T <= 16:  # the two paths agree (bf16 roundings apart)
                diff = (block(x, layers[0], k, "gemv").float() - block(x, layers[0], k, "grouped").float()).abs().max()
                row["gemv_vs_grouped_max_abs"] = float(diff)
            results[T] = {"MB": need["block"] / 1e6, **row}
            print(f"T {T:>4}: {need['block'] / 1e6:6.1f} MB per block   " + "   ".join(
                f"{p} {row[p]['us']:6.1f} us ({row[p]['fraction']:4.0%})" for p in paths)
                + (f"   |gemv - grouped| <= {row['gemv_vs_grouped_max_abs']:.2g}" if T <= 16 else ""), flush=True)
            if args.sweep and T <= 16:
                best[T], results[T]["sweep"] = sweep(x, layers, k, need, bw, args.fp8 is not None)
    if best:
        table = "GEMV_CONFIGS_FP8" if args.fp8 else "GEMV_CONFIGS"
        print(f"# paste into src/understudy/engine/layers/moe.py, {table} (replacing those token counts' lines):")
        for T, config in best.items():
            print(f"    {T}: GemvConfig({config.gate_up}, {config.down}),")
    print("json", json.dumps({"copy_GBps": bw / 1e9, "shape": SHAPE, "layers": args.layers, "fp8": args.fp8,
                              "results": results}))


if __name__ == "__main__":
    main()

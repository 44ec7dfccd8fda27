"""The MoE block alone on a GPU (router GEMM, routing, experts), the sorted grouped-GEMM path next to the
small-batch GEMV path, each replayed from a CUDA graph, against the bytes the block must read.

Qwen3-30B-A3B's shape by default (hidden 2048, 128 experts, top-8, experts 768 wide, bf16, random weights).
Each graph runs the block over --layers layers with their own weights (about 1.2 GB a layer), so the
experts' bytes come from HBM as in a decode step, not from L2. Per batch size T it prints, for each path,
microseconds per block and the fraction of the copy bandwidth (measured here, read + write counted, as
bench/moe.py does) that the block's bytes (the router, and gate/up/down of the distinct experts the T tokens
were routed to) would take at that time. Paths: grouped (align + two grouped GEMMs + the top-k sum: what
every batch ran before the GEMV path), gemv (at most 16 tokens), auto (what moe.experts picks). --fp8
channel|block: the experts in FP8 (W8A16 kernels) with per-row or 128x128 block scales, one byte a weight
plus the scales counted.

    PYTHONPATH=src python bench/moe_block.py                  # T = 1 8 32 128, about a minute on an H200
    PYTHONPATH=src python bench/moe_block.py --sweep          # also the GEMV path's tiles at T = 1 and 8
    PYTHONPATH=src python bench/moe_block.py --fp8 block      # FP8 experts, Qwen3-30B-A3B-FP8's blocks
"""

from __future__ import annotations

import argparse
import json

import torch

from understudy.engine.layers import moe

GiB = 1 << 30
SHAPE = dict(hidden=2048, experts=128, top_k=8, inter=768)
# (BLOCK_N, BLOCK_K, num_warps, num_stages) tried by --sweep: gate_up with down at its default, then down
UP_TILES = [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 3), (32, 64, 4, 6),
            (32, 128, 8, 4), (16, 128, 2, 4)]
DOWN_TILES = [(16, 128, 4, 4), (16, 256, 4, 4), (16, 256, 4, 6), (16, 512, 4, 3), (32, 128, 4, 4),
              (32, 256, 4, 4), (16, 128, 2, 6), (16, 256, 8, 4)]


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


def block(x, layer, top_k: int, path: str | None, tiles=None):
    router, gate_up, down, scales = layer
    weights, ids = moe.route(x @ router.T, top_k, renormalize=True)
    return moe.experts_triton(x, gate_up, down, weights, ids, path=path, tiles=tiles, scales=scales)


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


def block_bytes(x, layers, top_k: int) -> float:
    """Mean bytes per block that must be read: the router, and each distinct selected expert's gate, up, down."""
    total = 0
    for router, gate_up, down, scales in layers:
        _, ids = moe.route(x @ router.T, top_k, renormalize=True)
        per_expert = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
        if scales is not None:
            per_expert += (scales.gate_up[0].numel() + scales.down[0].numel()) * 4
        total += router.numel() * router.element_size() + int(ids.unique().numel()) * per_expert
    return total / len(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128], help="batch sizes T")
    ap.add_argument("--layers", type=int, default=8, help="layers with their own weights in each graph")
    ap.add_argument("--fp8", choices=["channel", "block"], default=None,
                    help="FP8 experts (W8A16) with per-row or 128x128 block scales instead of bf16")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the GEMV path's tiles (moe._gemv_tiles) at the batch sizes of at most 16")
    args = ap.parse_args()
    dtype = torch.bfloat16
    h, e, k, i = SHAPE["hidden"], SHAPE["experts"], SHAPE["top_k"], SHAPE["inter"]
    bw = copy_bandwidth()
    layers = make_layers(args.layers, h, e, i, dtype, args.fp8)
    experts = "bf16" if args.fp8 is None else f"FP8 experts ({args.fp8} scales), bf16 activations"
    print(f"# {args.layers} layers of H {h}, {e} experts top-{k}, I {i}, {experts}; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"GEMV path up to {moe.GEMV_MAX_TOKENS} tokens by default", flush=True)
    results = {}
    with torch.inference_mode():
        for T in args.tokens:
            x = torch.randn(T, h, device="cuda", dtype=dtype)
            need = block_bytes(x, layers, k)
            paths = ["grouped", "auto"] + (["gemv"] if T <= 16 else [])
            row = {}
            for path in paths:
                us = replay_us(lambda: [block(x, layer, k, None if path == "auto" else path) for layer in layers])
                us /= len(layers)
                row[path] = {"us": us, "fraction": need / (us * 1e-6) / bw}
            if T <= 16:  # the two paths agree (bf16 roundings apart)
                diff = (block(x, layers[0], k, "gemv").float() - block(x, layers[0], k, "grouped").float()).abs().max()
                row["gemv_vs_grouped_max_abs"] = float(diff)
            results[T] = {"MB": need / 1e6, **row}
            print(f"T {T:>4}: {need / 1e6:6.1f} MB per block   " + "   ".join(
                f"{p} {row[p]['us']:6.1f} us ({row[p]['fraction']:4.0%})" for p in paths)
                + (f"   |gemv - grouped| <= {row['gemv_vs_grouped_max_abs']:.2g}" if T <= 16 else ""), flush=True)
            if args.sweep and T <= 16:
                up0, down0 = moe._gemv_tiles(T)
                for name, tiles in [("gate_up", (t, down0)) for t in UP_TILES] + [("down", (up0, t)) for t in DOWN_TILES]:
                    cfg = tiles[0] if name == "gate_up" else tiles[1]
                    us = replay_us(lambda: [block(x, layer, k, "gemv", tiles) for layer in layers]) / len(layers)
                    print(f"    sweep T {T}: {name} tiles (BLOCK_N, BLOCK_K, warps, stages) = {cfg}: {us:6.1f} us "
                          f"({need / (us * 1e-6) / bw:4.0%})", flush=True)
    print("json", json.dumps({"copy_GBps": bw / 1e9, "shape": SHAPE, "layers": args.layers, "fp8": args.fp8,
                              "results": results}))


if __name__ == "__main__":
    main()

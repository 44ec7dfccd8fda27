"""A decode step's work between the qkv GEMM and attention, per layer, on a GPU: fused.rope_and_store (one
launch: q/k norms, RoPE, k and v into the KV cache) against the launches it replaces (rms_norm of q and of k,
apply_rope, two index_copy_ stores; an FP8 cache adds its casts), measured in the same run.

Each path is captured in a CUDA graph of `--layers` layers (each with its own cache, as a model has) and
replayed; the time per layer is the graph's median over `--repeats` replays divided by the layers. Shapes:
Qwen3-30B-A3B (32 q / 4 KV heads of 128, q/k norms) and Llama-3-8B (32 / 8, no norms), bf16, at decode
batches 1 and 32; bf16 and FP8 caches.

    PYTHONPATH=src python bench/rope_store.py            # about 30 s on an H200 (mostly Triton compiles)
    PYTHONPATH=src python bench/rope_store.py --layers 8 --repeats 20   # quicker
"""

from __future__ import annotations

import argparse
import statistics

import torch

from understudy.engine.layers import fused
from understudy.engine.layers.attention import FP8_KV, as_bytes, to_cache

SHAPES = {"qwen3-30b-a3b": (32, 4, 128, True), "llama-3-8b": (32, 8, 128, False)}


def separate(q, k, v, positions, inv_freq, kc, vc, slots, norms, k_scale, v_scale):
    """What Attention.forward and fast_attention launched before rope_and_store."""
    if norms is not None:
        q, k = fused.rms_norm(q, norms[0], 1e-6), fused.rms_norm(k, norms[1], 1e-6)
    q, k = fused.apply_rope(q, k, positions, inv_freq)
    for new, cache, s in ((k, kc, k_scale), (v, vc, v_scale)):
        as_bytes(cache.view(-1, *cache.shape[2:])).index_copy_(0, slots, as_bytes(to_cache(new, cache.dtype, s)))
    return q, k


def fused_path(q, k, v, positions, inv_freq, kc, vc, slots, norms, k_scale, v_scale):
    kw = {} if norms is None else dict(q_norm=norms[0], k_norm=norms[1], eps=1e-6)
    return fused.rope_and_store(q, k, v, positions, inv_freq, 1.0, kc, vc, slots, k_scale, v_scale, **kw)


def per_layer_us(fn, layers, batch, hq, hkv, d, norm, cache_dtype, repeats) -> float:
    dev = "cuda"
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device=dev)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)  # views of one GEMM output, as in the model
    q, k, v = q.view(batch, hq, d), k.view(batch, hkv, d), v.view(batch, hkv, d)
    positions = torch.arange(1000, 1000 + batch, device=dev)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, d, 2, device=dev).float() / d)
    blocks, bs = batch * 4 + 1, 16
    caches = [(torch.zeros(blocks, bs, hkv, d, device=dev).to(cache_dtype),
               torch.zeros(blocks, bs, hkv, d, device=dev).to(cache_dtype)) for _ in range(layers)]
    slots = torch.arange(batch, device=dev) * 4 * bs + bs
    norms = (torch.randn(d, dtype=torch.bfloat16, device=dev), torch.randn(d, dtype=torch.bfloat16, device=dev)) \
        if norm else None
    scales = (0.5, 2.0) if cache_dtype == FP8_KV else (1.0, 1.0)

    def step():
        for kc, vc in caches:
            fn(q, k, v, positions, inv_freq, kc, vc, slots, norms, *scales)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / layers)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}: us per layer, median of {args.repeats} graph replays of "
          f"{args.layers} layers")
    print(f"{'shape':<15} {'batch':>5} {'cache':>5} {'separate':>9} {'rope_and_store':>15} {'saved':>6}")
    for name, (hq, hkv, d, norm) in SHAPES.items():
        for batch in args.batches:
            for cache in (torch.bfloat16, FP8_KV):
                old = per_layer_us(separate, args.layers, batch, hq, hkv, d, norm, cache, args.repeats)
                new = per_layer_us(fused_path, args.layers, batch, hq, hkv, d, norm, cache, args.repeats)
                label = "fp8" if cache == FP8_KV else "bf16"
                print(f"{name:<15} {batch:>5} {label:>5} {old:>9.2f} {new:>15.2f} {old - new:>6.2f}")


if __name__ == "__main__":
    main()

"""Prefill attention speed: the Triton paged prefill kernel (triton_attention._paged_prefill) at every tile
config of a sweep, next to torch's flash attention on the same shapes, in the same run.

Shapes: a Llama-3-8B layer (32 q heads, 8 kv heads, head_dim 128) and a Qwen3-30B-A3B one (32 q heads, 4 kv
heads), bf16, a paged cache of 16-token blocks in a random order. Cases: one prompt of 512 / 2048 / 8192
tokens; the last 2048-token chunk of an 8192-token prompt (6144 tokens cached before it: how the engine
prefills a prompt longer than max_num_batched_tokens); a mixed step of 32 sequences x 16 new tokens over
contexts of 1000. Each is timed as the median of CUDA-graph replays of many launches; TFLOP/s counts causal
FLOPs (4 x head_dim x q heads x the keys each query sees). The baseline: F.scaled_dot_product_attention
(is_causal=True, flash backend) on contiguous q/k/v of a prompt's shape (GQA expanded; none for the chunk or
the mixed step, whose causal mask is not SDPA's). `default` is the config prefill_config picks for the step
(eager; in a CUDA graph a mixed step sees its bucket's token count instead). Every config's output is
checked against the default's, and the default's against SDPA. Ends with the winning config per case.

    PYTHONPATH=src python bench/prefill_attention.py               # the sweep on a GPU (~2 minutes)
    PYTHONPATH=src python bench/prefill_attention.py --quick       # the table's configs only
    PYTHONPATH=src python bench/prefill_attention.py --kv fp8      # an FP8 KV cache
    PYTHONPATH=src python bench/prefill_attention.py --cpu         # a tiny case in Triton's interpreter
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

if "--cpu" in sys.argv:  # before Triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402,F401  (puts the repo root on sys.path, for the tests' helpers)

SHAPES = {"llama3-8b": (32, 8, 128), "qwen3-30b-a3b": (32, 4, 128)}  # q heads, kv heads, head_dim
BLOCK = 16
# name: (new tokens per sequence, context per sequence); "chunk N@P": N new tokens after P cached ones (a long
# prompt's last chunk, a chat's follow-up turn)
CASES = {"prompt 512": ([512], [512]), "prompt 2048": ([2048], [2048]), "prompt 8192": ([8192], [8192]),
         "chunk 2048@6144": ([2048], [8192]), "mixed 32x16@1000": ([16] * 32, [1000] * 32),
         "chunk 16@2048": ([16], [2064]), "chunk 64@8192": ([64], [8256]), "chunk 256@8192": ([256], [8448])}
CPU_SHAPES = {"tiny": (4, 2, 16)}
CPU_CASES = {"prompt 40": ([40], [40]), "chunk 24@40": ([24], [64]), "mixed 4x3@20": ([3] * 4, [20] * 4)}


def sweep_configs(quick: bool) -> list:
    """The configs timed: the table's first, then rows x tile x warps x stages."""
    from understudy.engine.layers.triton_attention import PREFILL_CONFIGS, PrefillConfig

    out = [cfg for _, cfg in PREFILL_CONFIGS]
    if quick:
        return out
    for rows, tile, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        cfg = PrefillConfig(rows, tile, warps, stages)
        if cfg not in out:
            out.append(cfg)
    return out


def make_case(shape, q_lens, ctx, device, kv_dtype, seed=0):
    """q, the paged caches, the metadata, and the contiguous per-sequence keys/values the cache holds."""
    from understudy.engine.layers.attention import AttentionMetadata, to_cache

    hq, hkv, d = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    per_seq = [-(-c // BLOCK) for c in ctx]
    perm = (torch.randperm(sum(per_seq) + 8, generator=g) + 1).tolist()  # block 0 stays reserved, as in the engine
    tables = [perm[sum(per_seq[:i]):sum(per_seq[:i + 1])] for i in range(len(ctx))]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # the interpreter's tl.dot has no bf16
    kc = torch.zeros(max(perm) + 1, BLOCK, hkv, d, dtype=kv_dtype or dtype, device=device)
    vc = torch.zeros_like(kc)
    keys = [torch.randn(c, hkv, d, generator=g).to(device, dtype) for c in ctx]
    values = [torch.randn(c, hkv, d, generator=g).to(device, dtype) for c in ctx]
    for table, k, v in zip(tables, keys, values):
        slots = torch.tensor(table, device=device).repeat_interleave(BLOCK)[:len(k)] * BLOCK
        slots += torch.arange(len(k), device=device) % BLOCK
        kc.view(-1, hkv, d)[slots] = to_cache(k, kc.dtype, 1.0)
        vc.view(-1, hkv, d)[slots] = to_cache(v, vc.dtype, 1.0)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(device, dtype)
    return q, kc, vc, AttentionMetadata.build(q_lens, ctx, tables, BLOCK, device=device), keys, values


def causal_flops(shape, q_lens, ctx) -> float:
    hq, _, d = shape
    seen = sum(sum(range(c - n + 1, c + 1)) for n, c in zip(q_lens, ctx))  # keys each new token sees
    return 4.0 * d * hq * seen


def sdpa_call(q, keys, values):
    """The flash baseline for a one-prompt case (None otherwise): (call, its output in q's layout)."""
    import torch.nn.functional as F

    if len(keys) != 1 or len(keys[0]) != q.shape[0]:
        return None
    group = q.shape[1] // keys[0].shape[1]
    qs = q.transpose(0, 1).unsqueeze(0).contiguous()
    ks = keys[0].repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).contiguous()
    vs = values[0].repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).contiguous()
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    else:
        def call():
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    return call, lambda out: out[0].transpose(0, 1)


def seconds(call, cuda: bool) -> float:
    """Seconds per call: on a GPU, a CUDA graph of ~20 ms of launches, median of its replays; on the CPU, one
    interpreted call."""
    if not cuda:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0
    from fp8 import graph_seconds

    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    return graph_seconds([call], launches=max(3, min(200, int(0.02 / max(once, 1e-6)))))


def _warm(tasks: list) -> None:
    """Run each (shape, config, kv_dtype) kernel once on a small case: a worker process of precompile."""
    from understudy.engine.layers.triton_attention import paged_prefill_attention

    for shape, cfg, kv_dtype in tasks:
        q, kc, vc, meta, _, _ = make_case(shape, [40], [72], "cuda", kv_dtype)
        try:
            paged_prefill_attention(q, kc, vc, meta, 0.1, config=cfg)
        except Exception:  # noqa: BLE001  (out of shared memory, say: the timing loop reports it)
            pass
    torch.cuda.synchronize()


def precompile(tasks: list, workers: int) -> None:
    """Compile every kernel the sweep times in `workers` processes at once (bench/fp8.py's precompile, for
    these kernels): the timing loop then finds them in Triton's disk cache."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = [tasks[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_warm, [c for c in chunks if c]))


def load_old(path: str):
    """paged_prefill_attention of a copy of an earlier triton_attention.py (`--old`), timed beside the sweep."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("old_triton_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.paged_prefill_attention


def run_shape(name, shape, cases, configs, cuda, kv_dtype, old=None) -> dict:
    """Time every config (and `old`) on every case of one shape; print a table (us per call, TFLOP/s); return
    {case: (best config, its seconds, the default's seconds, SDPA's seconds or None, FLOPs, the default)}."""
    from understudy.engine.layers.triton_attention import paged_prefill_attention, prefill_config

    device = "cuda" if cuda else "cpu"
    hq, hkv, d = shape
    print(f"\n## {name}: {hq} q heads, {hkv} kv heads, head_dim {d}, {BLOCK}-token blocks"
          + (f", KV cache {kv_dtype}" if kv_dtype else ""), flush=True)
    variants = {cfg: functools.partial(paged_prefill_attention, config=cfg) for cfg in configs}
    if old:
        variants["old kernel"] = old
    times: dict = {}
    results = {}
    for case, (q_lens, ctx) in cases.items():
        q, kc, vc, meta, keys, values = make_case(shape, q_lens, ctx, device, kv_dtype)
        flops, scale = causal_flops(shape, q_lens, ctx), d ** -0.5
        default = prefill_config(meta.max_query_len, q.dtype)
        base = paged_prefill_attention(q, kc, vc, meta, scale, config=default)
        sdpa = sdpa_call(q, keys, values) if not kv_dtype else None
        t_sdpa = None
        if sdpa is not None:
            call, layout = sdpa
            err = (layout(call()).float() - base.float()).abs().max().item()
            t_sdpa = seconds(call, cuda)
            print(f"{case:>18}: SDPA flash {t_sdpa * 1e6:8.1f} us {flops / t_sdpa / 1e12:6.1f} TFLOP/s "
                  f"(max |default - SDPA| = {err:.1e})", flush=True)
        tol = 1e-4 if q.dtype == torch.float32 else 3e-2
        for label, fn in variants.items():
            try:
                err = (fn(q, kc, vc, meta, scale).float() - base.float()).abs().max().item()
                if err > tol:
                    raise AssertionError(f"differs from the default config's output by {err:.1e}")
                times[label, case] = seconds(lambda fn=fn: fn(q, kc, vc, meta, scale), cuda)
            except Exception as e:  # noqa: BLE001  (a config that does not compile: reported, not fatal)
                print(f"{case:>18}: {label} failed: {str(e).splitlines()[0][:160]}", flush=True)
                times[label, case] = float("inf")
        best = min(configs, key=lambda c: times[c, case])
        results[case] = best, times[best, case], times[default, case], t_sdpa, flops, default
    width = 18
    print(f"{'us per call (TFLOP/s)':<34}" + "".join(f"{c:>{width}}" for c in cases))
    for label in variants:
        head = label if isinstance(label, str) else \
            f"rows {label.rows:3} tile {label.tile:3} w{label.warps} s{label.stages}"
        cells = []
        for case in cases:
            t = times[label, case]
            mark = "*" if label == results[case][5] else " "
            cells.append(f"{'x':>{width}}" if t == float("inf") else
                         f"{t * 1e6:>{width - 7}.1f}{mark}({results[case][4] / t / 1e12:4.0f})")
        print(f"{head:<34}" + "".join(cells), flush=True)
    print("(* = the default config for the case)")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="a tiny case in Triton's interpreter: checks the script")
    ap.add_argument("--quick", action="store_true", help="only the configs of triton_attention.PREFILL_CONFIGS")
    ap.add_argument("--kv", choices=["auto", "fp8"], default="auto", help="the KV cache's dtype (auto: bf16)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--old", metavar="FILE", help="also time the paged_prefill_attention of this copy of an earlier "
                    "triton_attention.py (git show REV:src/understudy/engine/layers/triton_attention.py > FILE)")
    ap.add_argument("--compile-workers", type=int, default=12, help="processes compiling the sweep's kernels")
    args = ap.parse_args()
    from understudy.engine.layers.attention import FP8_KV
    from understudy.engine.layers.triton_attention import prefill_config

    if args.cpu:
        import tests.helpers.interpreter  # noqa: F401  (the interpreter's loop bounds: see there)

        shapes, cases = CPU_SHAPES, CPU_CASES
        configs = sweep_configs(quick=True)
        configs.append(type(configs[0])(rows=64, tile=16, warps=4, stages=2))  # tiles of one block
    else:
        shapes = {s: SHAPES[s] for s in args.shapes}
        cases = {c: CASES[c] for c in args.cases}
        configs = sweep_configs(args.quick)
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    kv_dtype = FP8_KV if args.kv == "fp8" else None
    if not args.cpu:
        t0 = time.perf_counter()
        precompile([(s, c, kv_dtype) for s in shapes.values() for c in configs], args.compile_workers)
        print(f"# {len(configs) * len(shapes)} kernels compiled in {time.perf_counter() - t0:.0f}s "
              f"({args.compile_workers} processes)", flush=True)
    old = load_old(args.old) if args.old else None
    wins = {name: run_shape(name, shape, cases, configs, not args.cpu, kv_dtype, old) for name, shape in shapes.items()}
    print("\n## best config per case (us per call, TFLOP/s; default = prefill_config's pick)")
    for name, results in wins.items():
        for case, (best, t, t_default, t_sdpa, flops, default) in results.items():
            sdpa = f" | SDPA flash {t_sdpa * 1e6:.1f} us ({t_sdpa / t:.2f}x best's time)" if t_sdpa else ""
            tokens = sum(cases[case][0])
            graph = (f" | in a CUDA graph (bucket of {tokens} tokens): {prefill_config(tokens)}"
                     if tokens <= 512 and prefill_config(tokens) != default else "")
            print(f"{name:>14} {case:>18}: {best} {t * 1e6:.1f} us {flops / t / 1e12:.0f} TFLOP/s | default "
                  f"{t_default * 1e6:.1f} us {flops / t_default / 1e12:.0f} TFLOP/s{sdpa}{graph}")
    ratio = statistics.geometric_mean([r[c][1] / r[c][2] for r in wins.values() for c in r])
    print(f"# best / default time, geometric mean over the cases: {ratio:.2f}")


if __name__ == "__main__":
    main()

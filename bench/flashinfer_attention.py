"""Our Triton attention kernels against FlashInfer's, on the same paged KV cache, in the same run: the engine
takes a library's kernel where it is faster on the H200, and keeps its own where it is not.

Ours: triton_attention.paged_prefill_attention (prefill_config's pick for the step, as the engine runs it) and
paged_decode_attention (split_count's split count; also unsplit, as before round 9, and other minimum runs
per split); a prefill whose programs split (a short chunk over a long cached prefix) is also timed
unsplit. FlashInfer's: BatchPrefillWithPagedKVCacheWrapper with each backend it has for the device (fa2;
fa3, Hopper's wgmma/TMA kernels) and BatchDecodeWithPagedKVCacheWrapper (CUDA cores, and its tensor-core
variant), over the same K/V tensors ([blocks, 16, kv heads, head_dim] is FlashInfer's NHD layout)
and block tables. FlashInfer compiles its kernels on first use (JIT, the device's nvcc); that time is printed.

Shape: a Llama-3-8B layer (32 q heads, 8 kv heads, head_dim 128), bf16. Prefill cases are
bench/prefill_attention.py's; decode cases are batches of one new token per sequence. Each kernel is timed as
the median of CUDA-graph replays (bench/prefill_attention.seconds); FlashInfer's `plan` (host work it needs
before each step's shapes) is timed apart, on the host, since the engine would pay it per step. Every
FlashInfer output is checked against ours.

    PYTHONPATH=src python bench/flashinfer_attention.py     # needs a GPU and `pip install flashinfer-python`
    PYTHONPATH=src python bench/flashinfer_attention.py --no-flashinfer --cases "decode 4@2048" --splits 4 8 16

On the device machine (no index to install from, 64 MiB of carried files) the H200 runs used flashinfer-python
0.7.4's wheel cut to 34 MB: its Python files and data/{include,cutlass,cccl,spdlog}, and of data/csrc only
the top-level batch_prefill*, batch_decode*, page* and header files; apache-tvm-ffi's wheel beside it; with
FLASHINFER_CUDA_ARCH_LIST=9.0a and FLASHINFER_WORKSPACE_BASE set (its JIT cache, which can be carried to the
next call). The image's nvidia-ml-py stands in for its pynvml dependency.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from prefill_attention import BLOCK, CASES, SHAPES, causal_flops, make_case, seconds  # noqa: E402

# name: (sequences, context per sequence), one new token each
DECODE_CASES = {"decode 1@512": (1, 512), "decode 1@2048": (1, 2048), "decode 1@8192": (1, 8192),
                "decode 4@2048": (4, 2048), "decode 16@2048": (16, 2048), "decode 32@1000": (32, 1000),
                "decode 128@128": (128, 128), "decode 128@2048": (128, 2048)}
SPLIT_TOKENS = (64, 256)  # our split decode's minimum keys per program, timed beside the default
WORKSPACE_BYTES = 256 << 20
TOLERANCE = 3e-2  # bf16 outputs of two exact attention kernels


def page_indices(meta, ctx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's view of our block tables: (indptr, indices, last page lengths), int32 on the device."""
    pages = [-(-c // BLOCK) for c in ctx]
    tables = meta.block_tables.cpu()
    indices = torch.cat([tables[i, :p] for i, p in enumerate(pages)]).to(torch.int32)
    indptr = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    last = torch.tensor([c - (p - 1) * BLOCK for c, p in zip(ctx, pages)], dtype=torch.int32)
    dev = meta.block_tables.device
    return indptr.to(dev), indices.to(dev), last.to(dev)


def host_ms(fn, repeats: int = 5) -> float:
    """Median wall time of fn on the host (FlashInfer's plan), in ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def prefill_variants(flashinfer, shape, q_lens, ctx, meta, scale, backends):
    """{label: (run, plan ms, JIT+first-plan seconds)} for FlashInfer's prefill wrapper per backend."""
    hq, hkv, d = shape
    indptr, indices, last = page_indices(meta, ctx)
    qo_indptr = meta.query_start_loc.to(torch.int32)
    out = {}
    for backend in backends:
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"), "NHD", backend=backend)

        def plan(wrapper=wrapper):
            wrapper.plan(qo_indptr, indptr, indices, last, hq, hkv, d, BLOCK, causal=True, sm_scale=scale,
                         q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        t0 = time.perf_counter()
        plan()  # the first plan builds (JIT) the module
        first = time.perf_counter() - t0
        out[f"flashinfer {backend}"] = (wrapper, host_ms(plan), first)
    return out


def decode_variants(flashinfer, shape, ctx, meta, scale):
    hq, hkv, d = shape
    indptr, indices, last = page_indices(meta, ctx)
    out = {}
    for tensor_cores in (False, True):
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=tensor_cores)

        def plan(wrapper=wrapper):
            wrapper.plan(indptr, indices, last, hq, hkv, d, BLOCK, sm_scale=scale,
                         q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        t0 = time.perf_counter()
        plan()
        first = time.perf_counter() - t0
        out["flashinfer decode" + (" tensor cores" if tensor_cores else "")] = (wrapper, host_ms(plan), first)
    return out


def timed(label, call, reference, flops, rows):
    """Check call's output against ours, time it; print and record one line."""
    try:
        err = (call().float() - reference.float()).abs().max().item()
        if err > TOLERANCE:
            raise AssertionError(f"differs from ours by {err:.1e}")
        t = seconds(call, cuda=True)
    except Exception as e:  # noqa: BLE001  (one variant failing is reported, the run goes on)
        print(f"    {label}: failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}", flush=True)
        traceback.print_exc(limit=3)
        return None
    rows.append((label, t, err))
    print(f"    {label:<34} {t * 1e6:9.1f} us {flops / t / 1e12:7.1f} TFLOP/s  (max |diff| {err:.1e})", flush=True)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=list(CASES) + list(DECODE_CASES),
                    default=list(CASES) + list(DECODE_CASES))
    ap.add_argument("--backends", nargs="+", default=["fa2", "fa3"], help="FlashInfer prefill backends to time")
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="also time our kernels at these split counts (default: split_count's only)")
    ap.add_argument("--no-flashinfer", action="store_true", help="time our kernels only")
    args = ap.parse_args()
    flashinfer = None if args.no_flashinfer else importlib.import_module("flashinfer")
    from understudy.engine.layers.triton_attention import paged_decode_attention, paged_prefill_attention

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, flashinfer "
          f"{flashinfer.__version__ if flashinfer else '(not run)'}", flush=True)
    shape = SHAPES["llama3-8b"]
    hq, hkv, d = shape
    scale = d ** -0.5
    summary = []
    for case in args.cases:
        decode = case in DECODE_CASES
        if decode:
            n, c = DECODE_CASES[case]
            q_lens, ctx = [1] * n, [c] * n
        else:
            q_lens, ctx = CASES[case]
        q, kc, vc, meta, _, _ = make_case(shape, q_lens, ctx, "cuda", None)
        flops = causal_flops(shape, q_lens, ctx)
        print(f"\n## {case}: {len(q_lens)} sequences, {sum(q_lens)} new tokens, contexts {ctx[0]}", flush=True)
        rows: list = []
        if decode:
            ours = lambda: paged_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, scale)  # noqa: E731
        else:
            ours = lambda: paged_prefill_attention(q, kc, vc, meta, scale)  # noqa: E731
        reference = ours()
        t_ours = timed("understudy triton", ours, reference, flops, rows)
        from understudy.engine.layers.triton_attention import (MAX_PREFILL_SPLITS, prefill_config, prefill_programs,
                                                                split_count)

        if decode:  # the decode kernel's split choices: none (the kernel before), other minimum runs
            print(f"    (default: {split_count(len(q_lens) * hkv, q.device)} splits)", flush=True)
            timed("understudy triton, 1 split", lambda: paged_decode_attention(
                q, kc, vc, meta.block_tables, meta.context_lens, scale, splits=1), reference, flops, rows)
            for tokens in SPLIT_TOKENS:
                timed(f"understudy triton, split_tokens {tokens}", lambda tokens=tokens: paged_decode_attention(
                    q, kc, vc, meta.block_tables, meta.context_lens, scale, split_tokens=tokens), reference,
                    flops, rows)
            for n in args.splits:
                timed(f"understudy triton, {n} splits", lambda n=n: paged_decode_attention(
                    q, kc, vc, meta.block_tables, meta.context_lens, scale, splits=n), reference, flops, rows)
        else:  # a prefill's programs split only when they are too few to fill the GPU (a short chunk)
            cfg = prefill_config(meta.max_query_len, q.dtype)
            splits = split_count(prefill_programs(sum(q_lens), len(q_lens), hq // hkv, hkv, cfg), q.device,
                                 MAX_PREFILL_SPLITS)
            print(f"    (default: {splits} splits)", flush=True)
            if splits > 1:
                timed("understudy triton, 1 split", lambda: paged_prefill_attention(
                    q, kc, vc, meta, scale, splits=1), reference, flops, rows)
            for n in args.splits:
                timed(f"understudy triton, {n} splits", lambda n=n: paged_prefill_attention(
                    q, kc, vc, meta, scale, splits=n), reference, flops, rows)
        if args.no_flashinfer:
            continue
        try:
            variants = (decode_variants(flashinfer, shape, ctx, meta, scale) if decode else
                        prefill_variants(flashinfer, shape, q_lens, ctx, meta, scale, args.backends))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            variants = {}
        best = None
        for label, (wrapper, plan_ms, first_s) in variants.items():
            print(f"    {label}: plan {plan_ms:.3f} ms on the host (first plan, with its JIT build: {first_s:.1f} s)",
                  flush=True)
            t = timed(label, lambda w=wrapper: w.run(q, (kc, vc)), reference, flops, rows)
            if t is not None and (best is None or t < best[1]):
                best = (label, t, plan_ms)
        if best and t_ours:
            summary.append((case, t_ours, best))
    print("\n## summary: our kernel against FlashInfer's fastest, per case (time ratio > 1: FlashInfer is faster)")
    for case, t_ours, (label, t, plan_ms) in summary:
        print(f"{case:>18}: understudy {t_ours * 1e6:8.1f} us | {label} {t * 1e6:8.1f} us "
              f"(+ plan {plan_ms * 1e3:.0f} us on the host) | ours / theirs {t_ours / t:.2f}")


if __name__ == "__main__":
    main()

"""Engine speed: loading, time to first token and decoding a Llama-3-8B-shaped model with random weights,
each next to its baseline measured in the same run.

Prints:
  * load: our publish into the memory service (GB/s) next to the pinned host->device bandwidth and to
    safetensors.torch.load_file(device="cuda");
  * time to first token on an idle engine for prompts of --ttft-lens tokens (random ids, a distinct prompt
    each time, so no prefix-cache hit; with --ttft-prefix P, each after a cached prefix of P tokens, as a
    follow-up turn of a chat is): p50 and max of --ttft-repeats runs after one untimed run per length,
    next to the floor max(weight bytes read / copy bandwidth, FLOPs / --peak-tflops). The bytes: every
    weight but the embedding table (only the prompt's rows of it are read), and a cached prefix's K/V; the
    FLOPs: 2 x the matmul weights x prompt tokens, causal attention (QK^T and PV, over the prefix too), and
    the lm_head for the one sampled row. The copy
    bandwidth (bytes read + written by a 4 GiB device copy) is measured in the run;
  * decode tokens/s at --batches (Llama-3-8B at batch 128 decodes from CUDA graphs: --max-num-seqs is the
    largest batch and the KV cache holds it), as the median step's tokens over its time (the headline: one
    slow step, a JIT compile or a GC pause, would skew a mean), with the mean and the slowest step beside
    it, next to transformers `generate` at its best: a StaticCache and the decode forward compiled by
    generate itself (torch.compile mode="reduce-overhead", fullgraph=True, i.e. CUDA graphs), the
    installed transformers' recipe (generation/configuration_utils.py, CompileConfig). The cache is
    allocated once per batch and reset between calls, so the recorded CUDA graphs are replayed, not
    re-recorded. Only its decode is timed: generate(--tokens) minus generate(2 tokens), both after a
    warm-up call that compiles and records, over the --tokens - 2 decode steps between them (prefill,
    the first decode step and generate's set-up cancel out); the median of --hf-repeats such pairs.
    `--hf-eager` adds eager transformers (a DynamicCache, no compile), timed the same way;
  * the fraction of the memory-bandwidth roofline reached at the first batch
    (weight bytes x tokens/s / copy bandwidth);
  * a last line `json {...}` with all of it.

    python bench/engine.py                                  # Llama-3-8B shape, batches 1 8 32 128
    python bench/engine.py --layers 4 --tokens 32           # a quick GPU smoke run
    python bench/engine.py --cpu                            # a tiny shape on the CPU: checks that it runs
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, decode_steps, device_sync, fmt_steps, pinned_h2d_seconds, profile_engine, without_pdl  # noqa: E402  (puts the repo root on sys.path)
from tests.helpers.tiny_model import llama_weight_shapes, write_byte_tokenizer  # noqa: E402  (a byte-level BPE, no merges)

GiB = 1 << 30
H200_BF16_DENSE_TFLOPS = 790.0
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 8192,
             "bos_token_id": 128000, "eos_token_id": 128001}
# --cpu: small enough that torch.compile of the transformers baseline takes about a minute on two cores.
TINY = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "bos_token_id": None, "eos_token_id": 0}


def write_llama_dir(d: Path, shape: dict, layers: int, dtype: str) -> Path:
    """config.json of an HF Llama of `shape` with `layers` decoder layers, and a byte-level tokenizer."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape, "num_hidden_layers": layers,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": dtype, "hidden_act": "silu"}
    (d / "config.json").write_text(json.dumps(cfg))
    write_byte_tokenizer(d)
    return d


def make_checkpoint(d: Path, layers: int, shard_bytes: int = 4 * GiB, shape: dict = LLAMA3_8B,
                    dtype: torch.dtype = torch.bfloat16, device: str = "cuda", write_dir=write_llama_dir,
                    weight_shapes=llama_weight_shapes) -> int:
    """A model directory of `shape` (an HF Llama, Llama-3-8B's, by default) with random weights (N(0, 0.02),
    norms 1) drawn on `device`; returns its bytes. Another family: write_dir(d, shape, layers, dtype name)
    writes its config.json and tokenizer, weight_shapes(shape, layers) names its tensors (bench/moe.py's)."""
    write_dir(d, shape, layers, str(dtype).removeprefix("torch."))
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(0)
    shard, size, index, total, k = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, size, k
        if shard:
            name = f"model-{k:05d}.safetensors"
            save_file(shard, str(d / name), metadata={"format": "pt"})
            index.update({n: name for n in shard})
            shard, size, k = {}, 0, k + 1

    for name, shape_ in weight_shapes(shape, layers).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape_, dtype=dtype)
        else:
            t = (torch.randn(shape_, device=device, generator=gen, dtype=dtype) * 0.02).cpu()
        shard[name] = t
        size += t.numel() * t.itemsize
        total += t.numel() * t.itemsize
        if size >= shard_bytes:
            flush()
    flush()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": index}))
    return total


def cached_checkpoint(work: Path, layers: int, *, name: str = "llama3-8b-shape", shape: dict = LLAMA3_8B,
                      dtype: torch.dtype = torch.bfloat16, device: str = "cuda", **family) -> Path:
    """make_checkpoint into work/<name>-<layers>l once (later runs with that --workdir reuse it), read
    through once so that every run starts from the page cache. family: make_checkpoint's write_dir and
    weight_shapes, for a model other than a Llama."""
    ckpt = work / f"{name}-{layers}l"
    ckpt.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "done").exists():
        make_checkpoint(ckpt, layers, shape=shape, dtype=dtype, device=device, **family)
        (ckpt / "done").touch()
    subprocess.run(f"cat {ckpt}/*.safetensors > /dev/null", shell=True, check=True)
    return ckpt


def bandwidths() -> tuple[float, float]:
    """(pinned host->device GB/s, device memory GB/s counting bytes read + written)."""
    n = 4 * GiB
    return n / pinned_h2d_seconds(n) / 1e9, copy_bandwidth("cuda") / 1e9


def safetensors_load(d: Path, device: str) -> float:
    from safetensors.torch import load_file

    sync = device_sync(device)
    sync()
    t0 = time.perf_counter()
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(str(f), device=device))
    sync()
    seconds = time.perf_counter() - t0
    del tensors
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


# -- the floor of a prefill -------------------------------------------------------------------------------

def prefill_flops(shape: dict, layers: int, prompt: int, prefix: int = 0) -> float:
    """The FLOPs a prefill of `prompt` tokens after `prefix` cached ones must do: every matmul weight once per
    new token, causal attention (QK^T and PV over the keys at or before each query), the lm_head for the last
    position only."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    attention = 2 * prompt * (2 * prefix + prompt + 1) * q  # sum over queries j of prefix + j keys, x2 (QK^T,
    # PV), x2 (mul+add)
    return layers * (2 * prompt * per_layer + attention) + 2 * v * h


def prefill_bytes(shape: dict, weights_bytes: int, prompt: int, itemsize: int, layers: int = 0,
                  prefix: int = 0) -> float:
    """The bytes a prefill must read: the weights but the embedding table, of which the prompt's rows, and the
    K/V of `prefix` cached tokens in `layers` layers."""
    h, v = shape["hidden_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    return weights_bytes - v * h * itemsize + min(prompt, v) * h * itemsize + layers * prefix * 2 * kv * itemsize


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """Dense matmul TFLOP/s measured here (the --cpu floor's peak: the CPU has no data-sheet number)."""
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e12


# -- understudy -------------------------------------------------------------------------------------------

def time_to_first_token(engine, prompt: int, repeats: int, vocab: int, sync, prefix: int = 0) -> dict:
    """Seconds from add_request to the first token on the host, on an idle engine, for distinct random
    prompts of `prompt` tokens: the first run (untimed for p50, reported as `first_ms`) then `repeats`.
    prefix: each prompt follows `prefix` random tokens that an untimed request put in the prefix cache first,
    so only its own `prompt` tokens are computed."""
    from understudy.engine.core.sampling import SamplingParams

    assert not engine.has_work, "TTFT is measured on an idle engine"
    gen = torch.Generator().manual_seed(1000 + prompt)
    times = []
    for r in range(1 + repeats):
        ids = torch.randint(0, vocab, (prefix + prompt,), generator=gen).tolist()
        if prefix:  # the earlier turn: its blocks sealed in the prefix cache
            engine.add_request(f"turn{prompt}-{r}", ids[:prefix], SamplingParams(max_tokens=1, ignore_eos=True))
            while engine.has_work:
                engine.step()
        computed = engine.prompt_tokens_computed
        sync()
        t0 = time.perf_counter()
        engine.add_request(f"ttft{prompt}-{r}", ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while not any(o.new_token_ids for o in engine.step()):
            pass
        sync()
        times.append(time.perf_counter() - t0)
        if engine.prompt_tokens_computed - computed != prompt:
            print(f"# warning: {prompt}-token prompt computed {engine.prompt_tokens_computed - computed} tokens "
                  f"(a prefix-cache hit, or a miss on its {prefix}-token prefix?)", flush=True)
        while engine.has_work:
            engine.step()
    timed = times[1:]
    return {"p50_ms": statistics.median(timed) * 1e3, "max_ms": max(timed) * 1e3, "first_ms": times[0] * 1e3,
            "repeats": repeats}


# -- transformers -----------------------------------------------------------------------------------------

def hf_model(d: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, device_map=device).eval()
    model.generation_config.eos_token_id = None  # exactly max_new_tokens, as ignore_eos does for understudy
    return model


def hf_decode(model, batch: int, prompt_len: int, tokens: int, repeats: int, compiled: bool) -> dict:
    """transformers' decode: per-step seconds of generate(tokens) - generate(2) over tokens - 2 steps, the
    median of `repeats` pairs after a warm-up pair. compiled: a StaticCache allocated once and reset between
    calls, the decode forward compiled by generate (reduce-overhead, fullgraph); else eager (DynamicCache)."""
    from transformers import CompileConfig, StaticCache

    device = model.device
    sync = device_sync(device)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device,
                        generator=torch.Generator(device=device).manual_seed(batch))
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    cache = None
    if compiled:
        config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        if device.type != "cuda":
            config._compile_all_devices = True  # generate compiles on CUDA only unless told (no CUDA graphs here)
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + tokens)
        # transformers renamed generate's `past_key_values` to `cache` (5.2x): pass the one this version takes
        name = "cache" if "cache" in inspect.signature(model.prepare_inputs_for_generation).parameters \
            else "past_key_values"
        kwargs.update({name: cache, "compile_config": config})
    else:
        kwargs.update(disable_compile=True)

    def run(n: int) -> float:
        if cache is not None:
            cache.reset()  # in place: the compiled graphs keep their static addresses
        sync()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, **kwargs)
        sync()
        assert out.shape[1] == prompt_len + n, out.shape
        return time.perf_counter() - t0

    short = 2
    t0 = time.perf_counter()
    run(tokens), run(short)  # compiles, warms up and records the CUDA graphs
    warm = time.perf_counter() - t0
    per_step = [(run(tokens) - run(short)) / (tokens - short) for _ in range(repeats)]
    step = statistics.median(per_step)
    return {"tok_s": batch / step, "step_ms": step * 1e3, "step_ms_all": [s * 1e3 for s in per_step],
            "warmup_s": warm}


# -- main -------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true",
                    help="a tiny Llama in float32 on the CPU (host memory service, eager engine): checks that the "
                         "script runs; defaults become --layers 1 --batches 1 4 --tokens 12 --ttft-repeats 3")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32 = Llama-3-8B; --cpu: 1)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="decode batches (default 1 8 32 128)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens generated per request (default 128)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of the decode runs")
    ap.add_argument("--ttft-lens", type=int, nargs="*", default=[32, 512, 2048],
                    help="prompt lengths of the time-to-first-token runs (none: skip them)")
    ap.add_argument("--ttft-repeats", type=int, default=None, help="timed TTFT runs per length (default 5)")
    ap.add_argument("--ttft-prefix", type=int, default=0, metavar="P",
                    help="time each --ttft-lens prompt after a cached prefix of P tokens (a multiple of the 16-token "
                         "block: all of it cached), as a chat's follow-up turn: only its own tokens are computed")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"the TTFT floor's compute peak (default {H200_BF16_DENSE_TFLOPS:g}, H200 bf16 dense; "
                         "--cpu: a float32 matmul measured in the run)")
    ap.add_argument("--prefill-attention", choices=("reference", "triton"), default="triton",
                    help="the engine's prefill attention on CUDA (serve's default: triton)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--hf-eager", action="store_true",
                    help="also time eager transformers (DynamicCache, no compile); the ratio stays against the "
                         "compiled static-cache run")
    ap.add_argument("--hf-repeats", type=int, default=3, help="timed generate pairs per batch (median)")
    ap.add_argument("--profile", action="store_true",
                    help="GPU: also print where the time of a prefill of the largest --ttft-lens and of decode steps "
                         "at the first batch goes (torch.profiler: wall, kernels, the gap, the top kernels)")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoint, reused when given again "
                                                    "(default: a temp dir)")
    args = ap.parse_args()
    cpu = args.cpu
    layers = args.layers or (1 if cpu else 32)
    batches = args.batches or ([1, 4] if cpu else [1, 8, 32, 128])
    tokens = args.tokens or (12 if cpu else 128)
    ttft_repeats = args.ttft_repeats or (3 if cpu else 5)
    assert tokens > 2, "--tokens must be above 2 (transformers is timed as generate(tokens) - generate(2))"

    from understudy.engine.launch import build_engine
    from understudy.engine.serve_config import DeviceOptions, KVOptions, ModelOptions, OutputOptions, ServeConfig

    shape, dtype, device = (TINY, torch.float32, "cpu") if cpu else (LLAMA3_8B, torch.bfloat16, "cuda")
    sync = device_sync(device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="us-bench-engine-"))
    t0 = time.perf_counter()
    ckpt = cached_checkpoint(work, layers, name="tiny-llama" if cpu else "llama3-8b-shape", shape=shape,
                             dtype=dtype, device=device)
    nbytes = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"# checkpoint: {nbytes / 1e9:.3f} GB of {str(dtype)[6:]}, {layers} decoder layers, ready in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)

    copy_bw = copy_bandwidth(device)
    h2d = bandwidths()[0] if not cpu else None
    st_s = safetensors_load(ckpt, device)
    st_gbps = nbytes / st_s / 1e9
    peak = args.peak_tflops or (matmul_tflops(device, dtype) if cpu else H200_BF16_DENSE_TFLOPS)
    print(f"# {'pinned host->device ' + format(h2d, '.1f') + ' GB/s; ' if h2d else ''}device copy "
          f"{copy_bw / 1e9:.0f} GB/s (read+write); safetensors load_file(device={device!r}) {st_gbps:.1f} GB/s "
          f"({st_s:.2f}s); peak {peak:.4g} TFLOP/s ({'--peak-tflops' if args.peak_tflops else 'measured matmul' if cpu else 'H200 bf16 dense'})",
          flush=True)

    # The engine as `understudy serve` builds it (a memory service of its own that the weights are published
    # into, a KV cache, CUDA graphs up to the largest batch, warm-up), stepped here by hand instead of served
    # over HTTP.
    max_len = max([args.prompt_len + tokens, *[args.ttft_prefix + n + 1 for n in args.ttft_lens]]) + 16
    config = ServeConfig(
        model=ModelOptions(model=str(ckpt), dtype=str(dtype)[6:], max_model_len=max_len,
                           prefill_attention="reference" if cpu else args.prefill_attention,
                           attention="reference" if cpu else "auto", enforce_eager=cpu),
        device=DeviceOptions(backend="host" if cpu else "cuda", socket_dir=tempfile.mkdtemp(prefix="us-", dir="/tmp")),
        kv=KVOptions(kv_cache_memory=(64 << 20) if cpu else 16 * GiB, block_size=16, max_num_seqs=max(batches),
                     max_num_batched_tokens=8192),
        output=OutputOptions(no_progress=True))
    t0 = time.perf_counter()
    built = build_engine(config)
    results, ttft = {b: {} for b in batches}, {}
    try:
        stats = built.weights_stats
        load_gbps = stats["GBps"]
        print(f"# understudy publish into the memory service: {load_gbps:.1f} GB/s ({stats['seconds']:.2f}s)"
              + (f" = {load_gbps / h2d:.0%} of pinned H2D" if h2d else "") + f", {load_gbps / st_gbps:.2f}x safetensors",
              flush=True)
        engine = built.engine
        graph_batch = getattr(engine.graphs, "max_batch", 0) if engine.graphs is not None else 0
        need = max(batches) * -(-(args.prompt_len + tokens) // 16)
        assert engine.blocks.capacity >= need, f"the KV cache holds {engine.blocks.capacity} blocks, batch " \
                                               f"{max(batches)} needs {need}"
        print(f"# engine built (memory service, weights, KV cache of {engine.blocks.capacity} blocks, "
              f"{'CUDA graphs up to batch ' + str(graph_batch) if graph_batch else 'no CUDA graphs'}, warm-up) in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        if not cpu and graph_batch < max(batches):
            print(f"# warning: batches above {graph_batch} decode eagerly", flush=True)

        for n in args.ttft_lens:
            ttft[n] = time_to_first_token(engine, n, ttft_repeats, shape["vocab_size"], sync, args.ttft_prefix)
            floor_mem = prefill_bytes(shape, nbytes, n, dtype.itemsize, layers, args.ttft_prefix) / copy_bw
            floor_flops = prefill_flops(shape, layers, n, args.ttft_prefix) / (peak * 1e12)
            ttft[n].update(floor_ms=max(floor_mem, floor_flops) * 1e3, floor_bytes_ms=floor_mem * 1e3,
                           floor_flops_ms=floor_flops * 1e3)
            t = ttft[n]
            after = f" after {args.ttft_prefix} cached" if args.ttft_prefix else ""
            print(f"TTFT {n:>5} tokens{after}: p50 {t['p50_ms']:8.2f} ms (max {t['max_ms']:.2f}, "
                  f"first {t['first_ms']:.2f}) "
                  f"floor {t['floor_ms']:7.2f} ms (bytes {floor_mem * 1e3:.2f}, FLOPs {floor_flops * 1e3:.2f}) "
                  f"= {t['p50_ms'] / t['floor_ms']:.1f}x the floor", flush=True)
        for b in batches:
            results[b]["understudy"] = decode_steps(engine, b, args.prompt_len, tokens, shape["vocab_size"], sync)
            print(f"batch {b:>4}: understudy   {fmt_steps(results[b]['understudy'])}", flush=True)
        # The same engine with every step waiting for the one before to be read (LLMEngine.overlap_decode off):
        # what overlapping the host's work with the device's is worth, in the same run.
        overlapped, engine.overlap_decode = engine.overlap_decode, False
        results[batches[0]]["understudy_not_overlapped"] = decode_steps(
            engine, batches[0], args.prompt_len, tokens, shape["vocab_size"], sync)
        engine.overlap_decode = overlapped
        print(f"batch {batches[0]:>4}: understudy, steps not overlapped "
              f"{fmt_steps(results[batches[0]]['understudy_not_overlapped'])}", flush=True)
        if not cpu:  # and with each kernel placed only once the one before has ended (no PDL)
            results[batches[0]]["understudy_no_pdl"] = without_pdl(engine, lambda e: decode_steps(
                e, batches[0], args.prompt_len, tokens, shape["vocab_size"], sync))
            print(f"batch {batches[0]:>4}: understudy, without PDL "
                  f"{fmt_steps(results[batches[0]]['understudy_no_pdl'])}", flush=True)
        if args.profile and not cpu:
            profile_engine(engine, "understudy", batch=batches[0], prompt_len=args.prompt_len,
                           vocab=shape["vocab_size"], prefill_lens=tuple(args.ttft_lens[-1:]))
    finally:
        built.close()  # the KV cache and weights sessions, the failover lock, the memory service
    del engine, built
    if not cpu:
        torch.cuda.empty_cache()
    roofline = nbytes * results[batches[0]]["understudy"]["tok_s"] / copy_bw

    hf_errors = {}
    hf_kinds = [] if args.no_hf else ["transformers"] + (["transformers_eager"] if args.hf_eager else [])
    if hf_kinds:
        model = hf_model(ckpt, dtype, device)
        for kind in hf_kinds:
            for b in batches:
                try:
                    r = results[b][kind] = hf_decode(model, b, args.prompt_len, tokens, args.hf_repeats,
                                                     compiled=kind == "transformers")
                except Exception as e:  # noqa: BLE001  (the understudy numbers above still get their json line)
                    hf_errors[f"{kind} batch {b}"] = repr(e)
                    print(f"batch {b:>4}: {kind} FAILED: {e!r}", flush=True)
                    continue
                if not cpu:
                    torch.cuda.empty_cache()  # this batch's cache
                print(f"batch {b:>4}: {kind:<18} {r['tok_s']:>9.1f} tok/s (decode step {r['step_ms']:.2f} ms, median "
                      f"of {args.hf_repeats}; warm-up {r['warmup_s']:.1f}s)", flush=True)
        del model
    print()
    what = "transformers: StaticCache + torch.compile(reduce-overhead, fullgraph)" + (
        " (inductor on the CPU: no CUDA graphs)" if cpu else "")
    print(f"decode tokens/s (understudy: median step; {what}; ratio = understudy / transformers compiled)")
    print(f"{'batch':>6} {'understudy':>11} {'transformers':>13} {'ratio':>7}"
          + (f" {'hf eager':>9} {'ratio':>7}" if args.hf_eager and hf_kinds else ""))
    for b in batches:
        u = results[b]["understudy"]["tok_s"]
        hf = results[b].get("transformers", {}).get("tok_s")
        results[b]["ratio"] = u / hf if hf else None
        line = f"{b:>6} {u:>11.1f} {hf or float('nan'):>13.1f} {u / hf if hf else float('nan'):>6.2f}x"
        if "transformers_eager" in results[b]:
            e = results[b]["transformers_eager"]["tok_s"]
            line += f" {e:>9.1f} {u / e:>6.2f}x"
        print(line)
    after = f" after {args.ttft_prefix} cached" if args.ttft_prefix else ""
    for n, t in ttft.items():
        print(f"TTFT {n:>5} tokens{after}: p50 {t['p50_ms']:.2f} ms = {t['p50_ms'] / t['floor_ms']:.1f}x the floor "
              f"{t['floor_ms']:.2f} ms")
    print(f"roofline at batch {batches[0]}: {roofline:.0%} (weights {nbytes / 1e9:.2f} GB x tok/s / "
          f"{copy_bw / 1e9:.0f} GB/s measured by a device copy)")
    print(f"load: {load_gbps:.1f} GB/s" + (f" = {load_gbps / h2d:.0%} of pinned H2D ({h2d:.1f} GB/s)" if h2d else "")
          + f"; safetensors load_file {st_gbps:.1f} GB/s")
    print("json", json.dumps({"device": device, "layers": layers, "tokens": tokens, "prompt_len": args.prompt_len,
                              "results": results, "ttft": ttft,
                              "ttft_prefix": args.ttft_prefix, "roofline_b1": roofline, "load_GBps": load_gbps,
                              "h2d_GBps": h2d, "copy_GBps": copy_bw / 1e9, "safetensors_GBps": st_gbps,
                              "weights_bytes": nbytes, "peak_tflops": peak, "hf_errors": hf_errors}))


if __name__ == "__main__":
    main()

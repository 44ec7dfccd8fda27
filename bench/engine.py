"""Engine speed on a GPU: loading and decoding a Llama-3-8B-shaped model with random weights.

Prints, measured in the same run:
  * load: our publish into the memory service (GB/s) next to the pinned
    host->device bandwidth and to safetensors.torch.load_file(device="cuda");
  * decode tokens/s at several batch sizes next to HF transformers `generate`
    on the same checkpoint;
  * the fraction of the memory-bandwidth roofline reached at batch 1
    (weight bytes x tokens/s / bandwidth measured by a device copy).

    python bench/engine.py                       # Llama-3-8B shape, batches 1 8 32 128
    python bench/engine.py --layers 4 --tokens 32   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import pinned_h2d_seconds  # noqa: E402  (also puts the repository root on sys.path)
from tests.helpers.tiny_model import write_byte_tokenizer  # noqa: E402  (a byte-level BPE, no merges)

GiB = 1 << 30


def make_checkpoint(d: Path, layers: int, shard_bytes: int = 4 * GiB) -> int:
    """A Llama-3-8B-shaped HF directory with random bf16 weights; returns its bytes."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": layers,
           "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu"}
    (d / "config.json").write_text(json.dumps(cfg))
    write_byte_tokenizer(d)
    from safetensors.torch import save_file

    h, i, kv = 4096, 14336, 8 * 128
    shapes = {"model.embed_tokens.weight": (128256, h), "model.norm.weight": (h,), "lm_head.weight": (128256, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    gen = torch.Generator(device="cuda").manual_seed(0)
    shard, size, index, total, k = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, size, k
        if shard:
            name = f"model-{k:05d}.safetensors"
            save_file(shard, str(d / name), metadata={"format": "pt"})
            index.update({n: name for n in shard})
            shard, size, k = {}, 0, k + 1

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02).cpu()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": index}))
    return total


def cached_checkpoint(work: Path, layers: int) -> Path:
    """make_checkpoint into work/llama3-8b-shape-<layers>l once (later runs with that --workdir reuse it),
    read through once so that every run starts from the page cache."""
    ckpt = work / f"llama3-8b-shape-{layers}l"
    ckpt.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "done").exists():
        make_checkpoint(ckpt, layers)
        (ckpt / "done").touch()
    subprocess.run(f"cat {ckpt}/*.safetensors > /dev/null", shell=True, check=True)
    return ckpt


def bandwidths() -> tuple[float, float]:
    """(pinned host->device GB/s, device memory GB/s counting bytes read + written)."""
    n = 4 * GiB
    h2d = n / pinned_h2d_seconds(n) / 1e9
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(dst)
    other.copy_(dst)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        other.copy_(dst)
    torch.cuda.synchronize()
    d2d = 2 * 5 * n / (time.perf_counter() - t0) / 1e9
    del dst, other
    torch.cuda.empty_cache()
    return h2d, d2d


def safetensors_load(d: Path) -> float:
    from safetensors.torch import load_file

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(str(f), device="cuda"))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del tensors
    torch.cuda.empty_cache()
    return seconds


def decode_rate(engine, batch: int, prompt_len: int, tokens: int) -> float:
    """Decode tokens/s: steps after every sequence has its first token, tokens counted per step."""
    from understudy.engine.core.sampling import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for r in range(batch):
        engine.add_request(f"b{batch}-{r}", torch.randint(0, 128000, (prompt_len,), generator=gen).tolist(),
                           SamplingParams(**vars(params)))
    decode_s, decoded = 0.0, 0
    while engine.has_work:
        prefill = any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.step()
        torch.cuda.synchronize()
        if not prefill:
            decode_s += time.perf_counter() - t0
            decoded += sum(len(o.new_token_ids) for o in outs)
    return decoded / decode_s


def hf_rate(d: Path, batch: int, prompt_len: int, tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = hf_rate.model = getattr(hf_rate, "model", None) or AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.bfloat16, device_map="cuda")
    ids = torch.randint(0, 128000, (batch, prompt_len), device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)
    t1, tn = run(1), run(tokens)
    return batch * (tokens - 1) / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = ap.parse_args()

    from understudy.engine.launch import build_engine
    from understudy.engine.serve_config import DeviceOptions, KVOptions, ModelOptions, OutputOptions, ServeConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="us-bench-engine-"))
    ckpt = work / "llama3-8b-shape"
    ckpt.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if (ckpt / "done").exists():  # a --workdir reused between runs
        nbytes = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    else:
        nbytes = make_checkpoint(ckpt, args.layers)
        (ckpt / "done").touch()
    print(f"# checkpoint: {nbytes / 1e9:.2f} GB, {args.layers} layers, written in {time.perf_counter() - t0:.1f}s",
          flush=True)
    subprocess.run(f"cat {ckpt}/*.safetensors > /dev/null", shell=True, check=True)  # both loads read page cache
    h2d, hbm = bandwidths()
    st_s = safetensors_load(ckpt)
    print(f"# pinned host->device {h2d:.1f} GB/s; device memory {hbm:.0f} GB/s (copy, read+write); "
          f"safetensors load_file(device='cuda') {nbytes / st_s / 1e9:.1f} GB/s ({st_s:.2f}s)", flush=True)

    # The engine as `understudy serve` builds it (a memory service of its own that the weights are published
    # into, a 16 GiB KV cache, CUDA graphs, warm-up), stepped here by hand instead of served over HTTP.
    # Prefill attention: the reference one (only decode steps are timed).
    config = ServeConfig(
        model=ModelOptions(model=str(ckpt), dtype="bfloat16", prefill_attention="reference",
                           max_model_len=args.prompt_len + args.tokens + 16),
        device=DeviceOptions(backend="cuda", socket_dir=tempfile.mkdtemp(prefix="us-", dir="/tmp")),
        kv=KVOptions(kv_cache_memory=16 * GiB, block_size=16, max_num_seqs=max(args.batches),
                     max_num_batched_tokens=8192),
        output=OutputOptions(no_progress=True))
    t0 = time.perf_counter()
    built = build_engine(config)
    try:
        stats = built.weights_stats
        load_gbps = stats["GBps"]
        print(f"# understudy publish into the memory service: {load_gbps:.1f} GB/s ({stats['seconds']:.2f}s) = "
              f"{load_gbps / h2d:.0%} of pinned H2D, {load_gbps / (nbytes / st_s / 1e9):.2f}x safetensors",
              flush=True)
        print(f"# engine built (memory service, weights, KV cache, CUDA graphs, warm-up) in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        engine = built.engine
        results = {}
        for b in args.batches:
            results[b] = {"understudy": decode_rate(engine, b, args.prompt_len, args.tokens)}
            print(f"batch {b:>4}: understudy {results[b]['understudy']:>9.1f} tok/s", flush=True)
        roofline = nbytes * results[args.batches[0]]["understudy"] / (hbm * 1e9)
    finally:
        built.close()  # the KV cache and weights sessions, the failover lock, the memory service
    del engine, built
    torch.cuda.empty_cache()
    if not args.no_hf:
        for b in args.batches:
            results[b]["transformers"] = hf_rate(ckpt, b, args.prompt_len, args.tokens)
            print(f"batch {b:>4}: transformers {results[b]['transformers']:>9.1f} tok/s", flush=True)
    print()
    print(f"{'batch':>6} {'understudy tok/s':>17} {'transformers tok/s':>19} {'ratio':>7}")
    for b in args.batches:
        hf = results[b].get("transformers")
        print(f"{b:>6} {results[b]['understudy']:>17.1f} {hf or float('nan'):>19.1f} "
              f"{results[b]['understudy'] / hf if hf else float('nan'):>6.1f}x")
    print(f"roofline at batch {args.batches[0]}: {roofline:.0%} (weights {nbytes / 1e9:.1f} GB x tok/s / "
          f"{hbm:.0f} GB/s measured by a device copy)")
    print(f"load: {load_gbps:.1f} GB/s = {load_gbps / h2d:.0%} of pinned H2D ({h2d:.1f} GB/s); safetensors "
          f"load_file {nbytes / st_s / 1e9:.1f} GB/s")
    print("json", json.dumps({"results": results, "roofline_b1": roofline, "load_GBps": load_gbps, "h2d_GBps": h2d,
                              "hbm_GBps": hbm, "safetensors_GBps": nbytes / st_s / 1e9, "weights_bytes": nbytes}))


if __name__ == "__main__":
    main()

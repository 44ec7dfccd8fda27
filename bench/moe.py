"""Mixture-of-experts decode speed on a GPU, next to its memory-bandwidth roofline, in the same run.

A mixture of experts of a real model's shape with random bf16 weights (--model): Qwen3-30B-A3B (the default:
48 layers, hidden 2048, 128 experts, top-8, experts 768 wide, 32 query / 4 KV heads of 128, vocabulary 151936),
Mixtral-8x7B (8 experts 14336 wide, top-2) or GLM-4.5-Air (a dense first layer, then 128 experts top-8 under a
biased sigmoid router plus a shared expert; 22 of its 46 layers by default, which fit one H200 in bf16). The
weights never touch a disk: this script publishes them, drawn on the device, into a memory service under the
identity the engine computes for the model directory (config.json + tokenizer only), and the engine built as
`understudy serve` builds it then imports them (the path a shadow takes), stacked experts included.

For each batch size it prints decode tokens/s of the median step (the headline: one slow step, a JIT
compile or a GC pause, would skew a mean; the mean and the slowest step are printed beside it) and the
roofline: the bytes one decode step must read at least (every weight the engine holds but the routed experts
and the embedding: attention, routers, shared experts, dense layers, norms, the lm_head; the weights of the
distinct experts the batch's tokens were routed to, counted per layer in an eager step of the same run; the
KV cache read by attention and the embedding rows) over the device's copy bandwidth, measured here too.

With --fp8 the same model then runs again as `serve --quantization fp8` serves it (attention and experts
in FP8 with per-channel scales, the router, embeddings and lm_head in bf16), its weights drawn in FP8 into a
fresh memory service, and the two are printed side by side per batch, each against its own roofline (FP8
weights count one byte each, plus their float32 scales).

    PYTHONPATH=src python bench/moe.py                       # the full shape, batches 1 32 128
    PYTHONPATH=src python bench/moe.py --layers 4 --tokens 16   # a quick GPU smoke run
    PYTHONPATH=src python bench/moe.py --fp8 --batches 1 32 --tokens 16   # bf16 and FP8, about 3 minutes
    PYTHONPATH=src python bench/moe.py --model glm-4.5-air --batches 1 32   # GLM-4.5-Air, 22 layers
    PYTHONPATH=src python bench/moe.py --cpu                 # a tiny shape on the CPU (host memory service)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PY, Proc, copy_bandwidth, decode_steps, fmt_steps, profile_engine, without_pdl  # noqa: E402  (also puts the repo root on sys.path)
from tests.helpers.tiny_model import llama_weight_shapes, write_byte_tokenizer  # noqa: E402  (a byte-level BPE, no merges)

GiB = 1 << 30
# Each shape is its family's config.json (the layer count aside), as the published checkpoints write it.
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                     intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                     vocab_size=151936, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                     rope_theta=1000000.0)
# Mixtral-8x7B: 8 experts 14336 wide (intermediate_size), top-2; 93 GB in bf16
MIXTRAL_8X7B = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, rope_theta=1000000.0)
# GLM-4.5-Air: layer 0 dense, then 128 experts top-8 under a sigmoid router with a score bias, one shared
# expert, q/k/v biases, RoPE on half of each head, 96 query heads; 106B parameters (212 GB in bf16: its
# default layer count here fits one H200)
GLM_45_AIR = dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", hidden_size=4096,
                  intermediate_size=10944, num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8,
                  head_dim=128, n_routed_experts=128, num_experts_per_tok=8, moe_intermediate_size=1408,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=1.0, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=False,
                  num_nextn_predict_layers=1, vocab_size=151552, rope_theta=1000000.0)
# name: (shape, decoder layers run by default on one H200 in bf16)
MODELS = {"qwen3-30b-a3b": (QWEN3_30B_A3B, 48), "mixtral-8x7b": (MIXTRAL_8X7B, 32), "glm-4.5-air": (GLM_45_AIR, 22)}
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def tiny(shape: dict) -> dict:
    """The same family at a size the CPU runs in seconds (8 experts, top-2)."""
    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_experts_per_tok=2, vocab_size=256)
    small.update({k: 8 for k in EXPERT_COUNT_KEYS if k in shape})
    if "moe_intermediate_size" in shape:
        small["moe_intermediate_size"] = 32
    return {**shape, **small}


TINY = tiny(QWEN3_30B_A3B)


def write_model_dir(d: Path, shape: dict, layers: int, dtype: str) -> Path:
    cfg = {**shape, "num_hidden_layers": layers, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, "torch_dtype": dtype, "hidden_act": "silu", "bos_token_id": None,
           "eos_token_id": 0}
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    write_byte_tokenizer(d)
    return d


def weight_shapes(shape: dict, layers: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape of the Qwen3-MoE model write_model_dir describes (every layer sparse), the
    experts under their own names as Qwen's checkpoints store them (the loader stacks them): with
    bench/engine.py's cached_checkpoint(write_dir=write_model_dir, weight_shapes=weight_shapes), a checkpoint
    on disk for benches that load one (bench/failover.py)."""
    h, d, e, i = (shape[k] for k in ("hidden_size", "head_dim", "num_experts", "moe_intermediate_size"))
    # the attention, norms and embeddings are a Llama's (with an explicit head_dim); the MLP is not
    shapes = {k: v for k, v in llama_weight_shapes({**shape, "intermediate_size": i}, layers).items()
              if ".mlp." not in k}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                       p + "mlp.gate.weight": (e, h)})
        for x in range(e):
            shapes.update({f"{p}mlp.experts.{x}.gate_proj.weight": (i, h), f"{p}mlp.experts.{x}.up_proj.weight": (i, h),
                           f"{p}mlp.experts.{x}.down_proj.weight": (h, i)})
    return shapes


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


FP8_SPREAD = 32.0  # FP8 weights are drawn N(0, 32) (e4m3's range is +-448) with scales 0.02 / 32: N(0, 0.02) again


def publish_random(socket_path: str, model_dir: Path, dtype: torch.dtype, quantization: str = "none"):
    """Random weights (N(0, 0.02); norms 1) straight into the memory service's weights pool, under the
    identity weights.load looks for; returns the client (its session keeps the pool). quantization "fp8":
    the parameters `serve --quantization fp8` holds in FP8 are drawn in FP8, their scales set to match."""
    from understudy.engine.layers import quant
    from understudy.engine.model import weights
    from understudy.engine.model.decoder import CausalLM
    from understudy.engine.model.loader import load_config
    from understudy.engine.model.quantization import with_quantization
    from understudy.memory import MemoryClient, plan_layout

    config = with_quantization(load_config(model_dir), quantization)
    with torch.device("meta"):
        model = quant.cast_model(CausalLM(config), dtype)  # FP8 weights and float32 scales keep their dtypes
    specs = {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}
    client = MemoryClient(socket_path, "weights", "rw", timeout=0, name="bench-moe-publisher")
    sizes, metas = plan_layout(specs, client.granularity)
    for size in sizes:
        client.allocate(size)
    client.set_metadata(metas, replace=True, extra={"model_id": weights.model_id(model_dir, config, dtype),
                                                    "model_path": str(model_dir)})
    gen = None
    for name, (_, kept) in specs.items():
        t = client.tensor(name)
        gen = gen or torch.Generator(device=t.device).manual_seed(0)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif kept == torch.float32 and name.endswith(quant.SCALE_SUFFIXES + quant.EXPERT_SCALE_SUFFIXES):
            t.fill_(0.02 / FP8_SPREAD)
        elif kept == torch.float8_e4m3fn:
            for piece in t.view(-1, t.shape[-1]).split(4096):  # drawn in bf16 a piece at a time, then cast
                drawn = torch.empty(piece.shape, dtype=torch.bfloat16, device=t.device).normal_(0.0, FP8_SPREAD,
                                                                                                generator=gen)
                piece.copy_(drawn.clamp_(-448.0, 448.0))
        else:
            t.normal_(0.0, 0.02, generator=gen)
    if gen is not None and gen.device.type == "cuda":
        torch.cuda.synchronize()  # every write has landed before the pool is committed (and remapped read-only)
    client.commit()
    return client, _nbytes(model.state_dict().values())


def expert_bytes(model) -> list[int]:
    """Per MoE layer, the bytes of one routed expert: its gate, up and down (and their FP8 scales), read off
    the engine's own stacked parameters."""
    from understudy.engine.model.experts import SparseMoE

    return [_nbytes(m.experts.parameters()) // m.experts.gate_up_proj.shape[0]
            for m in model.modules() if isinstance(m, SparseMoE)]


def step_bytes(model, batch: int, context: float, distinct: list[int], kv_itemsize: int) -> float:
    """The bytes a decode step of `batch` sequences of mean length `context` must read at least, from the
    engine's parameters as they are held (FP8 weights one byte each, their scales included): every weight
    but the routed experts and the embedding, the `distinct` experts each MoE layer's batch was routed to,
    one embedding row per sequence and the K and V of every cached token."""
    from understudy.engine.model.experts import SparseMoE

    config = model.config
    experts = _nbytes(p for m in model.modules() if isinstance(m, SparseMoE) for p in m.experts.parameters())
    embedding = model.model.embed_tokens.weight
    dense = _nbytes(model.parameters()) - experts - (_nbytes([embedding]) if model.lm_head is not None else 0)
    rows = batch * config.hidden_size * embedding.element_size()
    kv = config.num_hidden_layers * batch * context * 2 * config.kv_size * kv_itemsize
    return dense + rows + sum(n * e for n, e in zip(distinct, expert_bytes(model))) + kv


def count_distinct_experts(engine) -> list[int]:
    """One decode step run eagerly, the experts each MoE layer's batch was routed to counted on the side."""
    from understudy.engine.model.experts import SparseMoE

    counts, hooks = [], []

    def record(block, args):
        _, ids = block.gate.route(args[0])
        counts.append(int(ids.unique().numel()))

    for module in engine.model.modules():
        if isinstance(module, SparseMoE):
            hooks.append(module.register_forward_pre_hook(record))
    graphs, engine.graphs = engine.graphs, None
    try:
        engine.step()
    finally:
        engine.graphs = graphs
        for hook in hooks:
            hook.remove()
    return counts


def blocks_alone(model, batch: int, dtype: torch.dtype, sync) -> tuple[float, float, int]:
    """(seconds of the first MoE layer's block, seconds of every layer's MoE block one after another, distinct
    experts of that layer) on `batch` random rows, replayed from a CUDA graph on a GPU: the kernels without
    the engine around them. That layer alone reads the same experts over and over; the chain of all layers
    reads as many bytes as the step does. The rows are in the serving dtype: a router's weight may be fp32."""
    from understudy.engine.model.experts import SparseMoE

    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    w = blocks[0].gate.weight
    x = torch.randn(batch, w.shape[1], device=w.device, dtype=dtype)
    with torch.inference_mode():
        distinct = int(blocks[0].gate.route(x)[1].unique().numel())
        one = _replay_seconds(lambda: blocks[0](x), sync, w.device, reps=len(blocks))
        chain = _replay_seconds(lambda: [b(x) for b in blocks], sync, w.device, reps=1)
    return one, chain, distinct


def _replay_seconds(fn, sync, device: torch.device, reps: int) -> float:
    """Seconds per call of fn (reps calls captured in one CUDA graph on a GPU; eager on the CPU)."""
    def run():
        for _ in range(reps):
            fn()

    with torch.inference_mode():
        run()  # compiles
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    run()
            torch.cuda.current_stream(device).wait_stream(stream)
            run = graph.replay
            run()
        sync()
        t0 = time.perf_counter()
        run()
        sync()
    return (time.perf_counter() - t0) / reps


def decode(engine, batch: int, prompt_len: int, tokens: int, vocab: int, sync) -> tuple[dict, float, list[int]]:
    """(step_stats of the decode steps: the median step is the headline, mean and max beside it; mean context
    length of the timed steps; distinct experts per layer of one step)."""
    contexts, distinct = [], {}

    def before_decode(engine) -> bool:
        if "per_layer" not in distinct and len(contexts) >= 2:
            distinct["per_layer"] = count_distinct_experts(engine)  # one more step, eager and not timed
            return True
        contexts.append(statistics.fmean(len(s.tokens) for s in engine.scheduler.running))
        return False

    steps = decode_steps(engine, batch, prompt_len, tokens, vocab, sync, before_decode)
    return steps, statistics.fmean(contexts), distinct.get("per_layer", [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b",
                    help="the shape whose random weights are served (default qwen3-30b-a3b)")
    ap.add_argument("--cpu", action="store_true", help="a tiny MoE of that family on the CPU (checks that the script "
                                                       "runs)")
    ap.add_argument("--fp8", action="store_true",
                    help="also run the model as --quantization fp8 serves it (FP8 attention and experts, "
                         "per-channel scales) after the bf16 run, and print both per batch")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the model's, or as many as fit one H200 in bf16: 48 for "
                         "qwen3-30b-a3b, 32 for mixtral-8x7b, 22 of glm-4.5-air's 46; --cpu: 2)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--profile", action="store_true",
                    help="GPU: also print where a decode step's time goes at batch 1 and at the largest batch (torch.profiler: wall, kernels, the gap, the top kernels)")
    args = ap.parse_args()

    cpu = args.cpu
    shape, default_layers = MODELS[args.model]
    shape, dtype_name = (tiny(shape), "float32") if cpu else (shape, "bfloat16")
    layers = args.layers or (2 if cpu else default_layers)
    device = torch.device("cpu" if cpu else "cuda")
    work = Path(tempfile.mkdtemp(prefix="us-moe-", dir="/tmp"))  # short: unix socket paths are limited
    model_dir = write_model_dir(work / f"{args.model}-shape", shape, layers, dtype_name)
    bandwidth = copy_bandwidth(device)
    results = run(args, model_dir, dtype_name, "none", work / "bf16", bandwidth)
    fp8_results = run(args, model_dir, dtype_name, "fp8", work / "fp8", bandwidth) if args.fp8 else None
    if fp8_results is not None:
        print(f"# {dtype_name} and --quantization fp8, median step tok/s (fraction of each one's roofline)", flush=True)
        for b in args.batches:
            r, f = results[b], fp8_results[b]
            print(f"batch {b:>4}: {dtype_name} {r['tok_s']:>9.1f} ({r['fraction']:4.0%} of {r['roofline_tok_s']:.0f})"
                  f"   fp8 {f['tok_s']:>9.1f} ({f['fraction']:4.0%} of {f['roofline_tok_s']:.0f})"
                  f"   fp8 / {dtype_name} {f['tok_s'] / r['tok_s']:.2f}x", flush=True)
    print("json", json.dumps({"model": args.model, "shape": {**shape, "num_hidden_layers": layers}, "dtype": dtype_name,
                              "copy_GBps": bandwidth / 1e9, "results": results,
                              **({"fp8_results": fp8_results} if fp8_results is not None else {})}))


def run(args, model_dir: Path, dtype_name: str, quantization: str, work: Path, bandwidth: float) -> dict:
    """Publish random weights into a memory service of its own, build the engine, decode every batch size:
    {batch: results}. The service is stopped at the end, so the next run has the device's memory."""
    from understudy.engine.launch import build_engine
    from understudy.memory.paths import device_socket_path
    from understudy.engine.serve_config import DeviceOptions, KVOptions, ModelOptions, OutputOptions, ServeConfig

    cpu = args.cpu
    fp8 = quantization == "fp8"
    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu" if cpu else "cuda")
    backend = "host" if cpu else "cuda"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    work.mkdir(parents=True, exist_ok=True)
    memory = Proc([*PY, "memory-server", "--backend", backend, "--device", "0", "--socket-dir", str(work)])
    publisher = built = None
    weights_desc = dtype_name if not fp8 else f"FP8 (attention, experts) + {dtype_name}"
    results = {}
    try:
        memory.wait_event("listening", timeout=120)
        socket_path = str(device_socket_path(work, backend, 0))
        t0 = time.perf_counter()
        publisher, nbytes = publish_random(socket_path, model_dir, dtype, quantization)
        print(f"# {load_layers(model_dir)} layers, {nbytes / 1e9:.1f} GB of {weights_desc} weights drawn into the "
              f"memory service in {time.perf_counter() - t0:.1f}s; copy bandwidth {bandwidth / 1e9:.0f} GB/s "
              f"(read + write)", flush=True)
        config = ServeConfig(
            model=ModelOptions(model=str(model_dir), dtype=dtype_name, prefill_attention="reference",
                               attention="reference" if cpu else "auto", enforce_eager=cpu, quantization=quantization,
                               max_model_len=args.prompt_len + args.tokens + 16),
            device=DeviceOptions(backend=backend, socket_dir=str(work), memory_service="connect"),
            kv=KVOptions(kv_cache_memory=(64 << 20) if cpu else 8 * GiB, block_size=16,
                         max_num_seqs=max(args.batches), max_num_batched_tokens=8192),
            output=OutputOptions(no_progress=True))
        t0 = time.perf_counter()
        built = build_engine(config)
        assert built.weights_stats["source"] == "imported", built.weights_stats
        print(f"# engine built (weights imported: {built.weights_stats['bytes'] / 1e9:.1f} GB mapped, "
              f"KV cache, {'no CUDA graphs' if cpu else 'CUDA graphs'}, warm-up) in {time.perf_counter() - t0:.1f}s",
              flush=True)
        engine, mcfg = built.engine, built.engine.model.config
        for b in args.batches:
            steps, context, distinct = decode(engine, b, args.prompt_len, args.tokens, mcfg.vocab_size, sync)
            rate = steps["tok_s"]  # the median step's (one slow step would skew a mean)
            need = step_bytes(engine.model, b, context, distinct, dtype.itemsize)
            roof = b * bandwidth / need
            results[b] = {"tok_s": rate, "roofline_tok_s": roof, "fraction": rate / roof,
                          "distinct_experts_mean": statistics.fmean(distinct) if distinct else 0.0,
                          "step_GB": need / 1e9, "steps": steps}
            print(f"batch {b:>4}: {fmt_steps(steps)}", flush=True)
            print(f"            roofline {roof:>9.1f} tok/s: the median step reaches {rate / roof:.0%}, the mean "
                  f"{steps['mean_tok_s'] / roof:.0%};   {results[b]['distinct_experts_mean']:.1f} of "
                  f"{mcfg.num_experts} experts per layer, {need / 1e9:.2f} GB per step", flush=True)
            # The MoE blocks alone at this batch: how much of the step the experts' kernels take.
            one, chain, hit = blocks_alone(engine.model, b, dtype, sync)
            hit_bytes = hit * expert_bytes(engine.model)[0]
            results[b].update(block_alone_us=one * 1e6, all_blocks_alone_ms=chain * 1e3)
            print(f"            MoE block alone (first MoE layer, {hit} experts): {one * 1e6:.1f} us = "
                  f"{hit_bytes / one / bandwidth:.0%} of the copy bandwidth over its experts' bytes; all "
                  f"{len(mcfg.moe_layers)} layers' blocks in a row: {chain * 1e3:.2f} ms of the median step's "
                  f"{steps['median_ms']:.2f} ms", flush=True)
            if b == args.batches[0] and not cpu:  # the same batch with no PDL (layers/pdl.py), same run
                no_pdl = without_pdl(engine, lambda e: decode(e, b, args.prompt_len, args.tokens,
                                                              mcfg.vocab_size, sync)[0])
                results[b]["steps_no_pdl"] = no_pdl
                print(f"batch {b:>4}: without PDL {fmt_steps(no_pdl)}: {no_pdl['tok_s'] / roof:.0%} of the roofline",
                      flush=True)
        if args.profile and not cpu:
            for batch in sorted({1, max(args.batches)}):
                profile_engine(engine, f"{dtype_name} {quantization}", batch=batch, prompt_len=args.prompt_len,
                               vocab=mcfg.vocab_size)
    finally:
        if built is not None:
            built.close()
        if publisher is not None:
            publisher.close()
        memory.stop()
    return results


def load_layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


if __name__ == "__main__":
    main()

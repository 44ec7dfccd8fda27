"""The flags of `understudy serve` and the one `ServeConfig` they make (kept free of heavy imports so
`--help` is instant).

    config = parse_serve_args(["--model", "/models/llama", "--kv-cache-memory", "8GiB"])
    config.kv.kv_cache_memory  # 8589934592

`understudy serve` adds the same flags to its subcommand (add_serve_arguments, logs.add_logging_arguments)
and calls config_from_args on what it parsed; code that reads a serve command line (a node, a snapshot)
calls parse_serve_args. Neither imports understudy.cli.
"""

from __future__ import annotations

import argparse
import dataclasses

from understudy.common.auth import add_access_arguments
from understudy.common.http_server import add_http_limit_arguments
from understudy.common.openai_options import add_api_arguments, add_model_argument
from understudy.common.units import parse_size, parse_token_count, positive_int
from understudy.engine.serve_config import DTYPE_NAMES, ConfigError, ServeConfig
from understudy.logs import add_logging_arguments

__all__ = ["DTYPE_NAMES", "ConfigError", "ServeConfig", "add_serve_arguments", "config_from_args",
           "parse_serve_args", "positive_int", "serve_parser"]


def _registry_url(text: str) -> str:
    if not text.startswith(("http://", "https://", "etcd://")):
        raise argparse.ArgumentTypeError(f"not a registry: {text!r} (a frontend's http://HOST:PORT or "
                                         f"etcd://HOST:PORT)")
    return text


# vLLM's spellings of the dtypes (--dtype half / float).
DTYPE_ALIASES = {"half": "float16", "float": "float32"}


def _dtype(text: str) -> str:
    return DTYPE_ALIASES.get(text, text)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    add_model_argument(g)
    g.add_argument("--served-model-name", action="extend", nargs="+", default=[], metavar="NAME",
                   help="the model names clients use: responses carry the first, a request may name any; several "
                        "after one flag or the flag repeated (default: the name of --model's file or directory)")
    g.add_argument("--dtype", type=_dtype, choices=["auto", *DTYPE_NAMES], default="auto",
                   metavar="{auto,float32,float,bfloat16,float16,half}",
                   help="weights and activations dtype; half = float16, float = float32 (default auto: bfloat16 "
                        "on CUDA, float32 on the CPU)")
    g.add_argument("--seed", type=int, default=None,
                   help="the seed of requests that give none (as if they had sent it: the same request samples "
                        "the same tokens every time); also seeds Python's and torch's generators at start-up "
                        "(default: none: a random seed per request)")
    g.add_argument("--quantization", "-q", choices=["none", "fp8"], default="none",
                   help="fp8: serve an unquantized (bf16/fp16/fp32) checkpoint with FP8 (e4m3) weights, quantized "
                        "per output channel when they are published into the memory service, so every shadow "
                        "imports the FP8 weights (half the bytes of bf16; lm_head and embeddings stay in --dtype). "
                        "FP8 checkpoints (quantization_config fp8, fbgemm_fp8, compressed-tensors FP8) are served "
                        "in FP8 with or without this flag; AWQ, GPTQ, bitsandbytes and other methods are refused. "
                        "Quantized GGUF files are expanded to --dtype (default: none)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: no CUDA graphs (decode steps, and prefill / mixed steps of up to 512 tokens with "
                        "--prefill-attention triton), also in a --tensor-parallel group (slower; for debugging)")
    g.add_argument("--overlap-decode", choices=["auto", "on", "off"], default="auto",
                   help="queue each decode step on the device behind the one before it, before that one's "
                        "tokens are read, so that the host's work of a step (reading tokens, stop checks, "
                        "scheduling, launching) runs while the device computes (docs/engine.md, \"Overlapped "
                        "decoding\"); vLLM calls this async scheduling. auto (default): on with CUDA, off on the "
                        "CPU, whose steps compute while they are launched: there it would only deliver each "
                        "token one step later")
    g.add_argument("--async-scheduling", dest="overlap_decode", action="store_const", const="on",
                   help="vLLM's spelling of --overlap-decode on")
    g.add_argument("--attention", choices=["auto", "reference", "triton"], default="auto",
                   help="attention kernels: triton (paged decode and prefill kernels, CUDA only) or reference "
                        "(plain torch); "
                        "auto picks triton on CUDA")
    g.add_argument("--prefill-attention", choices=["reference", "triton"], default="triton",
                   help="with triton attention, how prefill and mixed batches attend: triton (default: one "
                        "paged-prefill kernel per layer, no host sync; these steps are CUDA-graph captured up to 512 "
                        "tokens) or reference (plain torch, one sequence at a time with a host sync per layer, "
                        "always eager: slower, e.g. for the first step after a failover)")
    g.add_argument("--max-model-len", type=parse_token_count, default=None,
                   help="longest prompt + completion in tokens; vLLM's suffixes: 32k = 32000, 32K = 32768, "
                        "1M = 1048576 (default: the model's, at most 32768)")
    add_api_arguments(p.add_argument_group("OpenAI API"))
    g = p.add_argument_group("failover")
    g.add_argument("--role", choices=["primary", "shadow"], default="primary",
                   help="primary: take the device's failover lock and serve; shadow: import the weights, park "
                        "(STANDBY, not routable) on the lock and take over the KV cache when the active engine "
                        "dies (default: primary)")
    g.add_argument("--failover-dir", default=None,
                   help="directory of the failover lock files (default: the memory service's socket directory)")
    g.add_argument("--standby-wait", type=float, default=30.0,
                   help="seconds a request sent to a standby engine waits for it to become active before a 503 "
                        "(default: 30)")
    g.add_argument("--step-timeout", type=float, default=None, metavar="SECONDS",
                   help="the watchdog: a step (one forward of the batch) running longer than this ends the "
                        "process with exit code 6, so the shadow takes over; /live answers 503 from half of it "
                        "(or sooner, see docs/failover.md). Must exceed the longest legitimate step, a prefill "
                        "chunk of --max-num-batched-tokens tokens late in a long context; never counted during "
                        "start-up, warm-up, graph capture, standby, sleep or idle. 0: no watchdog (default: 60 "
                        "on CUDA, 600 on the CPU)")
    g = p.add_argument_group("discovery")
    g.add_argument("--register", action="append", default=[], metavar="URL", type=_registry_url,
                   help="announce this engine to a frontend's embedded registry (http://HOST:PORT of "
                        "`understudy frontend`) or to etcd (etcd://HOST:PORT[/prefix]); repeat for several. "
                        "The record (url, model, node, role, state) is kept alive with a lease, updated at once "
                        "when the state changes and removed on shutdown (default: none)")
    g.add_argument("--advertise-url", default=None,
                   help="the URL frontends use to reach this engine (default: http://HOST:PORT from --host and "
                        "--port, the host name for 0.0.0.0)")
    g.add_argument("--registration-ttl", type=float, default=10.0,
                   help="seconds the registration outlives the last keep-alive (sent every TTL/3): how long a "
                        "SIGKILLed engine stays listed (default: 10)")
    g = p.add_argument_group("device and memory service")
    g.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto",
                   help="memory backend: cuda (GPU) or host (CPU); auto picks cuda when a GPU is visible")
    g.add_argument("--device", type=int, default=0, help="device ordinal (default: 0)")
    g.add_argument("--tensor-parallel", "--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="run the model as a group of N ranks, one process per device (devices --device ... "
                        "--device+N-1, each with its own memory service holding its shard); this process is "
                        "rank 0 (HTTP, scheduling, sampling) and starts the others. The group fails over as a "
                        "whole: any rank dying ends it. CUDA graphs are off under N > 1. See "
                        "docs/tensor-parallel.md (default: 1)")
    g.add_argument("--nnodes", type=positive_int, default=1, metavar="K",
                   help="the --tensor-parallel group spans K nodes, N/K ranks on each (devices --device ... on "
                        "every node); run `serve` with the same flags on each node, --node-rank telling them "
                        "apart. See docs/tensor-parallel.md (default: 1)")
    g.add_argument("--node-rank", type=int, default=0, metavar="R",
                   help="this node's place in the group: 0 runs the leader (HTTP, scheduling, the failover "
                        "lock); R > 0 only runs ranks R*N/K .. (R+1)*N/K-1 and serves no HTTP (default: 0)")
    g.add_argument("--master-addr", default="127.0.0.1", metavar="HOST",
                   help="with --nnodes > 1: the leader's node, as the other nodes reach it (default: 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=0, metavar="PORT",
                   help="with --nnodes > 1: the port of the group's rendezvous store on the leader's node, the "
                        "same on every node and different for each group (required with --nnodes > 1). Ranks "
                        "of other nodes also prove $UNDERSTUDY_GROUP_TOKEN to the leader")
    g.add_argument("--socket-dir", default=None,
                   help="memory service socket directory (default: $UNDERSTUDY_SOCKET_DIR or /tmp/understudy-$UID)")
    g.add_argument("--memory-service", choices=["auto", "connect"], default="auto",
                   help="auto: use the device's memory service, starting one tied to this process if none runs; "
                        "connect: require a running one (what `understudy up` does)")
    g = p.add_argument_group("KV cache and batching")
    g.add_argument("--kv-cache-memory", type=parse_size, default=None,
                   help="bytes for the paged KV cache, e.g. 8GiB (default: 512MiB on the CPU; on CUDA "
                        "--gpu-memory-utilization of the device minus what is in use)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="fraction of GPU memory the weights + KV cache may use (default: 0.85)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="auto: keys and values in the model's dtype; fp8: in float8 e4m3, each layer's keys divided "
                        "by a k scale and values by a v scale (the checkpoint's k_scale / v_scale tensors when it "
                        "has them, else 1.0): twice the tokens in the same --kv-cache-memory (default: auto)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step; long prompts are prefilled in chunks of it (default: 2048)")
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="bound of the waiting queue; beyond it requests get 503 + Retry-After (default: 1024)")
    g.add_argument("--default-max-tokens", type=int, default=None,
                   help="max_tokens of requests that do not say, at most the rest of the context "
                        "(default: the rest of the context, as OpenAI and vLLM)")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    g.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="larger request bodies get 413 (default: 4194304)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish (default: 30)")
    add_http_limit_arguments(g)  # --timeout-keep-alive, --header-timeout, --max-header-bytes, --limit-concurrency
    add_access_arguments(p.add_argument_group("access (docs/engine.md#access)"))
    g.add_argument("--no-progress", action="store_true", help="no progress bar while loading weights")


def config_from_args(ns: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of a namespace parsed with add_serve_arguments and the logging flags; raises
    ConfigError (naming the flag) for values that cannot run together."""
    model_tag = getattr(ns, "model_tag", None)
    if model_tag is not None and ns.model is not None and model_tag != ns.model:
        raise ConfigError(f"two models: MODEL {model_tag} and --model {ns.model} (give one)")
    groups = {}
    for name, cls in ServeConfig.groups().items():
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if isinstance(value, list):  # repeated flags: tuples in the frozen config
                values[key] = tuple(value)
        if name == "model" and model_tag is not None:
            values["model"] = model_tag
        groups[name] = cls(**values)
    return ServeConfig(**groups)


def serve_parser() -> argparse.ArgumentParser:
    """A parser of `understudy serve`'s flags alone (what follows `serve` on its command line)."""
    p = argparse.ArgumentParser(prog="understudy serve", description="The flags of `understudy serve`.")
    add_serve_arguments(p)
    add_logging_arguments(p)
    return p


def parse_serve_args(argv: list[str]) -> ServeConfig:
    """The ServeConfig of `understudy serve ARGV` (ARGV without the `serve`); a bad flag or value exits 2
    with `understudy serve: error: ...`, as the command would."""
    p = serve_parser()
    try:
        return config_from_args(p.parse_args(argv))
    except ConfigError as e:
        p.error(str(e))

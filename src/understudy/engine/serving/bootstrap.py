"""Bringing an engine up, before it serves: where it runs (device, dtype, model config), its memory service
(found, or started tied to this process), its failover lock (taken now by a primary), its KV cache's shape
and pool (owned by a primary, scratch for a shadow), its limits, graphs and warm-up, and the `Worker` the
HTTP app serves. A single engine (engine/launch.py) and a tensor-parallel group's leader
(engine/parallel/group.py) share every step.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from understudy.common.auth import Access, cors_of
from understudy.common.default_model import default_model_path
from understudy.common.openai_options import OpenAIOptions, read_chat_template, sampling_defaults
from understudy.common.tokenizer import Tokenizer
from understudy.engine.core.async_engine import AsyncEngine
from understudy.engine.core.kv_cache import KVCache, KVSpec
from understudy.engine.core.llm_engine import EngineLimits, LLMEngine
from understudy.engine.model.loader import load_config
from understudy.engine.model.quantization import with_quantization
from understudy.engine.serve_config import ServeConfig
from understudy.engine.serving.faults import DEFAULT_STEP_TIMEOUT, FailFast, live_bound
from understudy.engine.serving.lifecycle import Lifecycle
from understudy.engine.serving.worker import Worker
from understudy.failover import exit_codes
from understudy.failover.faults import read_marker
from understudy.failover.lock import FailoverLock, LockHeld
from understudy.logs import log
from understudy.memory import read_status
from understudy.memory.backends import get_backend
from understudy.memory.paths import socket_path

logger = logging.getLogger("understudy.engine.serving.bootstrap")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Built:
    """An engine built from a ServeConfig (launch.build_engine), warmed up, not serving yet."""

    worker: Worker  # what the HTTP app serves (worker.engine: the AsyncEngine around `engine`)
    memory_server: subprocess.Popen | None  # the memory service this process started, if it did
    lock: FailoverLock
    socket_path: str
    weights_stats: dict = field(default_factory=dict)  # weights.load's: source (published, imported), seconds, ...

    @property
    def engine(self) -> LLMEngine:
        """The engine itself, to step by hand (bench/, tests) while the AsyncEngine is not started."""
        return self.worker.engine.engine

    def close(self) -> None:
        """For a caller that stepped the engine by hand: let go of the KV cache and weights, the failover
        lock and a memory service started for it (a tensor-parallel group's ranks end with this process)."""
        if self.engine.kv.client is not None:
            self.engine.kv.client.close()
        if self.worker.weights is not None:
            self.worker.weights.close()
        self.lock.release()
        if self.memory_server is not None:
            self.memory_server.terminate()
            self.memory_server.wait(timeout=30)


def _pdeathsig() -> None:
    """In the child: die with the parent (a memory service we started is ours alone)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn_memory_service(backend: str, device: int, socket_dir: str | None) -> subprocess.Popen:
    """A memory service tied to this process (call it from the main thread: PR_SET_PDEATHSIG fires
    when the thread that started the child exits)."""
    cmd = [sys.executable, "-m", "understudy", "memory-server", "--backend", backend, "--device", str(device)]
    if socket_dir:
        cmd += ["--socket-dir", socket_dir]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=_pdeathsig)


def ensure_memory_service(backend: str, device: int, socket_dir: str | None, mode: str) -> tuple[str, subprocess.Popen | None]:
    path = str(socket_path(socket_dir, get_backend(backend, device).identity()))
    try:
        read_status(path, timeout=5)
        return path, None
    except OSError:
        if mode == "connect":
            raise SystemExit(f"understudy serve: no memory service at {path}; start `understudy memory-server "
                             f"--backend {backend} --device {device}` or use --memory-service auto")
    proc = spawn_memory_service(backend, device, socket_dir)
    for line in proc.stderr:
        sys.stderr.write(line)
        if '"listening"' in line:
            break
    else:
        raise SystemExit(f"understudy serve: the memory service failed to start (exit {proc.wait()})")
    # Keep forwarding its logs so they are not lost (and its pipe never fills).
    threading.Thread(target=shutil.copyfileobj, args=(proc.stderr, sys.stderr), daemon=True).start()
    log(logger, "memory_service_started", pid=proc.pid, socket=path)
    return path, proc


@dataclass
class Placement:
    """Where an engine (or a tensor-parallel group's leader) runs and what it serves, before any weight."""

    model_path: Path
    config: object
    dtype: torch.dtype
    use_cuda: bool
    backend: str  # memory backend: cuda or host
    device: torch.device
    socket_path: str
    memory_server: subprocess.Popen | None
    lock: FailoverLock
    attention_fn: object  # the Triton paged attention, or None for the reference one


def place(config: ServeConfig, ranks: int = 1, check_config=None) -> Placement:
    """Device, model config, dtype, memory service and failover lock (taken now by a primary) of an
    engine whose ranks use devices --device .. --device + ranks - 1."""
    m, d = config.model, config.device
    model_path = Path(m.model) if m.model else default_model_path()
    use_cuda = d.backend == "cuda" or (d.backend == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{d.device}" if use_cuda else "cpu")
    if use_cuda:
        if torch.cuda.device_count() < d.device + ranks:
            raise SystemExit(f"understudy serve: {ranks} ranks from --device {d.device} need "
                             f"{d.device + ranks} GPUs; {torch.cuda.device_count()} are visible")
        torch.cuda.set_device(device)
    model_config = with_quantization(load_config(model_path), m.quantization)  # --quantization fp8
    if check_config is not None:
        check_config(model_config)
    dtype = DTYPES[m.dtype] if m.dtype != "auto" else (
        (torch.float16 if model_config.dtype == torch.float16 else torch.bfloat16) if use_cuda else torch.float32)
    backend = "cuda" if use_cuda else "host"
    path, mem_proc = ensure_memory_service(backend, d.device, d.socket_dir, d.memory_service)
    # One failover lock per device (a group's is its leader's): only leaders contend for it.
    lock = FailoverLock.for_device(config.failover.failover_dir or Path(path).parent,
                                   Path(path).stem.removeprefix("memory-"))
    refuse_faulty_device(lock)
    if config.failover.role == "primary":
        try:
            lock.try_acquire()
        except LockHeld as e:
            raise SystemExit(f"understudy serve: {e}: another engine is active on this device; "
                             f"start this one with --role shadow") from None
    attention_fn = None
    if m.attention == "triton" or (m.attention == "auto" and use_cuda):
        from understudy.engine.layers.triton_attention import attention_for

        attention_fn = attention_for(m.prefill_attention)
    return Placement(model_path, model_config, dtype, use_cuda, backend, device, path, mem_proc, lock, attention_fn)


def refuse_faulty_device(lock: FailoverLock) -> None:
    """An engine does not start on a device marked faulty (failover/faults.py): exit DEVICE_FAULT, naming
    the marker to remove once the device is fixed."""
    marker = read_marker(lock.path)
    if marker is None:
        return
    log(logger, "device_faulty", logging.ERROR, **marker)
    print(f"understudy serve: the device is marked faulty since {marker.get('time_utc', '?')} "
          f"({marker.get('reason')}); remove {marker['path']} once it is fixed", file=sys.stderr)
    raise SystemExit(exit_codes.DEVICE_FAULT)


def open_kv(cls: type[KVCache], role: str, path: str, spec: KVSpec, backend) -> KVCache:
    """A primary owns the device's kv pool; a shadow parks on the active engine's KV shape (in the
    pool's metadata) with a scratch KV at its own addresses."""
    if role == "primary":
        return cls.from_memory_service(path, spec, name=f"engine-{os.getpid()}")
    pooled = read_status(path)["pools"]["kv"]["extra"].get("kv_spec")
    return cls.scratch(backend, KVSpec(**pooled) if pooled else spec)


def kv_spec(config: ServeConfig, model_config, p: Placement, ranks_memory: Sequence[dict] = ()) -> KVSpec:
    """The KV cache's shape: --kv-cache-memory bytes; else on CUDA what --gpu-memory-utilization leaves on
    the fullest of the engine's devices (this one and, for a group, each other rank's `free` / `total`),
    less 1 GiB for activations; 512 MiB on the CPU. `model_config`: this rank's share of the model."""
    kv = config.kv
    if kv.kv_cache_memory:
        budget = kv.kv_cache_memory
    elif p.use_cuda:
        free, total = torch.cuda.mem_get_info(p.device)
        budget = min([int(total * kv.gpu_memory_utilization) - (total - free)] + [
            int(r["total"] * kv.gpu_memory_utilization) - (r["total"] - r["free"]) for r in ranks_memory]) - (1 << 30)
    else:
        budget = 512 << 20
    try:
        kv_dtype = torch.float8_e4m3fn if kv.kv_cache_dtype == "fp8" else p.dtype  # --kv-cache-dtype
        return KVSpec.for_budget(model_config, budget, kv.block_size, kv_dtype)
    except ValueError as e:
        raise SystemExit(f"understudy serve: {e}: raise --kv-cache-memory (or --gpu-memory-utilization)") from None


def engine_limits(config: ServeConfig, model_path: Path,
                  model_config) -> tuple[Tokenizer, tuple[int, ...], EngineLimits]:
    """The tokenizer, the stop tokens (the model's and the tokenizer's) and the scheduler's limits
    (--max-model-len defaults to the model's, at most 32768)."""
    tokenizer = Tokenizer.from_pretrained(model_path, chat_template=read_chat_template(config.api.chat_template))
    max_model_len = config.model.max_model_len or min(model_config.max_position_embeddings, 32768)
    eos = tuple(model_config.eos_token_ids) + (
        (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    kv = config.kv
    limits = EngineLimits(max_num_seqs=kv.max_num_seqs, max_num_batched_tokens=kv.max_num_batched_tokens,
                          max_waiting=kv.max_waiting, max_model_len=max_model_len)
    return tokenizer, eos, limits


def start_engine(config: ServeConfig, engine: LLMEngine, p: Placement) -> None:
    """CUDA graphs for steps (unless --enforce-eager), overlapped decoding as --overlap-decode says, then the
    warm-up."""
    if config.model.overlap_decode != "auto":  # (auto: the engine's own default, on with CUDA)
        engine.overlap_decode = config.model.overlap_decode == "on"
    if p.use_cuda and not config.model.enforce_eager:
        if p.attention_fn is None:  # --backend auto that found CUDA (with --backend cuda, ServeConfig said so)
            raise SystemExit("understudy serve: CUDA graphs need --attention triton (or --enforce-eager)")
        # mixed steps (prefills) too when the prefill attention is the Triton kernel, which a graph can hold
        engine.enable_cuda_graphs(mixed_steps=config.model.prefill_attention == "triton")
    engine.warm_up()


def step_timeout(config: ServeConfig, p: Placement) -> float:
    """--step-timeout, or its default for the device: 60 s on CUDA, 600 s on the CPU (a 2048-token prefill
    step of the default model takes ~20 s on one CPU thread)."""
    if config.failover.step_timeout is not None:
        return config.failover.step_timeout
    return DEFAULT_STEP_TIMEOUT["cuda" if p.use_cuda else "cpu"]


def finish(config: ServeConfig, engine: LLMEngine, p: Placement, tokenizer: Tokenizer, weights_client,
           stats: dict, t0: float, info: dict) -> Built:
    """A shadow parks its KV cache; the engine gets its HTTP worker and says it is ready (`info`: more
    of what /health reports)."""
    role = config.failover.role
    if role == "shadow":
        engine.kv.park()
    model_path, spec = p.model_path, engine.kv.spec
    max_model_len = engine.scheduler.max_model_len
    names = config.model.served_model_name or (model_path.stem if model_path.is_file() else model_path.name,)
    name = names[0]
    try:
        api = config.api
        openai = OpenAIOptions(
            served_model_names=names, max_model_len=max_model_len,
            sampling_defaults=sampling_defaults(api.generation_config, model_path, config.model.seed),
            tool_call_parser=api.tool_call_parser, reasoning_parser=api.reasoning_parser,
            enable_auto_tool_choice=api.enable_auto_tool_choice,
            chat_template=tokenizer.chat_template if api.chat_template is not None else None)
        access = Access.from_flags(config.access.api_key, config.access.admin_token_file)
    except ValueError as e:
        raise SystemExit(f"understudy serve: {e}") from None
    if config.model.seed is not None:  # --seed: also the process's generators
        random.seed(config.model.seed)
        torch.manual_seed(config.model.seed)
    info = {"role": role, "weights": stats["source"], "kv_blocks": spec.num_blocks, "backend": p.backend,
            "pid": os.getpid(), **info}
    worker = Worker(AsyncEngine(engine), tokenizer, openai,
                    default_max_tokens=config.kv.default_max_tokens, max_request_bytes=config.http.max_request_bytes,
                    info=info, weights=weights_client, holds=[p.lock],
                    lifecycle=Lifecycle("ACTIVE" if role == "primary" else "STANDBY"),
                    standby_wait=config.failover.standby_wait, step_timeout=step_timeout(config, p),
                    access=access, cors=cors_of(config.access))
    worker.faults = FailFast(worker, p.lock)
    log(logger, "engine_ready", model=name, seconds=round(time.perf_counter() - t0, 3), dtype=str(p.dtype),
        max_model_len=max_model_len, kv_cache_tokens=spec.num_blocks * spec.block_size,
        kv_adopted=engine.kv.adopted, step_timeout_s=worker.step_timeout,
        live_bound_s=round(live_bound(worker.step_timeout, engine.slowest_step_s), 3),
        slowest_warm_up_step_s=round(engine.slowest_step_s, 4), **info)
    return Built(worker, p.memory_server, p.lock, p.socket_path, stats)

"""`understudy serve`: from command-line options to a running worker.

Finds (or starts) the device's memory service, gets the weights into it or
imports them, takes the kv pool, builds the engine and serves HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..logs import log
from ..memory import read_status
from ..memory.paths import socket_path
from ..memory.backend import get_backend
from . import weights
from .async_engine import AsyncEngine
from .default_model import default_model_path
from .engine import EngineLimits, LLMEngine
from ..failover.lock import FailoverLock, LockHeld
from .kv_cache import KVCache, KVSpec
from .lifecycle import Lifecycle
from .loader import load_config
from .memory_watch import watch_memory_service
from .server import Worker, create_app
from .tokenizer import Tokenizer

logger = logging.getLogger("understudy.engine.launch")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Built:
    worker: Worker
    memory_server: subprocess.Popen | None
    lock: FailoverLock
    socket_path: str


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


def place(args: argparse.Namespace, ranks: int = 1, check_config=None) -> Placement:
    """Device, model config, dtype, memory service and failover lock (taken now by a primary) of an
    engine whose ranks use devices --device .. --device + ranks - 1."""
    model_path = Path(args.model) if args.model else default_model_path()
    use_cuda = args.backend == "cuda" or (args.backend == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{args.device}" if use_cuda else "cpu")
    if use_cuda:
        if torch.cuda.device_count() < args.device + ranks:
            raise SystemExit(f"understudy serve: {ranks} ranks from --device {args.device} need "
                             f"{args.device + ranks} GPUs; {torch.cuda.device_count()} are visible")
        torch.cuda.set_device(device)
    config = load_config(model_path)
    if check_config is not None:
        check_config(config)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        (torch.float16 if config.dtype == torch.float16 else torch.bfloat16) if use_cuda else torch.float32)
    backend = "cuda" if use_cuda else "host"
    path, mem_proc = ensure_memory_service(backend, args.device, args.socket_dir, args.memory_service)
    # One failover lock per device (a group's is its leader's): only leaders contend for it.
    lock = FailoverLock.for_device(args.failover_dir or Path(path).parent, Path(path).stem.removeprefix("memory-"))
    if args.role == "primary":
        try:
            lock.try_acquire()
        except LockHeld as e:
            raise SystemExit(f"understudy serve: {e}: another engine is active on this device; "
                             f"start this one with --role shadow") from None
    attention_fn = None
    if args.attention == "triton" or (args.attention == "auto" and use_cuda):
        from .triton_attention import attention_for

        attention_fn = attention_for(args.prefill_attention)
    return Placement(model_path, config, dtype, use_cuda, backend, device, path, mem_proc, lock, attention_fn)


def open_kv(cls: type[KVCache], role: str, path: str, spec: KVSpec, backend) -> KVCache:
    """A primary owns the device's kv pool; a shadow parks on the active engine's KV shape (in the
    pool's metadata) with a scratch KV at its own addresses."""
    if role == "primary":
        return cls.from_memory_service(path, spec, name=f"engine-{os.getpid()}")
    pooled = read_status(path)["pools"]["kv"]["extra"].get("kv_spec")
    return cls.scratch(backend, KVSpec(**pooled) if pooled else spec)


def build(args: argparse.Namespace) -> Built:
    if getattr(args, "tensor_parallel", 1) > 1:  # a group of ranks, one process per device: tp_group.py
        from .tp_group import build_group

        return build_group(args)

    p = place(args)
    model_path, config, dtype, path, device = p.model_path, p.config, p.dtype, p.socket_path, p.device
    t0 = time.perf_counter()
    model, weights_client, stats = weights.load(path, model_path, config, dtype, progress=not args.no_progress,
                                                name=f"engine-{os.getpid()}", attention_fn=p.attention_fn)
    spec = kv_spec(args, config, p)
    kv = open_kv(KVCache, args.role, path, spec, weights_client.backend)
    tokenizer, eos, limits = engine_limits(args, model_path, config)
    engine = LLMEngine(model, kv, eos_token_ids=eos, limits=limits, device=device)
    start_engine(args, engine, p)
    return finish(args, engine, p, tokenizer, weights_client, stats, t0, {})


def kv_spec(args: argparse.Namespace, config, p: Placement, ranks_memory: Sequence[dict] = ()) -> KVSpec:
    """The KV cache's shape: --kv-cache-memory bytes; else on CUDA what --gpu-memory-utilization leaves on
    the fullest of the engine's devices (this one and, for a group, each other rank's `free` / `total`),
    less 1 GiB for activations; 512 MiB on the CPU. `config`: this rank's share of the model."""
    from ..cli import parse_size

    if args.kv_cache_memory:
        budget = parse_size(args.kv_cache_memory)
    elif p.use_cuda:
        free, total = torch.cuda.mem_get_info(p.device)
        budget = min([int(total * args.gpu_memory_utilization) - (total - free)] + [
            int(r["total"] * args.gpu_memory_utilization) - (r["total"] - r["free"]) for r in ranks_memory]) - (1 << 30)
    else:
        budget = 512 << 20
    try:
        return KVSpec.for_budget(config, budget, args.block_size, p.dtype)
    except ValueError as e:
        raise SystemExit(f"understudy serve: {e}: raise --kv-cache-memory (or --gpu-memory-utilization)") from None


def engine_limits(args: argparse.Namespace, model_path: Path,
                  config) -> tuple[Tokenizer, tuple[int, ...], EngineLimits]:
    """The tokenizer, the stop tokens (the model's and the tokenizer's) and the scheduler's limits
    (--max-model-len defaults to the model's, at most 32768)."""
    tokenizer = Tokenizer.from_pretrained(model_path)
    max_model_len = args.max_model_len or min(config.max_position_embeddings, 32768)
    eos = tuple(config.eos_token_ids) + ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    limits = EngineLimits(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_waiting=args.max_waiting, max_model_len=max_model_len)
    return tokenizer, eos, limits


def start_engine(args: argparse.Namespace, engine: LLMEngine, p: Placement) -> None:
    """CUDA graphs for decode steps (unless --enforce-eager), then the warm-up."""
    if p.use_cuda and not args.enforce_eager:
        if p.attention_fn is None:
            raise SystemExit("understudy serve: CUDA graphs need --attention triton (or --enforce-eager)")
        engine.enable_cuda_graphs()
    engine.warm_up()


def finish(args: argparse.Namespace, engine: LLMEngine, p: Placement, tokenizer: Tokenizer, weights_client,
           stats: dict, t0: float, info: dict) -> Built:
    """A shadow parks its KV cache; the engine gets its HTTP worker and says it is ready (`info`: more
    of what /health reports)."""
    if args.role == "shadow":
        engine.kv.park()
    model_path, spec = p.model_path, engine.kv.spec
    max_model_len = engine.scheduler.max_model_len
    name = args.served_model_name or (model_path.stem if model_path.is_file() else model_path.name)
    info = {"role": args.role, "weights": stats["source"], "kv_blocks": spec.num_blocks, "backend": p.backend,
            "pid": os.getpid(), **info}
    worker = Worker(AsyncEngine(engine), tokenizer, name, max_model_len, default_max_tokens=args.default_max_tokens,
                    max_request_bytes=args.max_request_bytes, info=info, weights=weights_client, holds=[p.lock],
                    lifecycle=Lifecycle("ACTIVE" if args.role == "primary" else "STANDBY"),
                    standby_wait=args.standby_wait)
    log(logger, "engine_ready", model=name, seconds=round(time.perf_counter() - t0, 3), dtype=str(p.dtype),
        max_model_len=max_model_len, kv_cache_tokens=spec.num_blocks * spec.block_size,
        kv_adopted=engine.kv.adopted, **info)
    return Built(worker, p.memory_server, p.lock, p.socket_path)


def park_and_promote(built: Built) -> None:
    """A shadow's life: wait on the failover lock, then take over the KV cache and serve."""
    worker = built.worker
    engine = worker.engine.engine
    log(logger, "waiting_for_failover_lock", lock=str(built.lock.path), holder=built.lock.holder())
    built.lock.acquire()  # the kernel wakes us the moment the active engine's process dies
    t0 = time.perf_counter()
    worker.lifecycle.set_unquiesced("WAKING")  # a snapshot in progress (QUIESCED) first resumes us
    try:
        kv_s = engine.kv.adopt(built.socket_path, name=f"engine-{os.getpid()}")
        restored = engine.adopt_prefix_cache()
    except Exception:
        logger.exception("promotion_failed")
        worker.lifecycle.set("DEAD")
        os.kill(os.getpid(), signal.SIGTERM)
        return
    engine.timed_steps = 3  # the first token's time after a failover, phase by phase, in the log
    worker.lifecycle.failovers += 1
    worker.lifecycle.last_switch_s = time.perf_counter() - t0
    worker.lifecycle.set("ACTIVE", switch_s=round(worker.lifecycle.last_switch_s, 4), kv_s=round(kv_s, 4),
                         restored_blocks=restored)


def serve(args: argparse.Namespace) -> int:
    if getattr(args, "tensor_parallel", 1) > 1:  # a group's leader leaves as its ranks do, however it ends
        from .tp_group import as_leader

        as_leader(_serve, args)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    built = build(args)
    app = create_app(built.worker)
    from .announce import registrations  # --register: discovery records that follow the lifecycle

    announced = registrations(args, built.worker, str(built.lock.path))

    @app.on_event("startup")
    async def _start_engine():
        built.worker.lifecycle.bind(asyncio.get_running_loop())
        built.worker.engine.start()
        for registration in announced:
            await registration.start()
        if built.worker.state == "STANDBY":
            threading.Thread(target=park_and_promote, args=(built,), name="promotion", daemon=True).start()
        if built.worker.weights is not None:
            app.state.memory_watch = asyncio.create_task(
                watch_memory_service(built.worker, built.socket_path, app.state.control,
                                     restart=_restart_own_memory_service if built.memory_server else None))

    def _restart_own_memory_service() -> None:
        """The memory service we started died: start the next one (on the loop's thread, see spawn)."""
        built.memory_server.wait()
        built.memory_server = spawn_memory_service(built.worker.info["backend"], args.device, args.socket_dir)
        threading.Thread(target=shutil.copyfileobj, args=(built.memory_server.stderr, sys.stderr),
                         daemon=True).start()
        log(logger, "memory_service_started", pid=built.memory_server.pid, socket=built.socket_path)

    @app.on_event("shutdown")
    async def _stop_engine():
        for registration in announced:  # in-flight requests are done: leave the registries
            await registration.stop()
        built.worker.engine.stop()

    # loop="asyncio": uvloop (picked when installed) opens an io_uring, which CRIU cannot dump, so an
    # engine on it could never be snapshotted (seen on the GPU machine: "Unknown shit 600 (anon_inode:[io_uring])").
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", loop="asyncio",
                            timeout_graceful_shutdown=args.drain_timeout)
    # BUGFIX (tests/failover/test_failover.py::test_kill_active_engine_under_16_streams_and_resume_on_shadow):
    # "serving" was logged from the app's startup event, which uvicorn runs *before* it binds the listener,
    # so a client that waited for that line got "connection refused". It is now logged once the socket
    # accepts connections (and not at all when binding fails).
    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:
                log(logger, "serving", url=f"http://{args.host}:{args.port}", model=built.worker.model_name,
                    state=built.worker.state)

        def handle_exit(self, sig, frame):
            # uvicorn swaps our SIGTERM handler for this one while it serves (ours runs only after the
            # drain): start draining now, so /health and the discovery records stop new work at once.
            _drain()
            super().handle_exit(sig, frame)

    server = _Server(config)
    # BUGFIX (tests/engine/test_engine_http.py::test_sigterm_drains_inflight_stream_then_exits_0): after a
    # graceful shutdown uvicorn re-raises the signal it caught under the handler that was there before it;
    # with the default one, SIGTERM killed us (exit -15) after the drain, skipping the cleanup below. Our
    # handler only asks uvicorn to stop, so a drained shutdown exits 0.
    def _drain(*_):
        """Stop taking work; let a shadow start waking (it adopts the KV once we leave) while we finish."""
        if built.worker.state not in ("DRAINING", "DEAD"):
            built.worker.lifecycle.set("DRAINING")
        built.lock.release()
        server.should_exit = True

    exit_code = 0

    def _exit(code: int) -> None:
        """A fatal state (weights changed under a sleeping engine): shut down like SIGTERM, exit `code`."""
        nonlocal exit_code
        exit_code = code
        _drain()

    built.worker.exit_process = _exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _drain)
    server.run()
    if built.memory_server is not None:
        built.memory_server.terminate()
        built.memory_server.wait(timeout=30)
    return exit_code

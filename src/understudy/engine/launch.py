"""`understudy serve`: from a ServeConfig to a running worker.

Finds (or starts) the device's memory service, gets the weights into it or
imports them, takes the kv pool, builds the engine and serves HTTP.

    built = build_engine(parse_serve_args(["--model", "/models/llama"]))  # what bench/ and tests use
    built.engine.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=8)); built.engine.step()
    built.close()
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import sys
import threading
import time

from understudy.common.http_server import HTTPLimits, server_limits, warm_streaming
from understudy.engine.core.constraints import Constraints
from understudy.engine.core.kv_cache import KVCache
from understudy.engine.core.llm_engine import LLMEngine
from understudy.engine.model import weights
from understudy.engine.serve_config import ServeConfig
from understudy.engine.serving.app import create_app
from understudy.engine.serving.faults import install_injection
from understudy.engine.serving.memory_watch import watch_memory_service
from understudy.logs import log

from understudy.engine.serving.bootstrap import (Built, engine_limits, finish, kv_spec, open_kv, place,
                                                 spawn_memory_service, start_engine)
from understudy.engine.serving.promotion import park_and_promote

logger = logging.getLogger("understudy.engine.launch")


def build_engine(config: ServeConfig) -> Built:
    """The engine (or a tensor-parallel group's leader) of `config`, warmed up and not yet serving: its
    memory service found or started, weights loaded or imported, KV cache taken (a primary holds the
    failover lock from here on). `built.engine` steps it by hand; `built.worker` is what HTTP serves."""
    if config.device.tensor_parallel > 1:  # a group of ranks, one process per device: parallel/group.py
        from understudy.engine.parallel.group import build_group

        return build_group(config)

    p = place(config)
    model_path, model_config, dtype, path, device = p.model_path, p.config, p.dtype, p.socket_path, p.device
    t0 = time.perf_counter()
    model, weights_client, stats = weights.load(path, model_path, model_config, dtype,
                                                progress=not config.output.no_progress,
                                                name=f"engine-{os.getpid()}", attention_fn=p.attention_fn)
    spec = kv_spec(config, model_config, p)
    kv = open_kv(KVCache, config.failover.role, path, spec, weights_client.backend)
    tokenizer, eos, limits = engine_limits(config, model_path, model_config)
    constraints = Constraints(tokenizer, model_config.vocab_size, eos, device=device)  # structured output
    engine = LLMEngine(model, kv, eos_token_ids=eos, limits=limits, device=device, constraints=constraints)
    start_engine(config, engine, p)
    return finish(config, engine, p, tokenizer, weights_client, stats, t0, {})


def serve(config: ServeConfig) -> int:
    if config.device.node_rank > 0:  # this node's ranks of a group led from node 0: no HTTP, no lock
        from understudy.engine.parallel.nodes import run_member

        return run_member(config)
    if config.device.tensor_parallel > 1:  # a group's leader leaves as its ranks do, however it ends
        from understudy.engine.parallel.group import as_leader

        as_leader(_serve, config)
    return _serve(config)


def _serve(config: ServeConfig) -> int:
    import uvicorn

    built = build_engine(config)
    app = create_app(built.worker)
    from understudy.engine.serving.announce import (
        registrations,  # --register: discovery records that follow the lifecycle
    )

    announced = registrations(config, built.worker, str(built.lock.path))

    @app.on_event("startup")
    async def _start_engine():
        await warm_streaming()
        built.worker.lifecycle.bind(asyncio.get_running_loop())
        built.worker.faults.start(asyncio.get_running_loop())  # a failed or hung step ends us (faults.py)
        built.worker.engine.start()
        for registration in announced:
            await registration.start()
        # Everything built so far (modules, the model's Python objects, tokenizer, FastAPI) lives as long as
        # the process: out of the collector's reach, so that a full collection, which holds the GIL while it
        # walks every tracked object (tens of ms here), does not land in a step or a token's way.
        gc.collect()
        gc.freeze()
        if built.worker.weights is not None:
            app.state.memory_watch = asyncio.create_task(
                watch_memory_service(built.worker, built.socket_path, app.state.control,
                                     restart=_restart_own_memory_service if built.memory_server else None))

    def _restart_own_memory_service() -> None:
        """The memory service we started died: start the next one (on the loop's thread, see spawn)."""
        built.memory_server.wait()
        built.memory_server = spawn_memory_service(built.worker.info["backend"], config.device.device,
                                                   config.device.socket_dir)
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
    host, port = config.http.host, config.http.port
    h = config.http  # slow / silent / oversized-header clients are bounded (common/http_server.py)
    limits = HTTPLimits(timeout_keep_alive=h.timeout_keep_alive, header_timeout=h.header_timeout,
                        max_header_bytes=h.max_header_bytes, limit_concurrency=h.limit_concurrency)
    server_config = uvicorn.Config(app, host=host, port=port, log_level="warning", loop="asyncio",
                                   timeout_graceful_shutdown=config.http.drain_timeout, **server_limits(limits))
    # BUGFIX (tests/failover/test_failover.py::test_kill_active_engine_under_16_streams_and_resume_on_shadow):
    # "serving" was logged from the app's startup event, which uvicorn runs *before* it binds the listener,
    # so a client that waited for that line got "connection refused". It is now logged once the socket
    # accepts connections (and not at all when binding fails).
    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:
                log(logger, "serving", url=f"http://{host}:{port}", model=built.worker.model_name,
                    state=built.worker.state)
                # A shadow parks on the failover lock only once it listens, so its `waiting_for_failover_lock`
                # line means both (a snapshot quiesces it over HTTP right after), and one whose port could
                # not be bound never takes the lock on its way out.
                if built.worker.state == "STANDBY":
                    threading.Thread(target=park_and_promote, args=(built,), name="promotion", daemon=True).start()

        def handle_exit(self, sig, frame):
            # uvicorn swaps our SIGTERM handler for this one while it serves (ours runs only after the
            # drain): start draining now, so /health and the discovery records stop new work at once.
            _drain()
            super().handle_exit(sig, frame)

    server = _Server(server_config)
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
    install_injection(built.worker)  # UNDERSTUDY_FAULT_INJECTION=1 only: SIGUSR1/SIGUSR2/SIGURG arm a fault
    server.run()
    if built.memory_server is not None:
        built.memory_server.terminate()
        built.memory_server.wait(timeout=30)
    return exit_code

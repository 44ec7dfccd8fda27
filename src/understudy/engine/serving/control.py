"""Giving the device memory back and taking it again: the control routes, sleep / wake_up
(POST /engine/control/sleep and /engine/control/wake_up), and quiesce / resume around a snapshot.

`release_memory` and `restore_memory` are the one mechanism under all four routes (they run off the event
loop while the engine thread is stopped); `remap` answers for wake_up and resume alike. One control call
runs at a time (`app.state.control`, a lock that the memory watch takes too while it gives a restarted
memory service our memory back): a repeated call sees the first one's result.

Quiesce and resume (POST /engine/control/quiesce and /engine/control/resume):

A process image (CRIU) can hold only the engine's own state: no mapping of the memory service's
memory and no connection to another process. Quiescing a parked shadow (STANDBY) therefore uses
the sleep mechanism (release_memory): the engine thread stops, the weights are unmapped
with their address ranges kept reserved and the weights session is closed; the memory watch's
connection is closed too. A sleeping engine has released its memory already. Either way the state
becomes QUIESCED: nothing is admitted (requests wait as on a standby), and a promotion that gets the
failover lock meanwhile waits for the resume (Lifecycle.set_unquiesced). The listening socket stays;
the HTTP connection that asked is closed after the answer (the caller sends `Connection: close`), and
CRIU closes any other TCP connection in the image (`--tcp-close`).

Resume is the same call after a failed or finished checkpoint and in a restored process: a new
connection to the memory service, the weights remapped read-only at the same addresses (remap_all
compares the layout hash: a changed layout is a 409, state DEAD and exit code 3, as for wake_up),
then the engine parks again (STANDBY; its promotion thread is still waiting on the failover lock:
CRIU restarts the interrupted flock) or sleeps again. `activate` waits (bounded) until the engine is
ACTIVE, i.e. it got the failover lock, and answers 409 naming the holder otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import time

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from understudy.common.api import STRICT, error, error_responses
from understudy.engine.core.block_manager import BlockManager
from understudy.engine.serving.worker import Worker
from understudy.failover import exit_codes
from understudy.logs import log
from understudy.memory.client import LayoutChanged, MemoryServiceError

logger = logging.getLogger("understudy.engine.serving.control")

QUIESCIBLE = ("STANDBY", "SLEEPING")
WAKE_TIMEOUT = 30.0  # seconds wake_up waits for the pools (a republishing writer, another KV owner): then 503
MAX_ACTIVATE_WAIT = 3600.0  # resume's `timeout`: a longer (or infinite) wait is refused, not held open


def release_memory(worker: Worker) -> None:
    """Stop the engine thread, then unmap the weights and the KV (keeping their address ranges) and leave
    both pools: the weights' read lock goes (a writer may republish), the kv pool is free to own.

    A parked shadow maps no KV and owns no pool: only its weights go (a snapshot's quiesce)."""
    eng = worker.engine.engine
    owns_kv = not eng.kv.parked
    worker.engine.stop()  # it ends between steps: from here nothing touches weights or KV
    if owns_kv:
        eng.kv.write_index(eng.blocks.take_index_updates())  # nothing pending after a step; just in case
    if eng.device.type == "cuda":
        torch.cuda.synchronize(eng.device)  # no kernel may still read what we unmap
    worker.weights.unmap_all()
    worker.weights.disconnect()
    if owns_kv:
        eng.kv.release_pool()
        # The pool's blocks may change hands while we sleep: our prefix cache would lie. wake_up rebuilds
        # it from the sealed-block index in the pool.
        eng.blocks = eng.scheduler.blocks = BlockManager(eng.kv.spec.num_blocks, eng.kv.spec.block_size)
    if eng.device.type == "cuda":
        torch.cuda.empty_cache()  # activations and workspaces go back too


def restore_memory(worker: Worker) -> int:
    """Remap the weights at the same addresses (LayoutChanged if they are not the same any more), retake
    the kv pool and rebuild the prefix cache from its index. Returns the restored blocks. On failure
    nothing stays mapped or locked. A parked shadow only remaps its weights (it takes the pool when
    promoted)."""
    eng = worker.engine.engine
    weights = worker.weights
    weights.connect(WAKE_TIMEOUT)
    try:
        weights.remap_all()
        if not eng.kv.parked:
            eng.kv.retake_pool(WAKE_TIMEOUT)
    except BaseException:
        weights.unmap_all()
        weights.disconnect()
        raise
    return 0 if eng.kv.parked else eng.adopt_prefix_cache()


async def remap(worker: Worker, action: str, since: str, still: str) -> tuple[int, JSONResponse | None]:
    """restore_memory off the loop, for wake_up and resume: (restored blocks, None), or (0, the answer).

    Weights whose layout changed `since` cannot be used at our addresses: 409, state DEAD, and the process
    exits with code 3 once the answer is sent. A memory service that cannot be reached: 503, `still` as we were."""
    event = f"{action.replace(' ', '_')}_failed"
    try:
        return await asyncio.to_thread(restore_memory, worker), None
    except LayoutChanged as e:
        log(logger, event, logging.ERROR, reason="layout_changed", message=str(e))
        worker.lifecycle.set("DEAD")
        response = error(409, f"the weights layout changed {since} ({e}); this engine's tensors cannot point "
                              f"at the new one: exiting, start a new engine to serve the new weights",
                         type_="conflict_error")
        # After the answer is sent: the caller learns why before the process goes.
        response.background = BackgroundTask(worker.exit_process or os._exit, exit_codes.LAYOUT_CHANGED)
        return 0, response
    except (OSError, MemoryServiceError) as e:
        log(logger, event, logging.WARNING, reason=type(e).__name__, message=str(e))
        return 0, error(503, f"cannot {action}: {e}; still {still}", type_="unavailable_error",
                        headers={"Retry-After": "1"})


class ResumeRequest(BaseModel):
    model_config = ConfigDict(**STRICT)  # false is not a number of seconds

    activate: bool = False  # wait until the engine is ACTIVE (it took the failover lock)
    timeout: float = Field(default=30.0, ge=0, le=MAX_ACTIVATE_WAIT)  # seconds `activate` waits


def _trim_heap() -> None:
    """Give freed heap back to the kernel: every resident page of the process goes into the image."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _quiesce(worker: Worker, was: str) -> None:
    if was == "STANDBY":
        release_memory(worker)  # a sleeping engine did it already
    _trim_heap()


def _lock_holder(worker: Worker) -> str:
    for hold in worker.holds:
        if hasattr(hold, "holder"):
            return f"the failover lock {hold.path} is held by pid {hold.holder()}"
    return "the failover lock is held by another engine"


async def _stop_memory_watch(app: FastAPI) -> bool:
    """Close the memory watch's connection to the memory service (launch starts it); True if one ran."""
    task = getattr(app.state, "memory_watch", None)
    if task is None or task.done():
        return False
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return True


def _start_memory_watch(app: FastAPI, worker: Worker) -> None:
    from understudy.engine.serving.memory_watch import watch_memory_service

    # A snapshotted engine did not start its own memory service (checkpoint refuses one with children),
    # so there is nothing to restart from here.
    app.state.memory_watch = asyncio.create_task(
        watch_memory_service(worker, worker.weights.socket_path, app.state.control))


def add_control_routes(app: FastAPI, worker: Worker) -> None:
    """sleep / wake_up, quiesce / resume, under one lock (app.state.control, shared with the memory watch)."""
    app.state.control = asyncio.Lock()
    add_sleep_routes(app, worker)
    add_quiesce_routes(app, worker)


def _conflict(message: str) -> JSONResponse:
    return error(409, message, type_="conflict_error")


def add_sleep_routes(app: FastAPI, worker: Worker) -> None:
    control: asyncio.Lock = app.state.control

    @app.post("/engine/control/sleep", responses=error_responses(409))
    async def sleep():
        """Unmap the weights and the KV cache, keeping their addresses, and leave both pools.

        Only an ACTIVE engine sleeps (SLEEPING: 200, nothing to do; otherwise 409). Requests in flight
        are neither aborted nor waited for: the answer is 409 and the engine stays active (drain it
        first). Once asleep, new requests wait in _admit as on a standby (up to --standby-wait, then 503)."""
        async with control:
            if worker.state == "SLEEPING":
                return {"state": "SLEEPING", "changed": False}
            if worker.state != "ACTIVE":
                return _conflict(f"engine is {worker.state}: only an active engine can sleep")
            if worker.weights is None:  # not built by launch.build_engine: its weights are not ours to unmap
                return _conflict("this engine's weights do not come from a memory service")
            if worker.info.get("tensor_parallel", 1) > 1:  # only rank 0's memory would go (parallel/group.py)
                return _conflict("sleep is not supported with --tensor-parallel")
            if worker.engine.num_requests:
                return _conflict(f"{worker.engine.num_requests} requests in flight: drain the engine, then "
                                 f"retry (they are not aborted)")
            t0 = time.perf_counter()
            worker.lifecycle.set("SLEEPING")  # before any await: nothing is admitted from here on
            await asyncio.to_thread(release_memory, worker)
            seconds = round(time.perf_counter() - t0, 4)
            log(logger, "asleep", seconds=seconds)
            return {"state": "SLEEPING", "changed": True, "seconds": seconds}

    @app.post("/engine/control/wake_up", responses=error_responses(409, 503))
    async def wake_up():
        """Remap the weights and the KV cache at the addresses they had, and serve again.

        SLEEPING -> ACTIVE (ACTIVE: 200, nothing to do; otherwise 409). The KV cache is adopted if the kv
        pool still has our layout, else started afresh (it is a cache). Weights whose layout changed
        while we slept cannot be used at our addresses: 409, state DEAD, and the process exits with code
        3 once the answer is sent. A memory service that cannot be reached or locked: 503, still asleep."""
        async with control:
            if worker.state == "ACTIVE":
                return {"state": "ACTIVE", "changed": False}
            if worker.state != "SLEEPING":
                return _conflict(f"engine is {worker.state}: only a sleeping engine wakes up")
            t0 = time.perf_counter()
            restored, refusal = await remap(worker, "wake up", "while the engine slept", "sleeping")
            if refusal is not None:
                return refusal
            worker.engine.start()  # on this loop: it delivers the engine's outputs here
            kv = worker.engine.engine.kv
            seconds = round(time.perf_counter() - t0, 4)
            worker.lifecycle.set("ACTIVE", kv_adopted=kv.adopted, restored_blocks=restored, seconds=seconds)
            return {"state": "ACTIVE", "changed": True, "kv_adopted": kv.adopted, "restored_blocks": restored,
                    "seconds": seconds}


def add_quiesce_routes(app: FastAPI, worker: Worker) -> None:
    control: asyncio.Lock = app.state.control  # shared with sleep / wake_up and the memory watch
    quiesced: dict = {}  # while QUIESCED: the state to go back to, whether a memory watch ran

    @app.post("/engine/control/quiesce", responses=error_responses(409, 500))
    async def quiesce():
        """Unmap the weights (keeping their addresses) and close every memory-service connection, for a
        snapshot. STANDBY or SLEEPING -> QUIESCED (QUIESCED: 200, nothing to do; otherwise 409)."""
        async with control:
            if worker.state == "QUIESCED":
                return {"state": "QUIESCED", "changed": False, "previous": quiesced.get("was"), "pid": os.getpid()}
            if worker.weights is None:
                return _conflict("this engine's weights do not come from a memory service")
            if worker.info.get("tensor_parallel", 1) > 1:  # a group is several processes (parallel/group.py)
                return _conflict("quiesce (snapshots) is not supported with --tensor-parallel")
            t0 = time.perf_counter()
            was = worker.lifecycle.swap(QUIESCIBLE, "QUIESCED")  # atomic with a promotion's WAKING
            if was is None:
                return _conflict(f"engine is {worker.state}: only a parked (STANDBY) or sleeping engine can be "
                                 f"quiesced for a snapshot")
            quiesced.update(was=was, watch=await _stop_memory_watch(app))
            try:
                await asyncio.to_thread(_quiesce, worker, was)
            except BaseException as e:
                log(logger, "quiesce_failed", logging.ERROR, message=str(e))
                worker.lifecycle.set("DEAD")
                response = error(500, f"quiesce failed ({e}): the engine exits", type_="internal_error")
                response.background = BackgroundTask(worker.exit_process or os._exit, exit_codes.LAYOUT_CHANGED)
                return response
            seconds = round(time.perf_counter() - t0, 4)
            log(logger, "quiesced", previous=was, seconds=seconds)
            return {"state": "QUIESCED", "changed": True, "previous": was, "pid": os.getpid(), "seconds": seconds}

    @app.post("/engine/control/resume", responses=error_responses(400, 409, 413, 503))
    async def resume(body: ResumeRequest | None = None):
        """Reconnect to the memory service, remap the weights at the same addresses and go back to the
        state before quiesce (after a checkpoint, or in a restored process). With activate: wait until
        ACTIVE (409 if another engine holds the failover lock)."""
        body = body or ResumeRequest()
        async with control:
            changed = worker.state == "QUIESCED"
            t0 = time.perf_counter()
            if changed:
                was = quiesced["was"]
                if was == "STANDBY":
                    _, refusal = await remap(worker, "resume", "since the snapshot", "quiesced")
                    if refusal is not None:
                        return refusal
                    worker.engine.start()  # on this loop: it delivers the engine's outputs here
                if quiesced.get("watch"):
                    _start_memory_watch(app, worker)
                quiesced.clear()
                seconds = round(time.perf_counter() - t0, 4)
                worker.lifecycle.set(was, resumed=True, seconds=seconds)
                log(logger, "resumed", state=was, seconds=seconds)
            elif worker.state not in ("STANDBY", "SLEEPING", "WAKING", "ACTIVE"):
                return _conflict(f"engine is {worker.state}: nothing to resume")
        if body.activate and not await worker.lifecycle.wait_active(body.timeout):
            return _conflict(f"engine is {worker.state}, not active after {body.timeout} s: {_lock_holder(worker)}")
        return {"state": worker.state, "changed": changed, "pid": os.getpid(),
                "seconds": round(time.perf_counter() - t0, 4)}

"""The engine on its own thread, with an asyncio face for the HTTP server.

Requests and aborts go to the engine thread through a queue and take effect
between steps; each step's tokens come back to the request's asyncio queue.
The thread sleeps on the queue when there is no work (no polling).

A step that raises ends the engine, not only its thread: `on_failure` (serving/faults.FailFast) is called
on the engine thread and takes the process down; every request still waiting for tokens gets EngineDead.
`step_started` says, without a lock, since when the engine thread has been inside one step (the
watchdog's and /live's only input).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import sys
import threading
import time
from typing import AsyncIterator, Callable

import torch
import torch.nn.functional as F

from understudy.logs import log
from understudy.engine.core.llm_engine import LLMEngine, StepOutput
from understudy.engine.core.sampling import SamplingParams

logger = logging.getLogger("understudy.engine")

_DEAD = object()  # put into every open stream when the engine fails

# The engine thread and the HTTP loop share the GIL. While a step runs Python (an eager launch, sampling) the
# loop gets the GIL back only when the engine thread is asked to drop it, after the switch interval (5 ms by
# default), and sending one streamed token takes the loop several such waits: tokens reached clients tens of
# ms after their step. A shorter interval bounds each wait; the engine thread loses little (it mostly waits
# on the GPU with the GIL released).
GIL_SWITCH_INTERVAL_S = 0.0005


class EngineDead(RuntimeError):
    """The engine failed (a step raised, or it hung): it takes no request and finishes none. `exit`: how
    the process ends (failover/exit_codes.NAMES: step_error, watchdog, device_fault)."""

    def __init__(self, reason: str | None, exit: str | None = None):
        super().__init__(reason or "the engine failed")
        self.exit = exit or "step_error"


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.Future]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.last_step_s = 0.0
        self.step_started = 0.0  # time.monotonic() when the running step began; 0.0 between steps
        self.failure: str | None = None  # why the engine failed, once it has
        self.failure_exit: str | None = None  # and how the process ends (serving/faults.FailFast sets both)
        # Called on the engine thread with the exception a step raised (serving/faults.FailFast.step_failed:
        # it ends the process). Without it the thread ends and the open requests get EngineDead.
        self.on_failure: Callable[[BaseException], None] | None = None

    def start(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._commands.put(("stop",))
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def step_seconds(self) -> float:
        """How long the engine thread has been inside its current step (0.0 between steps). Lock-free."""
        started = self.step_started
        return time.monotonic() - started if started else 0.0

    def fail_all(self, reason: str) -> None:
        """On the loop: the engine is dead; every request gets EngineDead, now and from now on."""
        self.failure = reason
        for stream, accepted in list(self._streams.values()):
            _settle(accepted, EngineDead(self.failure, self.failure_exit))
            stream.put_nowait(_DEAD)

    async def generate(self, prompt: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """Stream a request's tokens. Leaving the iterator early aborts the request.

        Raises ValueError (bad request), QueueFull (shed load) before the first token; EngineDead when the
        engine failed (before or after the first token)."""
        if self.failure is not None:
            raise EngineDead(self.failure, self.failure_exit)
        rid = request_id or f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        accepted = self._loop.create_future()
        self._streams[rid] = (stream, accepted)
        self._commands.put(("add", rid, prompt, params, accepted))
        finished = False
        try:
            await accepted  # raises what add_request raised
            while True:
                out = await stream.get()
                if out is _DEAD:
                    raise EngineDead(self.failure, self.failure_exit)
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._commands.put(("abort", rid))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # -- the engine thread -------------------------------------------------------
    def _prime(self) -> None:
        """Make this thread's cuBLAS / cuBLASLt handles now: PyTorch keeps them per thread, and
        creating them on the first request costs ~90 ms (seen on an H100 right after a failover)."""
        device = self.engine.device
        if device.type != "cuda":
            return
        torch.cuda.set_device(device)
        dtype = next(self.engine.model.parameters()).dtype
        x = torch.ones(4, 64, device=device, dtype=dtype)
        w = torch.ones(64, 64, device=device, dtype=dtype)
        F.linear(x, w)
        F.linear(x, w, torch.ones(64, device=device, dtype=dtype))
        torch.cuda.synchronize(device)

    def _run(self) -> None:
        try:
            self._prime()
            self._serve()
        except BaseException as e:  # noqa: BLE001 - a failed step (or prime) ends the engine, not just this thread
            if self.on_failure is not None:
                self.on_failure(e)  # classifies, sets failure / failure_exit, ends the process
            else:
                self.failure = f"{type(e).__name__}: {e}"
                logger.error("engine_failed", exc_info=e)
                self._loop.call_soon_threadsafe(self.fail_all, self.failure)

    def _serve(self) -> None:
        while True:
            # Block for a command only when idle; otherwise take what is there and step.
            try:
                cmd = self._commands.get(block=not self.engine.has_work)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    return
                self._apply(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.has_work:
                timed = self.engine.timed_steps > 0  # (the first steps after a promotion)
                t0 = time.perf_counter()
                self.step_started = time.monotonic()
                outputs = self.engine.step()  # stays set if it raises: the step never ended
                self.step_started = 0.0
                self.last_step_s = time.perf_counter() - t0
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs, time.perf_counter() if timed else None)

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params, accepted = cmd
            try:
                self.engine.add_request(rid, prompt, params)
                error = None
            except Exception as e:
                error = e
            self._loop.call_soon_threadsafe(_settle, accepted, error)
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])

    def _deliver(self, outputs: list[StepOutput], stepped_at: float | None = None) -> None:
        if stepped_at is not None:  # a timed step's tokens: how long they waited for the HTTP loop
            log(logger, "step_delivered", lag_ms=round((time.perf_counter() - stepped_at) * 1e3, 3),
                outputs=len(outputs))
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                entry[0].put_nowait(out)


def _settle(fut: asyncio.Future, error: Exception | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)

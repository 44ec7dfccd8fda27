"""The engine on its own thread, with an asyncio face for the HTTP server.

Requests and aborts go to the engine thread through a queue and take effect
between steps; each step's tokens come back to the request's asyncio queue.
The thread sleeps on the queue when there is no work (no polling).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator

import torch
import torch.nn.functional as F

from understudy.engine.core.llm_engine import LLMEngine, StepOutput
from understudy.engine.core.sampling import SamplingParams

logger = logging.getLogger("understudy.engine")


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.last_step_s = 0.0

    def start(self) -> None:
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

    async def generate(self, prompt: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """Stream a request's tokens. Leaving the iterator early aborts the request.

        Raises ValueError (bad request), QueueFull (shed load) before the first token."""
        rid = request_id or f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        accepted = self._loop.create_future()
        self._streams[rid] = stream
        self._commands.put(("add", rid, prompt, params, accepted))
        finished = False
        try:
            await accepted  # raises what add_request raised
            while True:
                out: StepOutput = await stream.get()
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
        self._prime()
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
                t0 = time.perf_counter()
                outputs = self.engine.step()
                self.last_step_s = time.perf_counter() - t0
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)

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

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)


def _settle(fut: asyncio.Future, error: Exception | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)

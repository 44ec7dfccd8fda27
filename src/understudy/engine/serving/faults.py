"""Failing fast: an engine whose step raised, whose step hangs, or whose device is broken leaves at once, so
that the shadow takes over as for a kill (docs/failover.md, "Faults").

Who calls `FailFast.fail`:

    the engine thread      a step raised (AsyncEngine.on_failure = step_failed): STEP_ERROR, or DEVICE_FAULT
                           when the error says the device is broken (failover/faults.device_fault)
    the watchdog thread    one step has run longer than --step-timeout: WATCHDOG (its own thread: the engine
                           thread is the one stuck, and the event loop may be too)
    the promotion thread   a shadow got the failover lock of a device marked faulty: DEVICE_FAULT

and what it does, in this order (once; a second caller returns at once):

 1. logs `engine_failed` (level error: the exit code's name, the reason, the traceback);
 2. a device fault: writes the device's fault marker next to the failover lock (before the lock goes, so
    the shadow that gets the lock sees it);
 3. DEAD, with the reason: /health answers 503 and says why, registries hear it, requests held for ACTIVE
    are refused (503) at once;
 4. lets go of what the shadow needs, without waiting for the process to end: a tensor-parallel group's
    other ranks are killed (LLMEngine.abandon), the kv pool's session is closed (the pool is free for the
    shadow's adopt), then the failover lock is released: the shadow starts waking now;
 5. ends every open request on the event loop (AsyncEngine.fail_all): one not yet answered gets a 503 +
    Retry-After (the frontend sends it elsewhere), a token stream that has begun ends without its final
    line (the frontend sees a broken stream and migrates it with the tokens so far), an OpenAI SSE stream
    gets an error event;
 6. waits until those responses have ended (at most GRACE_S), then leaves with the exit code without the
    interpreter's teardown (failover/faults.exit_now): no waiting on CUDA or NCCL.

`liveness` is /live: 503 once the engine thread has been inside one step for longer than `live_bound`, so
a node's probe catches a step that hangs before the watchdog does (200 otherwise, also while DEAD: the
process is leaving by itself, with an exit status the node must read). Reads two floats, takes no lock.

Fault injection (tests, bench/chaos): with UNDERSTUDY_FAULT_INJECTION=1 in the engine's environment,
SIGUSR1 makes the next step raise an ordinary error, SIGUSR2 a device fault (a RuntimeError with CUDA's
"uncorrectable ECC error encountered"), SIGURG makes the next step hang in the engine thread (the process
and its event loop go on). Signals need the engine's uid: no HTTP route can do this. UNDERSTUDY_FAULT_LINGER_S
keeps a failed engine DEAD (lock released, requests ended) that many seconds before it exits, so that a
test can watch /health say so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from understudy.engine.serving.worker import Worker
from understudy.failover import exit_codes
from understudy.failover.faults import device_fault, exit_now, write_marker
from understudy.failover.lock import FailoverLock
from understudy.logs import log

logger = logging.getLogger("understudy.engine.serving.faults")

GRACE_S = 0.5  # at most this long for the open responses to end before the process leaves
# --step-timeout's default: far above the longest legitimate step, a prefill chunk of --max-num-batched-tokens
# (2048) tokens: ~0.1 s for an 8B model on an H100 (2 x 8e9 x 2048 FLOP at a few hundred TFLOP/s, not
# measured); 22.6 s measured for the default model on one CPU thread (4.5 s for 450 tokens).
DEFAULT_STEP_TIMEOUT = {"cuda": 60.0, "cpu": 600.0}
# /live fails when one step has run longer than max(LIVE_FLOOR_S, LIVE_FACTOR x the slowest step so far),
# and never later than half --step-timeout (so the node's probe sees a hang before the watchdog fires).
LIVE_FLOOR_S = 5.0
LIVE_FACTOR = 20.0

INJECTION_ENV = "UNDERSTUDY_FAULT_INJECTION"
LINGER_ENV = "UNDERSTUDY_FAULT_LINGER_S"
INJECTIONS = {signal.SIGUSR1: "error", signal.SIGUSR2: "device", signal.SIGURG: "hang"}
INJECTED_DEVICE_FAULT = "CUDA error: uncorrectable ECC error encountered"  # cudaErrorECCUncorrectable's text


def live_bound(step_timeout: float, slowest_step_s: float) -> float:
    """Seconds one step may run before /live says the engine is stuck."""
    bound = max(LIVE_FLOOR_S, LIVE_FACTOR * slowest_step_s)
    return min(bound, step_timeout / 2) if step_timeout > 0 else bound


def liveness(worker: Worker) -> tuple[bool, dict[str, Any]]:
    """(live?, /live's body). Not live: stuck in one step for longer than live_bound. A DEAD engine is live
    (200, status "exiting"): it leaves on its own within a second, and a probe that killed it meanwhile
    would replace its exit status (step error, device fault) with a signal."""
    if worker.state == "DEAD":
        return True, {"status": "exiting", "reason": worker.failure or "the engine is DEAD"}
    step_s = worker.engine.step_seconds()
    if step_s:
        bound = live_bound(worker.step_timeout, worker.engine.engine.slowest_step_s)
        if step_s > bound:
            return False, {"status": "stuck", "step_s": round(step_s, 3), "bound_s": round(bound, 3),
                           "reason": f"the engine thread has been inside one step for {step_s:.1f} s "
                                     f"(bound {bound:.1f} s)"}
    return True, {"status": "alive"}


def injection_enabled() -> bool:
    return os.environ.get(INJECTION_ENV) == "1"


class FailFast:
    """One engine's way out after a fault (see the module's docstring)."""

    def __init__(self, worker: Worker, lock: FailoverLock):
        self.worker = worker
        self.lock = lock
        self.loop: asyncio.AbstractEventLoop | None = None
        self._once = threading.Lock()
        self.linger_s = float(os.environ.get(LINGER_ENV) or 0) if injection_enabled() else 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serving starts: step errors now end the process; the watchdog runs (unless --step-timeout 0)."""
        self.loop = loop
        self.worker.engine.on_failure = self.step_failed
        if self.worker.step_timeout > 0:
            threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    # -- the three faults --------------------------------------------------------------------------
    def step_failed(self, error: BaseException) -> None:
        """On the engine thread: a step raised."""
        broken = device_fault(error)
        kind = "device fault" if broken else "step error"
        self.fail(exit_codes.DEVICE_FAULT if broken else exit_codes.STEP_ERROR,
                  f"{kind}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                  error=error, device=broken)

    def device_faulted(self, marker: dict) -> None:
        """On the promotion thread: we got the failover lock of a device marked faulty."""
        self.fail(exit_codes.DEVICE_FAULT, f"device fault: {marker.get('reason')}", marker=marker.get("path"),
                  marked_by=marker.get("pid"))

    def _watch(self) -> None:
        """The watchdog: ends the process when one step has run longer than --step-timeout. Steps only run
        on a serving engine with work, so start-up, warm-up, graph capture, a parked shadow, a sleeping or
        an idle engine never trip it."""
        timeout = self.worker.step_timeout
        engine = self.worker.engine
        every = min(0.5, timeout / 10)
        while True:
            time.sleep(every)
            started = engine.step_started
            if started and (running := time.monotonic() - started) > timeout:
                self.fail(exit_codes.WATCHDOG, f"watchdog: a step has run for {running:.1f} s, longer than "
                                                f"--step-timeout {timeout:g} s", step_s=round(running, 3),
                          engine_stack=self._engine_stack())
                return

    def _engine_stack(self) -> str:
        """Where the engine thread is stuck (for the log)."""
        thread = self.worker.engine.thread
        frame = sys._current_frames().get(thread.ident) if thread is not None else None
        return "".join(traceback.format_stack(frame)[-12:]) if frame is not None else "?"

    # -- the way out ---------------------------------------------------------------------------------
    def fail(self, code: int, reason: str, *, error: BaseException | None = None, device: str | None = None,
             **fields) -> None:
        """DEAD, the shadow's way cleared, the open requests ended, exit `code` (see the module's
        docstring). Returns only to a second caller while the first is at it."""
        if not self._once.acquire(blocking=False):
            return
        t0 = time.monotonic()
        worker = self.worker
        worker.failure = reason
        worker.engine.failure = reason  # new requests get EngineDead (with the reason) at once
        worker.engine.failure_exit = exit_codes.NAMES.get(code, str(code))
        logger.error("engine_failed", exc_info=error, extra={"fields": {
            "exit_code": code, "exit": exit_codes.NAMES.get(code, str(code)), "reason": reason,
            "state": worker.state, "lock": str(self.lock.path), **fields}})
        if device is not None:  # before the lock goes: the shadow that gets it must see the marker
            try:
                path = write_marker(self.lock.path, device, error=reason, exit_code=code)
                log(logger, "device_marked_faulty", logging.ERROR, marker=str(path), device=device)
            except OSError as e:
                log(logger, "device_marker_failed", logging.ERROR, error=str(e))
        worker.lifecycle.set("DEAD", reason=reason)
        for let_go in (worker.engine.engine.abandon, self._close_kv, self.lock.release):
            try:
                let_go()
            except Exception:  # noqa: BLE001 - nothing may keep us here
                logger.exception("let_go_failed")
        log(logger, "failover_lock_released", lock=str(self.lock.path), after_s=round(time.monotonic() - t0, 4))
        self._end_requests(reason)
        if self.linger_s:  # fault injection only: stay DEAD a while (tests read /health)
            log(logger, "fault_linger", seconds=self.linger_s)
            time.sleep(self.linger_s)
        log(logger, "exiting", exit_code=code, exit=exit_codes.NAMES.get(code, str(code)),
            after_s=round(time.monotonic() - t0, 4))
        exit_now(code)

    def _close_kv(self) -> None:
        """Close our session of the kv pool (its mappings stay, nothing writes them any more): the shadow
        adopting the pool does not wait for our exit."""
        client = self.worker.engine.engine.kv.client
        if client is not None:
            client.disconnect()

    def _end_requests(self, reason: str) -> None:
        """On the loop: EngineDead to every open request; wait (bounded) until their responses ended."""
        engine = self.worker.engine

        async def end() -> None:
            engine.fail_all(reason)
            deadline = time.monotonic() + GRACE_S
            while engine.num_requests and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            for _ in range(3):  # the responses' tasks send their last bytes
                await asyncio.sleep(0)

        if self.loop is None or self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(end(), self.loop).result(timeout=GRACE_S + 0.25)
        except Exception as e:  # noqa: BLE001 - a stuck loop: leave anyway
            log(logger, "requests_not_ended", logging.WARNING, error=f"{type(e).__name__}: {e}",
                open=engine.num_requests)


# -- fault injection ---------------------------------------------------------------------------------------

def install_injection(worker: Worker) -> bool:
    """With UNDERSTUDY_FAULT_INJECTION=1: SIGUSR1 / SIGUSR2 / SIGURG arm a fault for the next step (call
    from the main thread). Returns whether it is on."""
    if not injection_enabled():
        return False
    engine = worker.engine.engine

    def arm(kind: str, signame: str):
        def handler(signum, frame) -> None:
            engine.fault_hook = lambda: _inject(engine, kind, signame)
            log(logger, "fault_armed", logging.WARNING, kind=kind, signal=signame)
        return handler

    for sig, kind in INJECTIONS.items():
        signal.signal(sig, arm(kind, sig.name))
    log(logger, "fault_injection_on", logging.WARNING, **{sig.name: kind for sig, kind in INJECTIONS.items()},
        linger_s=float(os.environ.get(LINGER_ENV) or 0))
    return True


def _inject(engine, kind: str, signame: str) -> None:
    """Inside a step, on the engine thread."""
    engine.fault_hook = None
    log(logger, "fault_injected", logging.WARNING, kind=kind, signal=signame)
    if kind == "error":
        raise RuntimeError(f"injected step error ({signame}, {INJECTION_ENV}=1)")
    if kind == "device":
        raise RuntimeError(f"{INJECTED_DEVICE_FAULT} (injected: {signame}, {INJECTION_ENV}=1)")
    threading.Event().wait()  # "hang": this step never ends (the watchdog's business)

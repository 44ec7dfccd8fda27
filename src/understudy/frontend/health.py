"""Watching engines: a poller per engine reads /health every interval (at once when poked), and
optional canaries (a one-token request) check that idle active engines still generate."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx

from understudy.logs import log
from understudy.frontend.metrics import FrontendMetrics
from understudy.frontend.pool import EngineState, Pool

logger = logging.getLogger("understudy.frontend.health")

CANARY_PROMPT = [0]  # any id below the vocabulary size: one prompt token, one generated token


class HealthMonitor:
    def __init__(self, pool: Pool, http: httpx.AsyncClient, metrics: FrontendMetrics, *, interval: float,
                 timeout: float, canary_interval: float = 0.0, canary_timeout: float = 10.0):
        self.pool, self.http, self.metrics = pool, http, metrics
        self.interval, self.timeout = interval, timeout
        self.canary_interval, self.canary_timeout = canary_interval, canary_timeout
        self._tasks: set[asyncio.Task] = set()
        pool.on_added.append(self._watch)

    def _watch(self, engine: EngineState) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(engine), name=f"health {engine.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, engine: EngineState) -> None:
        last_canary = time.monotonic()
        while not engine.removed:
            engine.poke.clear()
            await self.poll(engine)
            if (self.canary_interval > 0 and engine.reachable and engine.state == "ACTIVE"
                    and time.monotonic() - last_canary >= self.canary_interval
                    and self.pool.idle_for(engine) >= self.canary_interval
                    and engine.running == 0 and engine.waiting == 0):
                last_canary = time.monotonic()
                await self.canary(engine)
            try:
                await asyncio.wait_for(engine.poke.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def poll(self, engine: EngineState) -> None:
        was = engine.status
        try:
            r = await self.http.get(f"{engine.url}/health", timeout=self.timeout)
            body = r.json()  # 503 bodies (DRAINING, DEAD) carry the state too
            if not isinstance(body, dict) or "state" not in body:
                raise ValueError(f"not an engine's /health answer (HTTP {r.status_code})")
            engine.polled_ok(body)
        except (httpx.HTTPError, ValueError) as e:
            engine.reachable = False
            if was != "UNREACHABLE":
                log(logger, "engine_unreachable", logging.WARNING, id=engine.id, url=engine.url,
                    error=f"{type(e).__name__}: {e}")
        if engine.status != was:
            log(logger, "engine_status", id=engine.id, old=was, new=engine.status)

    async def canary(self, engine: EngineState) -> None:
        body = {"token_ids": CANARY_PROMPT, "sampling": {"max_tokens": 1, "temperature": 0}}
        t0 = time.perf_counter()
        try:
            r = await self.http.post(f"{engine.url}/engine/generate", json=body, timeout=self.canary_timeout)
            lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
            if r.status_code != 200 or not lines or lines[-1].get("error") or not lines[-1].get("finish_reason"):
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            ok, error = True, None
        except Exception as e:  # noqa: BLE001 - any failure is the canary's answer
            ok, error = False, f"{type(e).__name__}: {e}"
        self.metrics.canaries.labels("passed" if ok else "failed").inc()
        if ok != engine.healthy:
            engine.healthy = ok
            log(logger, "canary_passed" if ok else "canary_failed", logging.INFO if ok else logging.WARNING,
                id=engine.id, url=engine.url, seconds=round(time.perf_counter() - t0, 4), error=error)

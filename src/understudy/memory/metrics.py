"""Prometheus metrics of a memory service, read from its status at scrape time.

Nothing is stored twice: the collector asks the server (inside its event loop,
so it never sees a half-updated state) and turns the status into samples.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

POOL_STATES = ("EMPTY", "RW", "COMMITTED", "RO")


class MemoryServiceCollector(Collector):
    def __init__(self, server, loop: asyncio.AbstractEventLoop):
        self.server = server
        self.loop = loop
        self.event_counts: Counter[tuple[str, str]] = Counter()
        server.events.subscribers.append(self._count)

    def _count(self, event: dict) -> None:
        self.event_counts[(event["pool"] or "", event["event"])] += 1

    def _status(self) -> tuple[dict, dict]:
        async def read():
            return self.server.status(), dict(self.event_counts)

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(timeout=10)

    def collect(self):
        status, counts = self._status()
        labels = {"identity": status["identity"], "backend": status["backend"]}
        names, values = list(labels), list(labels.values())
        g = GaugeMetricFamily("understudy_memory_bytes_in_use", "Bytes allocated by the memory service",
                              labels=names)
        g.add_metric(values, status["bytes_in_use"])
        yield g
        state = GaugeMetricFamily("understudy_memory_pool_state", "1 for the pool's current state",
                                  labels=names + ["pool", "state"])
        pool_bytes = GaugeMetricFamily("understudy_memory_pool_bytes", "Bytes in the pool's layout",
                                       labels=names + ["pool"])
        readers = GaugeMetricFamily("understudy_memory_pool_readers", "Read-only sessions of the pool",
                                    labels=names + ["pool"])
        waiting = GaugeMetricFamily("understudy_memory_pool_waiting", "Sessions waiting for the pool's lock",
                                    labels=names + ["pool", "mode"])
        for pool, info in status["pools"].items():
            for s in POOL_STATES:
                state.add_metric(values + [pool, s], 1.0 if info["state"] == s else 0.0)
            pool_bytes.add_metric(values + [pool], info["bytes"])
            readers.add_metric(values + [pool], len(info["readers"]))
            waiting.add_metric(values + [pool, "rw"], info["waiting_writers"])
            waiting.add_metric(values + [pool, "ro"], info["waiting_readers"])
        yield from (state, pool_bytes, readers, waiting)
        sessions = GaugeMetricFamily("understudy_memory_sessions", "Open connections", labels=names)
        sessions.add_metric(values, len(status["sessions"]))
        yield sessions
        events = CounterMetricFamily("understudy_memory_events", "Pool events since start (committed, aborted, "
                                     "oom_retry, ...)", labels=names + ["pool", "event"])
        for (pool, kind), n in sorted(counts.items()):
            events.add_metric(values + [pool, kind], n)
        yield events


def serve_metrics(server, loop: asyncio.AbstractEventLoop, port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on host:port from a background thread."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(MemoryServiceCollector(server, loop))
    start_http_server(port, addr=host, registry=registry)

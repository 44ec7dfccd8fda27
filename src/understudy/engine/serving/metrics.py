"""The engine's Prometheus metrics, in a registry of its own (one per app): request counters and latency
histograms that the generation routes feed, and gauges read from the engine and its lifecycle at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from understudy.common.states import STATES
from understudy.engine.serving.worker import Worker

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


class EngineMetrics:
    def __init__(self, worker: Worker):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("understudy_engine_requests", "Finished requests", ["endpoint", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("understudy_engine_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter("understudy_engine_cached_prompt_tokens", "Prompt tokens found in the "
                                     "prefix cache", registry=r)
        self.generated = Counter("understudy_engine_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("understudy_engine_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("understudy_engine_inter_token_latency_seconds", "Time between tokens of a stream",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(worker))


class _EngineCollector(Collector):
    def __init__(self, worker: Worker):
        self.worker = worker

    def collect(self):
        eng = self.worker.engine.engine
        for name, doc, value in [
            ("understudy_engine_running_requests", "Requests being computed", len(eng.scheduler.running)),
            ("understudy_engine_waiting_requests", "Requests waiting to be scheduled", len(eng.scheduler.waiting)),
            ("understudy_engine_kv_cache_usage", "Fraction of KV blocks in use", eng.blocks.usage),
            ("understudy_engine_kv_cache_blocks", "KV blocks in the cache", eng.blocks.num_blocks),
            ("understudy_engine_preemptions", "Sequences preempted for lack of KV blocks",
             eng.scheduler.preemptions),
        ]:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        state = GaugeMetricFamily("understudy_engine_state", "1 for the engine's lifecycle state", labels=["state"])
        for s in STATES:
            state.add_metric([s], 1.0 if self.worker.state == s else 0.0)
        yield state
        life = self.worker.lifecycle
        transitions = CounterMetricFamily("understudy_engine_state_transitions", "Lifecycle transitions",
                                          labels=["from", "to"])
        for (old, new), n in sorted(life.transitions.items()):
            transitions.add_metric([old, new], n)
        yield transitions
        failovers = CounterMetricFamily("understudy_engine_failovers", "Promotions of this engine to active")
        failovers.add_metric([], life.failovers)
        yield failovers
        if life.last_switch_s is not None:
            switch = GaugeMetricFamily("understudy_engine_last_switch_seconds",
                                       "Failover lock acquired -> serving, on the last promotion")
            switch.add_metric([], life.last_switch_s)
            yield switch

"""The frontend's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from understudy.common.states import STATES

if TYPE_CHECKING:
    from understudy.frontend.router import Router

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
ENGINE_STATUSES = (*STATES, "UNREACHABLE", "UNHEALTHY", "SUSPECT")


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("understudy_frontend_requests", "Finished requests by outcome (stop, length, "
                                "cancelled, rejected, invalid, failed, error)", ["endpoint", "outcome"], registry=r)
        self.ttft = Histogram("understudy_frontend_time_to_first_token_seconds",
                              "Request arrival to the first token sent to the client", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("understudy_frontend_inter_token_latency_seconds",
                             "Time between tokens of one answer (a migration's gap included)",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.migrations = Counter("understudy_frontend_migrations", "Requests resent to another engine, by why "
                                  "(stream_broken, unreachable, refused, stalled, engine_failed)", ["reason"],
                                  registry=r)
        self.migration_failures = Counter("understudy_frontend_migration_failures", "Broken requests that could "
                                          "not move (disabled, limit, max_seq_len, no_engine)", ["reason"],
                                          registry=r)
        self.migrated_tokens = Counter("understudy_frontend_migrated_tokens", "Tokens resent as prompt (prompt + "
                                       "generated so far) by migrations", registry=r)
        self.cancellations = Counter("understudy_frontend_cancellations", "Requests whose client went away "
                                     "(the engine's work is cancelled)", ["endpoint"], registry=r)
        self.rejections = Counter("understudy_frontend_rejections", "Requests answered 503 (all_busy, no_engine, "
                                  "draining)", ["reason"], registry=r)
        self.retries = Counter("understudy_frontend_retries", "Requests sent to another engine before any token, "
                               "because one was unreachable or refused with 503", registry=r)
        self.stalls = Counter("understudy_frontend_stalled_streams", "Streams that got no token from their engine "
                              "for --stall-timeout (--stream-timeout before the first)", registry=r)
        self.canaries = Counter("understudy_frontend_canaries", "Canary requests by result", ["result"], registry=r)
        self.inflight = Gauge("understudy_frontend_inflight_requests", "Requests being answered", registry=r)

    def watch_engines(self, router: "Router") -> None:
        self.registry.register(_EngineCollector(router))


class _EngineCollector(Collector):
    def __init__(self, router: "Router"):
        self.router = router

    def collect(self):
        by_status = GaugeMetricFamily("understudy_frontend_engines", "Engines known through discovery, by state "
                                      "(UNREACHABLE / UNHEALTHY when polls / canaries fail, SUSPECT after a "
                                      "stalled stream)", labels=["state"])
        engines = list(self.router.pool)
        for status in ENGINE_STATUSES:
            by_status.add_metric([status], sum(e.status == status for e in engines))
        yield by_status
        busy = GaugeMetricFamily("understudy_frontend_engines_busy", "Active engines over a busy threshold")
        busy.add_metric([], sum(self.router.busy(e) for e in self.router.active()))
        yield busy
        for name, value in (("kv_usage", self.router.thresholds.kv_usage),
                            ("waiting", self.router.thresholds.waiting)):
            g = GaugeMetricFamily(f"understudy_frontend_busy_threshold_{name}", f"Busy threshold on {name}")
            g.add_metric([], value)
            yield g

"""Prometheus metrics of a server (``prometheus_client``, one registry per app, scraped at ``/metrics``).

Latency histograms are observed by the HTTP handlers; the scheduler's counters and the KV pool's
occupancy are read from the engine at scrape time by a collector (plain integer reads of the engine
thread's state: a scrape may see a pass half-counted, never a torn value).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from deepshard.serve.engine import ServeEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    def __init__(self, engine: ServeEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        sched = self.engine.scheduler
        for name, value in sched.counters.as_dict().items():
            yield CounterMetricFamily(f"deepshard_scheduler_{name}", f"scheduler counter {name}", value=value)
        alloc = sched.allocator
        yield GaugeMetricFamily(
            "deepshard_requests_running", "sequences holding KV blocks", value=len(sched.running)
        )
        yield GaugeMetricFamily("deepshard_requests_waiting", "sequences queued", value=len(sched.waiting))
        yield GaugeMetricFamily("deepshard_kv_blocks_used", "KV blocks with an owner", value=alloc.num_used)
        yield GaugeMetricFamily("deepshard_kv_blocks_total", "KV blocks in the pool", value=alloc.num_blocks)


class ServerMetrics:
    """The registry and the handler-side metrics of one app."""

    def __init__(self, engine: ServeEngine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "deepshard_http_requests",
            "HTTP generation requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "deepshard_time_to_first_token_seconds",
            "request arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "deepshard_inter_token_latency_seconds",
            "time between consecutive output chunks",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "deepshard_request_latency_seconds",
            "request arrival to last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))

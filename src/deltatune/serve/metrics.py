"""What `GET /metrics` reports (Prometheus text format): requests, latency, batch sizes, queue depth, tokens.

Each server has its own registry (not prometheus_client's global one), so several apps in one process
(tests) do not collide. Adapter labels are bounded: a name that is not loaded is counted as `-`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("deltatune_requests", "HTTP requests answered", ["endpoint", "adapter", "status"],
                                registry=r)
        self.latency = Histogram("deltatune_request_seconds", "time from request to the last byte of its answer",
                                 ["endpoint", "adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("deltatune_batch_rows", "rows (texts or prompts) answered by one batch",
                                    ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("deltatune_queue_depth", "requests waiting for the model", registry=r)
        self.tokens = Counter("deltatune_generated_tokens", "tokens generated", ["adapter"], registry=r)
        self.adapters = Gauge("deltatune_adapters_loaded", "adapters and models loaded", registry=r)

    def request(self, endpoint: str, adapter: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, adapter, str(status)).inc()
        self.latency.labels(endpoint, adapter).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

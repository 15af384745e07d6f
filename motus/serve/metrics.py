"""The policy server's Prometheus metrics, in a registry of its own (`/metrics`).

Latency is a histogram (what dashboards aggregate across replicas with `histogram_quantile`) and, for a glance
at one replica, the p50 / p99 of its last `WINDOW` answers as gauges. The serving version is a gauge labelled
with the model and version, 1 for the one answering; swaps, refused versions and registry errors are counters.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

WINDOW = 1000
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("motus_serve_requests", "Requests answered, by mode, transport and outcome",
                                ["mode", "transport", "outcome"], registry=r)
        self.latency = Histogram("motus_serve_latency_seconds", "Seconds from a request's arrival to its answer",
                                 ["mode"], buckets=BUCKETS, registry=r)
        self.quantile = Gauge("motus_serve_latency_quantile_seconds",
                              f"Latency quantiles over the last {WINDOW} answers of this replica", ["quantile"],
                              registry=r)
        self.batch = Histogram("motus_serve_batch_size", "Requests per forward pass", buckets=(1, 2, 4, 8, 16, 32),
                               registry=r)
        self.serving = Gauge("motus_serve_version", "1 for the version answering requests", ["model", "version"],
                             registry=r)
        self.swaps = Counter("motus_serve_swaps", "Versions swapped in", registry=r)
        self.refused = Counter("motus_serve_refused_versions", "Versions not swapped in (refused at load or failed "
                               "warm-up), by reason", ["reason"], registry=r)
        self.registry_errors = Counter("motus_serve_registry_errors", "Alias polls that could not read the "
                                       "registry, or found the alias moved outside the platform", ["kind"],
                                       registry=r)
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._lock = threading.Lock()
        self._current: tuple[str, str] | None = None

    def answered(self, mode: str, transport: str, outcome: str, seconds: float | None) -> None:
        self.requests.labels(mode=mode, transport=transport, outcome=outcome).inc()
        if seconds is None:
            return
        self.latency.labels(mode=mode).observe(seconds)
        with self._lock:
            self._recent.append(seconds)

    def now_serving(self, model: str, version: str) -> None:
        with self._lock:
            if self._current is not None:
                self.serving.labels(*self._current).set(0)
            self._current = (model, version)
            self.serving.labels(model, version).set(1)

    def percentiles(self) -> dict[str, float]:
        with self._lock:
            recent = np.asarray(self._recent, dtype=np.float64)
        if not recent.size:
            return {}
        return {"p50": float(np.percentile(recent, 50)), "p99": float(np.percentile(recent, 99))}

    def render(self) -> bytes:
        for name, value in self.percentiles().items():
            self.quantile.labels(quantile=f"0.{name[1:]}").set(value)
        return generate_latest(self.registry)

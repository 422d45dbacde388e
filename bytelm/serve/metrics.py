"""GET /metrics: the server's counters in Prometheus' text format (prometheus_client), one registry per app.

    metrics = Metrics(engine_stats=lambda: engine.stats(), scoring=lambda: scorer.in_flight)
    app.add_middleware(RequestCounter, metrics=metrics)     # bytelm_requests_total by route, method, status
    metrics.generated.inc(n_bytes); metrics.scored.inc(n_bytes)
    Engine(..., on_cycle=metrics.step_time)                 # (seconds, rows) of every engine cycle
    metrics.exposition() -> (bytes, content type)

What it holds (docs/serving.md lists it with an example):
    bytelm_requests_total{route,method,status}   answers given; route is the route's path, "other" for none
    bytelm_generated_bytes_total                  bytes generated for clients
    bytelm_scored_bytes_total                     bytes scored by /v1/score
    bytelm_queue_depth, bytelm_active_rows        generations waiting for a slot, and being stepped
    bytelm_paused_rows                            generations waiting for their clients to read
    bytelm_scoring_texts                          /v1/score texts being scored or waiting
    bytelm_step_seconds, bytelm_step_rows         the engine's cycles (a byte for every row): time, rows
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The classic text format, which every scraper reads; the names here are plain ASCII, so the output is the same
# in prometheus_client's newer 1.0.0 format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A cycle of the default model takes ~0.3 ms for one row on a CPU; the buckets reach a tiny model's and a
# loaded server's.
_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The counters of one app. engine_stats: a function returning the engine's stats() dict (or None before
    the model is loaded); scoring: one returning the number of texts in the scorer."""

    def __init__(self, engine_stats: Callable[[], dict | None], scoring: Callable[[], int]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("bytelm_requests", "HTTP answers given", ["route", "method", "status"],
                                registry=r)
        self.generated = Counter("bytelm_generated_bytes", "bytes generated for clients", registry=r)
        self.scored = Counter("bytelm_scored_bytes", "bytes scored by /v1/score", registry=r)
        queue = Gauge("bytelm_queue_depth", "generations waiting for a slot", registry=r)
        active = Gauge("bytelm_active_rows", "generations being stepped", registry=r)
        paused = Gauge("bytelm_paused_rows", "generations waiting for their clients to read", registry=r)
        queue.set_function(lambda: (engine_stats() or {}).get("queued", 0))
        active.set_function(lambda: (engine_stats() or {}).get("active", 0))
        paused.set_function(lambda: (engine_stats() or {}).get("paused", 0))
        Gauge("bytelm_scoring_texts", "/v1/score texts being scored or waiting", registry=r).set_function(scoring)
        self.step_seconds = Histogram("bytelm_step_seconds", "time of one engine cycle (a byte for every row)",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.step_rows = Histogram("bytelm_step_rows", "rows in one engine cycle", buckets=(1, 2, 4, 8, 16, 32, 64),
                                   registry=r)

    def step_time(self, seconds: float, rows: int) -> None:
        """One engine cycle of `rows` rows took `seconds` (called from the engine's threads; thread-safe)."""
        self.step_seconds.observe(seconds)
        self.step_rows.observe(rows)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE


class RequestCounter:
    """Counts every answer by the path of the route that served it ("other" when none matched, so a scan of
    made-up paths cannot grow the series without bound), the method and the status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def note_status(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, note_status)
        except Exception:
            status.append(500)  # the outermost handler answers it
            raise
        finally:
            path = getattr(scope.get("route"), "path", None) or "other"
            method = scope["method"] if scope["method"] in ("GET", "HEAD", "POST", "OPTIONS") else "other"
            self.metrics.requests.labels(path, method, str(status[0]) if status else "none").inc()

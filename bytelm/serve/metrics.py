"""GET /metrics: the server's counters in Prometheus' text format (prometheus_client), one registry per app.

    metrics = Metrics(engine_stats=lambda: engine.stats(), scoring=lambda: scorer.in_flight)
    app.add_middleware(RequestCounter, metrics=metrics)     # bytelm_requests_total by route, method, status
    metrics.generated.inc(n_bytes); metrics.scored.inc(n_bytes)
    metrics.exposition() -> (bytes, content type)

What it holds (docs/serving.md lists it with an example):
    bytelm_requests_total{route,method,status}   answers given; route is the route's path, "other" for none
    bytelm_generated_bytes_total                  bytes generated for clients
    bytelm_scored_bytes_total                     bytes scored by /v1/score
    bytelm_queue_depth, bytelm_active_rows        generations waiting for a slot, and being stepped
    bytelm_scoring_texts                          /v1/score texts being scored or waiting
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

# The classic text format, which every scraper reads; the names here are plain ASCII, so the output is the same
# in prometheus_client's newer 1.0.0 format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        queue.set_function(lambda: (engine_stats() or {}).get("queued", 0))
        active.set_function(lambda: (engine_stats() or {}).get("active", 0))
        Gauge("bytelm_scoring_texts", "/v1/score texts being scored or waiting", registry=r).set_function(scoring)

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

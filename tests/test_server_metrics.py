"""GET /metrics (bytelm/serve/metrics.py): Prometheus' text format, parsed here with prometheus_client's own
parser; requests by route and status, bytes generated and scored, queue depth, active rows; behind
the API key when one is set."""
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from bytelm.serve.app import ServeSettings, create_app  # noqa: E402
from serving import SlowModel, live_server, local_client, wait_until  # noqa: E402
from tiny import tiny_model  # noqa: E402


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_and_bytes():
    with local_client(create_app(tiny_model(), ServeSettings())) as c:
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 20, "seed": 1,
                                               "stop_at_separator": False}).status_code == 200
        with c.stream("POST", "/v1/completions", json={"prompt": "b", "max_tokens": 7, "stream": True,
                                                        "stop_at_separator": False}) as r:
            r.read()
        assert c.post("/v1/score", json={"text": "ten bytes!"}).status_code == 200
        assert c.post("/v1/score", json={"text": 5}).status_code == 422
        assert c.get("/no/such/page").status_code == 404
        assert c.get("/v1/models", headers={"host": "evil.example"}).status_code == 421
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = samples(r.text)
    assert value(m, "bytelm_requests_total", route="/v1/completions", method="POST", status="200") == 2
    assert value(m, "bytelm_requests_total", route="/v1/score", method="POST", status="200") == 1
    assert value(m, "bytelm_requests_total", route="/v1/score", method="POST", status="422") == 1
    assert value(m, "bytelm_requests_total", route="other", method="GET", status="404") == 1  # not the path
    assert value(m, "bytelm_requests_total", route="other", method="GET", status="421") == 1
    assert value(m, "bytelm_generated_bytes_total") == 27
    assert value(m, "bytelm_scored_bytes_total") == 10
    assert value(m, "bytelm_queue_depth") == 0 and value(m, "bytelm_active_rows") == 0


def test_metrics_show_the_queue_and_the_active_rows():
    app = create_app(SlowModel(delay=0.02), ServeSettings(max_active=1, max_queue=2))
    body = {"prompt": "a", "max_tokens": 4000, "stream": True, "stop_at_separator": False}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json=body) as first, \
                http.stream("POST", "/v1/completions", json=body):
            next(first.iter_lines())
            wait_until(lambda: value(samples(http.get("/metrics").text), "bytelm_queue_depth") == 1, 5)
            m = samples(http.get("/metrics").text)
            assert value(m, "bytelm_active_rows") == 1
        time.sleep(0.1)


def test_metrics_need_the_key_when_one_is_set():
    with local_client(create_app(tiny_model(), ServeSettings(api_key="k"))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        assert c.get("/health").status_code == 200  # health stays open

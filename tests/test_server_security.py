"""Only the user's own pages reach `bytelm serve` (bytelm/serve/guard.py, api.parse_body): every request that
the security review of issue 35 got answered from another website is refused, and the server's own page,
by either loopback name, still works. tests/test_browser.py runs the same cases in Chromium.
"""
import base64
import hashlib
import re

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from bytelm.serve.app import ServeSettings, create_app  # noqa: E402
from bytelm.serve.guard import HostCheck, host_name  # noqa: E402
from tiny import tiny_model

BODY = '{"prompt": "a", "max_tokens": 2}'
JSON = {"content-type": "application/json"}


def client_for(settings=None, base_url="http://127.0.0.1:8000") -> TestClient:
    return TestClient(create_app(tiny_model(), settings or ServeSettings()), base_url=base_url)


@pytest.fixture(scope="module")
def client():
    with client_for() as c:
        yield c


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "text/plain; charset=utf-8",
                                          "application/jsonx", None])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/score"])
def test_only_json_bodies_are_read(client, path, content_type):
    # A body a form or a no-cors fetch can send (no CORS preflight) is refused before it is read
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(path, content='{"prompt": "a", "text": "a", "max_tokens": 2}', headers=headers)
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["error"]["message"]
    assert client.post(path, content='{"text": "a"}' if "score" in path else BODY,
                       headers={"content-type": "Application/JSON; charset=utf-8"}).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:9999",
                                    "http://localhost:8000", "https://evil.example:8000", "file://"])
def test_requests_from_other_pages_are_refused(client, origin):
    for method, path, kwargs in (("POST", "/v1/completions", {"content": BODY, "headers": JSON}),
                                 ("POST", "/v1/completions", {"content": BODY,
                                                              "headers": {"content-type": "text/plain"}}),
                                 ("POST", "/v1/score", {"json": {"text": "a"}}),
                                 ("GET", "/v1/models", {}),
                                 ("OPTIONS", "/v1/completions", {})):
        headers = {**kwargs.pop("headers", {}), "origin": origin, "access-control-request-method": "POST"}
        r = client.request(method, path, headers=headers, **kwargs)
        assert r.status_code == 403, (method, path, r.text)
        assert "--allow-origin" in r.json()["error"]["message"]
        assert "access-control-allow-origin" not in r.headers


def test_the_servers_own_page_may_post(client):
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"):
        r = client.post("/v1/completions", content=BODY, headers={**JSON, "host": host,
                                                                  "origin": f"http://{host}"})
        assert r.status_code == 200, (host, r.text)


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "", "10.0.0.5:8000"])
def test_a_host_that_is_not_the_servers_is_refused(client, host):
    # DNS rebinding: a page whose own name now points at 127.0.0.1 sends its name in Host
    for method, path in (("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
        r = client.request(method, path, content=BODY if method == "POST" else None,
                           headers={**JSON, "host": host})
        assert r.status_code == 421, (method, path, r.text)
        assert "--allow-host" in r.json()["error"]["message"]


def test_host_names_and_addresses_the_server_answers():
    assert host_name("[::1]:8000") == "::1" and host_name("LocalHost.:80") == "localhost"
    loopback = HostCheck("127.0.0.1")
    assert all(loopback.allows(host_name(h)) for h in ("localhost", "127.0.0.1:1", "127.8.9.1", "[::1]:5"))
    assert not any(loopback.allows(host_name(h)) for h in ("192.168.1.7", "evil.example", "[::2]", ""))
    every = HostCheck("0.0.0.0")  # any address literal (a rebound name is never one), but no other names
    assert every.allows("192.168.1.7") and every.allows("::1") and not every.allows("mybox.lan")
    assert HostCheck("192.168.1.7").allows("192.168.1.7") and not HostCheck("192.168.1.7").allows("10.0.0.1")
    named = HostCheck("127.0.0.1", ["mybox.lan", "Other.Example."])
    assert named.allows("mybox.lan") and named.allows("other.example") and not named.allows("evil.example")
    assert HostCheck("127.0.0.1", ["*"]).allows("anything.example")


def test_allow_host_adds_names():
    with client_for(ServeSettings(allow_host="mybox.lan, other.lan"), base_url="http://mybox.lan:8000") as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/models", headers={"host": "other.lan"}).status_code == 200
        assert c.get("/v1/models", headers={"host": "evil.example"}).status_code == 421


def test_allow_origin_answers_cors_preflights_and_labels_answers():
    origin = "http://localhost:3000"
    settings = ServeSettings(allow_origin=origin, api_key="k")
    with client_for(settings) as c:
        pre = c.options("/v1/completions", headers={"origin": origin, "access-control-request-method": "POST",
                                                    "access-control-request-headers": "authorization,content-type"})
        assert pre.status_code == 200  # before the key: a browser never sends one with a preflight
        assert pre.headers["access-control-allow-origin"] == origin
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert {"authorization", "content-type"} <= set(pre.headers["access-control-allow-headers"].lower()
                                                        .replace(" ", "").split(","))
        r = c.post("/v1/completions", content=BODY, headers={**JSON, "origin": origin,
                                                             "authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        no_key = c.post("/v1/completions", content=BODY, headers={**JSON, "origin": origin})
        assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == origin
        other = c.post("/v1/completions", content=BODY, headers={**JSON, "origin": "http://evil.example",
                                                                 "authorization": "Bearer k"})
        assert other.status_code == 403


def _inline_hash(html: str, tag: str) -> str:
    body = re.search(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


def test_the_page_comes_with_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    policy = dict(p.strip().split(" ", 1) for p in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert policy["script-src"] == _inline_hash(r.text, "script")  # the page's own script, nothing else
    assert policy["style-src"] == _inline_hash(r.text, "style")
    assert policy["connect-src"] == "'self'"
    assert "unsafe" not in r.headers["content-security-policy"]
    markup = re.sub(r"<(script|style)>.*?</\1>", "", r.text, flags=re.S)
    assert not re.search(r"\s(style|on\w+)=", markup)  # the policy would block inline styles and handlers
    api = client.get("/v1/models")  # and every other answer
    assert api.headers["x-content-type-options"] == "nosniff" and api.headers["x-frame-options"] == "DENY"
    assert api.headers["content-security-policy"].startswith("default-src 'none'")


def test_head_works_where_get_does(client):
    for path in ("/", "/health", "/v1/models"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", path
    r = client.head("/v1/completions")
    assert r.status_code == 405

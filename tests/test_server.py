"""The HTTP API (bytelm/serve/app.py, bytelm/serve/api.py) and its engine (bytelm/serve/engine.py), on a tiny random model:
every route, streaming, logprobs, seeds, stop sequences, every kind of bad input, limits, the API key, a full
queue, a client that goes away, and `bytelm serve` as a real subprocess on a loopback port.

Requests that need real HTTP (streams read while they run, disconnects) go to uvicorn in a thread on
127.0.0.1; the rest use FastAPI's TestClient. Every wait is bounded.
"""
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from bytelm.serve.engine import Engine, GenerationRequest, Piece, TextAssembler  # noqa: E402
from bytelm.checkpoint import save_checkpoint  # noqa: E402
from bytelm.infer.step import FastDecoder  # noqa: E402
from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig  # noqa: E402
from bytelm.serve.app import ServeSettings, create_app  # noqa: E402
from serving import SlowModel, free_port, live_server, local_client, sse_payloads, wait_until  # noqa: E402
from tiny import tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIMITS = dict(max_tokens=512, max_prompt_bytes=1000, max_body_bytes=20_000)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny.pt"
    model = tiny_model()
    save_checkpoint(path, model, model.config)
    return path


@pytest.fixture(scope="module")
def client(checkpoint):
    with local_client(create_app(checkpoint, ServeSettings(**LIMITS))) as c:
        wait_until(lambda: c.get("/health").status_code == 200)
        yield c


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------------------
# Routes

def test_health_is_503_until_the_model_is_loaded():
    release = threading.Event()

    def slow_loader():
        assert release.wait(20)
        return tiny_model()

    with local_client(create_app(slow_loader)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        wait_until(lambda: c.get("/health").status_code == 200)
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_a_checkpoint_that_fails_to_load_is_reported_by_health(tmp_path):
    with local_client(create_app(tmp_path / "missing.pt")) as c:
        wait_until(lambda: c.get("/health").json()["status"] == "error")
        r = c.get("/health")
        assert r.status_code == 503 and "not found" in r.json()["message"]


def test_models_describes_the_loaded_model(client):
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "tiny"
    assert model["parameters"] == tiny_model().num_params()
    assert model["context"] == 64 and model["config"]["n_layer"] == 2


def test_page_is_one_self_contained_file(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<script>" in html and "<style>" in html
    for remote in ('src="http', "src='http", 'href="http', "href='http", "@import", "//cdn"):
        assert remote not in html, f"the page loads {remote}...: it must work offline"


def test_completion_returns_text_usage_and_timings(client):
    out = complete(client, prompt="Hello", max_tokens=20, seed=1, stop_at_separator=False)
    choice = out["choices"][0]
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}
    assert out["timings"]["predicted_n"] == 20 and out["timings"]["predicted_per_second"] > 0
    assert out["seed"] == 1


def test_seeded_completions_repeat_and_match_bytelm_generate(client):
    settings = dict(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=123)
    first = complete(client, prompt="Once upon", max_tokens=150, stop_at_separator=False, **settings)
    again = complete(client, prompt="Once upon", max_tokens=150, stop_at_separator=False, **settings)
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    # 150 bytes after the prompt slide the 64-byte window several times
    expected = ByteLevelGenerator(tiny_model()).generate(
        "Once upon", max_new_bytes=150, stop_at_separator=False, **settings)
    assert first["choices"][0]["text"] == expected
    other = complete(client, prompt="Once upon", max_tokens=150, stop_at_separator=False,
                     **{**settings, "seed": 124})
    assert other["choices"][0]["text"] != expected


def test_unseeded_completions_report_the_seed_that_repeats_them(client):
    out = complete(client, prompt="x", max_tokens=30, stop_at_separator=False)
    assert isinstance(out["seed"], int) and 0 <= out["seed"] < 2**53  # JavaScript holds it exactly
    again = complete(client, prompt="x", max_tokens=30, stop_at_separator=False, seed=out["seed"])
    assert again["choices"][0]["text"] == out["choices"][0]["text"]


def test_logprobs_give_every_byte_its_rank_and_top_alternatives(client):
    out = complete(client, prompt="ab", max_tokens=25, seed=5, logprobs=3, stop_at_separator=False)
    lp = out["choices"][0]["logprobs"]
    content = lp["content"]
    assert len(content) == 25 == len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    for c in content:
        top = [t["logprob"] for t in c["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert 1 <= c["rank"] <= 256 and c["logprob"] <= top[0] + 1e-6
        assert (c["rank"] == 1) == (c["byte"] == c["top_logprobs"][0]["byte"])
        assert all(0 <= t["byte"] < 256 for t in c["top_logprobs"])
    text = out["choices"][0]["text"]
    assert bytes(c["byte"] for c in content).decode("utf-8", "replace") == text
    zero = complete(client, prompt="ab", max_tokens=5, seed=5, logprobs=0)
    assert all(c["top_logprobs"] == [] for c in zero["choices"][0]["logprobs"]["content"])


def test_stream_sends_whole_characters_in_order_then_done(client):
    body = dict(prompt="Hello", max_tokens=60, seed=7, logprobs=2, stop_at_separator=False)
    whole = complete(client, **body)
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(r.iter_lines())
    assert events[-1] == "[DONE]"
    final, chunks = events[-2], events[:-2]
    assert final["choices"][0]["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 60
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    for c in chunks:  # each chunk's bytes are exactly its text: no character split between chunks
        content = c["choices"][0]["logprobs"]["content"]
        assert bytes(x["byte"] for x in content).decode("utf-8", "replace") == c["choices"][0]["text"]
    streamed = [x for c in chunks for x in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["choices"][0]["logprobs"]["content"]


def test_a_stop_sequence_ends_the_text_before_it(client):
    body = dict(prompt="The", max_tokens=80, seed=3, temperature=0, stop_at_separator=False, logprobs=0)
    full = complete(client, **body)
    raw = bytes(c["byte"] for c in full["choices"][0]["logprobs"]["content"])
    at = next(i for i in range(3, len(raw)) if 0x20 < raw[i] < 0x7f)
    stop = chr(raw[at])
    cut = raw.index(raw[at])
    out = complete(client, **body, stop=["\u00e9\u00e9", stop])
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == raw[:cut].decode("utf-8", "replace")


def test_score_gives_the_numbers_of_score_bytes(client):
    from bytelm.codec.score import entropy_patches, score_bytes
    text = "Hello, w\u00f6rld! Bytes are tokens."
    r = client.post("/v1/score", json={"text": text, "top_k": 3, "patches": True})
    assert r.status_code == 200, r.text
    out = r.json()
    expected = score_bytes(tiny_model(), text.encode(), top_k=3)
    assert out["bytes"] == len(text.encode()) == len(out["surprisal"]) == len(out["rank"])
    assert out["byte_values"] == list(text.encode())
    assert out["rank"] == expected.rank.tolist()
    assert out["top_bytes"] == expected.top_bytes.tolist()
    assert out["surprisal"] == pytest.approx(expected.surprisal.tolist(), abs=1e-3)
    assert out["entropy"] == pytest.approx(expected.entropy.tolist(), abs=1e-3)
    assert out["bits_per_byte"] == pytest.approx(expected.bits_per_byte, abs=1e-4)
    assert out["patches"] == entropy_patches(expected.entropy).tolist()


# ---------------------------------------------------------------------------------------------------------
# Bad input: one readable JSON error with the right status, and the server keeps serving.

BAD_BODIES = [
    (b"{", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not valid UTF-8"),
    (b'{"prompt": "a\xe9"}', 400, "not valid UTF-8"),
    (b"[1, 2]", 422, "JSON object"),
    (b'{"temperature": NaN}', 400, "NaN"),
    (b'{"max_tokens": "10"}', 422, "max_tokens"),
    (b'{"max_tokens": true}', 422, "max_tokens"),
    (b'{"max_tokens": -1}', 422, "max_tokens"),
    (b'{"max_tokens": 0}', 422, "max_tokens"),
    (b'{"max_tokens": 99999999999999999999999}', 400, "limit is 512"),
    (b'{"max_tokens": 1e999}', 422, "max_tokens"),
    (b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (b'{"temperature": 5}', 422, "temperature"),
    (b'{"temperature": -0.5}', 422, "temperature"),
    (b'{"top_p": 0}', 422, "top_p"),
    (b'{"top_k": 300}', 422, "top_k"),
    (b'{"top_k": 2.5}', 422, "top_k"),
    (b'{"min_p": 2}', 422, "min_p"),
    (b'{"repetition_penalty": 0.5}', 422, "repetition_penalty"),
    (b'{"seed": -1}', 422, "seed"),
    (b'{"seed": 18446744073709551616}', 422, "seed"),
    (b'{"logprobs": 21}', 422, "logprobs"),
    (b'{"prompt": 5}', 422, "prompt"),
    (b'{"prompt": ["a"]}', 422, "prompt"),
    (b'{"prompt": "\\ud800"}', 422, "lone surrogate"),
    (b'{"stop": 3}', 422, "stop"),
    (b'{"stop": ["a", "b", "c", "d", "e"]}', 422, "at most 4"),
    (b'{"stop": [""]}', 422, "empty"),
    (b'{"stream": "yes"}', 422, "stream"),
    (b'{"n": 2}', 422, "n: Extra inputs"),
    (b'{"prompt": "' + b"a" * 1001 + b'"}', 413, "limit is 1,000"),
    (b"[" * 100_000, 413, "--max-body-bytes"),
]


@pytest.mark.parametrize("body,status,words", BAD_BODIES, ids=[repr(b[:24]) for b, _, _ in BAD_BODIES])
def test_bad_completion_bodies_get_a_json_error(client, body, status, words):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["code"] == status
    assert "Traceback" not in r.text


def test_bad_requests_leave_the_server_serving(client):
    for body, _, _ in BAD_BODIES:
        client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert complete(client, prompt="ok", max_tokens=3)["usage"]["completion_tokens"] <= 3
    assert client.get("/health").json()["active"] == 0


@pytest.mark.parametrize("body,status,words", [
    (b"{}", 422, "text: Field required"),
    (b'{"text": "a", "top_k": 50}', 422, "top_k"),
    (b'{"text": "a", "patch_threshold": -1}', 422, "patch_threshold"),
    (b'{"text": "' + b"a" * 1001 + b'"}', 413, "limit is 1,000"),
    (b'{"text": "a", "stride": 4}', 422, "stride"),
])
def test_bad_score_bodies_get_a_json_error(client, body, status, words):
    r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_unknown_routes_and_methods_get_json_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"  # the client's mistake, not the server's


def test_a_chunked_body_over_the_limit_is_stopped_at_the_limit(client):
    def chunks():
        for _ in range(100):
            yield b" " * 1000  # 100 kB without a Content-Length
    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "20,000 bytes" in r.json()["error"]["message"]


def test_api_key_is_required_on_every_api_route_when_set(checkpoint):
    with local_client(create_app(checkpoint, ServeSettings(api_key="s3cret"))) as c:
        wait_until(lambda: c.get("/health").status_code == 200)  # health and the page stay open
        assert c.get("/").status_code == 200
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/score")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = c.request(method, path, headers=headers, json={"prompt": "a", "text": "a"})
                assert r.status_code == 401, (path, headers)
                assert "API key" in r.json()["error"]["message"]
                assert r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        r = c.post("/v1/completions", headers=ok, json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Concurrency, over real HTTP

def test_a_full_queue_gets_503_with_retry_after_and_a_vanished_client_frees_its_slot():
    app = create_app(SlowModel(), ServeSettings(max_active=1, max_queue=0))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        body = {"prompt": "a", "max_tokens": 4000, "stream": True, "stop_at_separator": False}
        with http.stream("POST", "/v1/completions", json=body) as r:
            first = next(r.iter_lines())  # the generation runs (4,000 steps of >= 10 ms: 40 s)
            assert first.startswith("data: ")
            assert http.get("/health").json()["active"] == 1
            busy = http.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "slot" in busy.json()["error"]["message"]
        t0 = time.monotonic()  # the client went away: the slot is free at the next step, not after 40 s
        wait_until(lambda: http.get("/health").json()["active"] == 0, timeout=5)
        assert time.monotonic() - t0 < 5
        r = http.post("/v1/completions", json={"prompt": "c", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_a_client_that_stops_waiting_for_a_whole_completion_frees_its_slot():
    app = create_app(SlowModel(), ServeSettings(max_active=1, max_queue=0))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"prompt": "a", "max_tokens": 4000, "stop_at_separator": False},
                      timeout=0.5)
        wait_until(lambda: http.get("/health").json()["active"] == 0, timeout=5)


def test_concurrent_streams_each_get_their_own_seeded_text(checkpoint):
    settings = dict(max_tokens=100, temperature=1.0, stop_at_separator=False)
    expected = {s: ByteLevelGenerator(tiny_model()).generate("go", max_new_bytes=100, seed=s, temperature=1.0,
                                                             stop_at_separator=False) for s in range(6)}

    async def one(http, seed):
        text = []
        async with http.stream("POST", "/v1/completions",
                               json={"prompt": "go", "seed": seed, "stream": True, **settings}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        return seed, "".join(text)

    async def all_at_once(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return await asyncio.gather(*(one(http, s) for s in range(6)))

    with live_server(create_app(checkpoint, ServeSettings(max_active=4, max_queue=4))) as url:
        wait_until(lambda: httpx.get(url + "/health").status_code == 200)
        results = asyncio.run(all_at_once(url))
    assert dict(results) == expected


# ---------------------------------------------------------------------------------------------------------
# The engine and text assembly alone

def test_text_assembler_sends_whole_characters_and_holds_back_stop_prefixes():
    a = TextAssembler([b"END"])
    pieces = []
    for b in "a\u00e9\u65e5E".encode() + b"N":
        piece, stopped = a.add(b, None)
        assert not stopped
        pieces.append(piece.text if piece else None)
    # the two bytes of e-acute and three of the CJK character arrive whole; "E", "N" are held (start of END)
    assert pieces == ["a", None, "\u00e9", None, None, "\u65e5", None, None]
    piece, stopped = a.add(ord("X"), None)
    assert not stopped and piece.text == "ENX"
    for b in b"EN":
        a.add(b, None)
    piece, stopped = a.add(ord("D"), None)
    assert stopped and piece is None  # nothing of the stop sequence is sent
    b = TextAssembler([])
    assert b.add(0xC3, None) == (None, False)
    assert b.finish().text == "\ufffd"  # an unfinished character at the end is U+FFFD


@pytest.mark.parametrize("workers", [1, 2])
def test_engine_rows_decode_as_bytelm_generate_while_interleaved(workers, monkeypatch):
    model = tiny_model()
    batch_sizes = []  # rows per batched step (FastDecoder.step_rows, the C step's path)
    step_rows = FastDecoder.step_rows
    monkeypatch.setattr(FastDecoder, "step_rows",
                        lambda self, b, caches: batch_sizes.append(len(b)) or step_rows(self, b, caches))

    async def run():
        engine = Engine(model, max_active=3, max_queue=10, workers=workers)
        engine.start()
        loop = asyncio.get_running_loop()
        handles = [engine.submit(GenerationRequest(b"ab" * s, InferenceConfig(
            max_new_bytes=90 + 7 * s, seed=s, repetition_penalty=1.3, stop_at_separator=False)), loop)
            for s in range(5)]
        texts = ["".join([e.text async for e in h.events() if isinstance(e, Piece)]) for h in handles]
        engine.stop()
        return texts

    texts = asyncio.run(run())
    for s, text in enumerate(texts):
        assert text == ByteLevelGenerator(model).generate(b"ab" * s, max_new_bytes=90 + 7 * s, seed=s,
                                                          repetition_penalty=1.3, stop_at_separator=False)
    if workers == 1 and FastDecoder(model).native:
        assert max(batch_sizes) == 3  # the rows were stepped together


def test_engine_hands_bytes_over_in_batches(monkeypatch):
    import bytelm.serve.engine as engine_module
    monkeypatch.setattr(engine_module, "DELIVER_EVERY_S", 60.0)  # the first piece and the end only
    model = tiny_model()

    async def run():
        engine = Engine(model)
        engine.start()
        handle = engine.submit(GenerationRequest(b"ab", InferenceConfig(max_new_bytes=300, seed=4,
                                                                      stop_at_separator=False)),
                               asyncio.get_running_loop())
        batches = []
        while True:
            events = [await handle.next_event(timeout=20)] + handle.ready_events()
            batches.append(events)
            if not isinstance(events[-1], Piece):
                break
        engine.stop()
        return batches

    batches = asyncio.run(run())
    assert len(batches) == 2  # the first byte at once (time to first byte), the other 299 with the end
    text = "".join(e.text for events in batches for e in events if isinstance(e, Piece))
    assert text == ByteLevelGenerator(model).generate(b"ab", max_new_bytes=300, seed=4, stop_at_separator=False)


# ---------------------------------------------------------------------------------------------------------
# `bytelm serve` as a user runs it

def test_bytelm_serve_answers_http_on_loopback(checkpoint):
    port = free_port()
    env = {**os.environ, "BYTELM_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "bytelm.cli", "serve", str(checkpoint), "--port", str(port)],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait_until(up, timeout=60)
        assert "<title>bytelm</title>" in httpx.get(url + "/").text
        assert httpx.post(url + "/v1/completions", json={"prompt": "a"}).status_code == 401  # key from the env
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"prompt": "Hi", "max_tokens": 8, "seed": 2, "stop_at_separator": False})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    finally:
        proc.send_signal(2)  # Ctrl-C
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_bytelm_serve_reports_a_bad_checkpoint_in_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "bytelm.cli", "serve", str(bad), "--port", str(free_port())],
                       cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bytelm_serve_refuses_a_limit_below_one(checkpoint, capsys):
    from bytelm.cli import main
    assert main(["serve", str(checkpoint), "--max-active", "0"]) == 1
    assert "error: max-active must be at least 1, got 0" in capsys.readouterr().err

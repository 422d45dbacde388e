"""Fair under load (issue 35, part 2): scoring runs off the event loop in turns and stops when its client
leaves, its queue admits exactly --max-queue, one answer is bounded, /health answers within 100 ms during a
flood, and connections that never send their headers are closed. Loopback only; every wait is bounded.
"""
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from bytelm.codec.score import score_bytes  # noqa: E402
from bytelm.serve.app import ServeSettings, create_app  # noqa: E402
from serving import SlowModel, free_port, live_server, local_client, wait_until  # noqa: E402
from tiny import save_tiny_checkpoint, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LONG = "The quick brown fox jumps over the lazy dog. " * 1456  # 65,520 bytes: 32 forward passes of 64 windows


class GatedModel(SlowModel):
    """Every forward pass waits until `gate` is set."""

    def __init__(self):
        super().__init__(delay=0)
        self.gate = threading.Event()

    def forward(self, idx, cache=None, last_only=False):
        assert self.gate.wait(20)
        return super().forward(idx, cache=cache, last_only=last_only)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As `bytelm serve` runs (--threads 1): two threads of tiny matrix products on a busy 2-core machine
    wait milliseconds for each other at every product."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scorer_of(app):
    return app.state.bytelm.scorer


def test_the_score_queue_admits_exactly_max_queue():
    model = GatedModel()
    app = create_app(model, ServeSettings(max_queue=2))

    async def flood(url):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            admitted = [asyncio.create_task(http.post("/v1/score", json={"text": f"text {i}"})) for i in range(3)]
            await asyncio.to_thread(wait_until, lambda: scorer_of(app).in_flight == 3, 10)
            busy = await http.post("/v1/score", json={"text": "one too many"})
            model.gate.set()
            return busy, await asyncio.gather(*admitted)

    with live_server(app) as url:
        busy, answers = asyncio.run(flood(url))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"  # one scoring, two waiting: full
    assert "2 texts are already waiting" in busy.json()["error"]["message"]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert scorer_of(app).in_flight == 0


def test_a_scoring_stops_when_its_client_leaves():
    model = SlowModel(delay=0.1)  # LONG takes 32 passes: 3.2 s
    app = create_app(model, ServeSettings())
    with live_server(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/score", json={"text": LONG, "top_k": 0}, timeout=0.5)
        wait_until(lambda: scorer_of(app).in_flight == 0, timeout=3)
        calls = model.calls
        time.sleep(0.5)
        assert model.calls == calls < 16  # stopped within a chunk of noticing, not after all 32 passes


def test_a_short_text_is_scored_between_the_chunks_of_long_ones():
    model = SlowModel(delay=0.02)
    text = LONG[:32768]

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            t0 = time.monotonic()
            long = [asyncio.create_task(http.post("/v1/score", json={"text": text, "top_k": 2}))
                    for _ in range(3)]
            await asyncio.to_thread(wait_until, lambda: scorer_of(app).in_flight == 3, 10)
            t1 = time.monotonic()
            short = await http.post("/v1/score", json={"text": "abc"})
            waited = time.monotonic() - t1
            long = await asyncio.gather(*long)
            return waited, time.monotonic() - t0, short, long

    app = create_app(model, ServeSettings())
    with live_server(app) as url:
        waited, total, short, long = asyncio.run(run(url))
    assert short.status_code == 200 and short.json()["bytes"] == 3
    # in turns it waits for a chunk (4,096 positions) of each long text, not for the three whole texts
    assert waited < 0.35 * total, f"a 3-byte text waited {waited:.2f} s; the three long ones took {total:.2f} s"
    expected = score_bytes(tiny_model(), text.encode(), top_k=2)  # taking turns changes no number
    for r in long:
        out = r.json()
        assert out["rank"] == expected.rank.tolist() and out["top_bytes"] == expected.top_bytes.tolist()
        assert out["surprisal"] == pytest.approx(expected.surprisal.tolist(), abs=1e-3)


def test_one_score_answer_is_bounded():
    with local_client(create_app(tiny_model(), ServeSettings(max_score_alternatives=100))) as c:
        assert c.post("/v1/score", json={"text": "a" * 20, "top_k": 5}).status_code == 200
        r = c.post("/v1/score", json={"text": "a" * 21, "top_k": 5})
        assert r.status_code == 413 and r.json()["error"]["param"] == "top_k"
        assert "105 alternatives; the limit is 100" in r.json()["error"]["message"]
        assert c.post("/v1/score", json={"text": "a" * 500, "top_k": 0}).status_code == 200
    with local_client(create_app(tiny_model())) as c:  # the answer: 64 KiB with top_k 20
        r = c.post("/v1/score", json={"text": "x" * 65536, "top_k": 20})
        assert r.status_code == 413 and "limit is 524,288" in r.json()["error"]["message"]


def test_a_large_answer_keeps_every_number():
    text = "Bytes are tokens; caf\u00e9 \u2192 " * 300  # 8,700 bytes: several slices of the JSON encoder
    with local_client(create_app(tiny_model())) as c:
        out = c.post("/v1/score", json={"text": text, "top_k": 3}).json()
    expected = score_bytes(tiny_model(), text.encode(), top_k=3)
    assert out["byte_values"] == list(text.encode()) and out["rank"] == expected.rank.tolist()
    assert out["top_bytes"] == expected.top_bytes.tolist()
    np.testing.assert_allclose(np.array(out["top_probs"]), expected.top_probs, atol=1e-5)
    assert out["entropy"] == pytest.approx(expected.entropy.tolist(), abs=1e-4)
    assert out["timings"]["ms"] > 0 and out["model"] == "bytelm"


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def test_connections_that_never_finish_their_headers_are_closed():
    with live_server(create_app(tiny_model()), header_timeout=0.5, idle_timeout=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        kept.settimeout(5)
        answer = kept.recv(65536)
        while not answer.endswith(b"}"):  # the whole answer: /health's JSON ends the body
            answer += kept.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /he")  # a kept-alive connection dribbling its next request
        t0 = time.monotonic()
        assert all(_closed_within(s, 3) for s in silent + [partial, kept])
        assert time.monotonic() - t0 < 3
        for s in silent + [partial, kept]:
            s.close()
        assert httpx.get(url + "/health").status_code == 200  # the server itself is fine


def raw_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


def test_queued_requests_of_clients_that_left_are_dropped_at_once():
    app = create_app(SlowModel(delay=0.01), ServeSettings(max_active=1, max_queue=4))
    body = {"prompt": "a", "max_tokens": 4000, "stream": True, "stop_at_separator": False}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            queued = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) for _ in range(4)]
            for s in queued:
                s.sendall(raw_request({"prompt": "b", "max_tokens": 4000, "stream": True}))
            wait_until(lambda: http.get("/health").json()["queued"] == 4, timeout=5)
            assert http.post("/v1/completions", json={"prompt": "c"}).status_code == 503  # full
            for s in queued:
                s.close()
            t0 = time.monotonic()
            wait_until(lambda: http.get("/health").json()["queued"] == 0, timeout=2)
            assert time.monotonic() - t0 < 1  # not when a slot frees, seconds later
            assert http.get("/health").json()["active"] == 1
            ok = {}  # a new request gets a queue place again (and waits in it)
            threading.Thread(target=lambda: ok.update(r=http.post("/v1/completions", json={
                "prompt": "d", "max_tokens": 2}))).start()
            wait_until(lambda: http.get("/health").json()["queued"] == 1, timeout=5)
        wait_until(lambda: "r" in ok, timeout=10)
        assert ok["r"].status_code == 200


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def stalled_stream(port: int) -> socket.socket:
    """A client that asks for a long stream with logprobs and never reads it (a small receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(raw_request({"prompt": "a", "max_tokens": 1_000_000, "stream": True, "logprobs": 20,
                           "stop_at_separator": False}))
    return s


def test_a_stream_nobody_reads_pauses_then_is_dropped():  # the issue's: RSS 259 -> 398 MB in 24 s
    app = create_app(tiny_model(), ServeSettings(max_tokens=1_000_000, stall_timeout=3))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        s = stalled_stream(int(url.rsplit(":", 1)[1]))
        try:
            wait_until(lambda: http.get("/health").json()["paused"] == 1, timeout=10)
            engine = app.state.bytelm.engine
            before = metric(http, "bytelm_generated_bytes_total")
            time.sleep(0.5)
            assert http.get("/health").json()["paused"] == 1
            assert metric(http, "bytelm_generated_bytes_total") == before  # paused: nothing more generated
            assert before < 100_000  # what the socket buffers held, not a runaway queue
            wait_until(lambda: http.get("/health").json()["active"] == 0, timeout=6)  # dropped after 3 s
            assert engine.stats()["paused"] == 0
        finally:
            s.close()
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 200  # the server is fine


# ---------------------------------------------------------------------------------------------------------
# /health under load: `bytelm serve` in a subprocess, the load from another, the probe from this one, so no
# two of them share a GIL.

FLOOD = """
import sys, threading, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
text = "x" * 65536
def client():
    with httpx.Client(base_url=url, timeout=60) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            http.post("/v1/score", json={"text": text, "top_k": 8})
threads = [threading.Thread(target=client) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


@pytest.fixture()
def served(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bytelm.cli", "serve", str(save_tiny_checkpoint(tmp_path)),
                             "--port", str(port)], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    try:
        wait_until(up, timeout=60)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def health_latencies(url: str, seconds: float) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=5) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            out.append(time.perf_counter() - t0)
            time.sleep(0.05)
    return out


@pytest.mark.slow
def test_health_answers_within_100_ms_during_a_score_flood_and_a_stalled_stream(served):
    port = int(served.rsplit(":", 1)[1])
    stalled = stalled_stream(port)
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, served, "6"], stdin=subprocess.DEVNULL)
    try:
        time.sleep(1)  # every flooding client has a 64 KiB text in flight; the stream has filled its buffers
        latencies = health_latencies(served, 4)
        stalled.close()  # its client goes: nothing piled up for it to be freed now
        latencies += health_latencies(served, 1)
    finally:
        stalled.close()
        flood.wait(60)
    print(f"health: {len(latencies)} probes, max {max(latencies) * 1000:.1f} ms")
    assert max(latencies) < 0.1, f"slowest /health {max(latencies) * 1000:.0f} ms of {len(latencies)}"

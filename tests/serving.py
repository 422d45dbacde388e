"""What the serving tests share: a loopback TestClient, uvicorn in a thread as `bytelm serve` configures it,
a model that is slow on purpose, and bounded waits."""
import contextlib
import json
import socket
import threading
import time

import torch
import uvicorn
from fastapi.testclient import TestClient

from bytelm.serve.server import server_config
from tiny import tiny_model


def local_client(app) -> TestClient:
    """FastAPI's TestClient, as a loopback client: the server answers only requests for its own names."""
    return TestClient(app, base_url="http://127.0.0.1:8000")


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sse_payloads(lines) -> list:
    """The `data:` payloads of a server-sent event stream, parsed (the final [DONE] kept as a string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class SlowModel(torch.nn.Module):
    """A ByteLM whose every forward pass takes `delay` seconds longer, so a generation or a scoring is still
    running while the test looks at it (the engine steps modules other than ByteLM through their forward).
    `calls` counts the forward passes."""

    def __init__(self, delay: float = 0.01):
        super().__init__()
        self.inner, self.delay, self.calls = tiny_model(), delay, 0
        self.config = self.inner.config

    def forward(self, idx, cache=None, last_only=False):
        self.calls += 1
        time.sleep(self.delay)
        return self.inner(idx, cache=cache, last_only=last_only)

    def new_cache(self, batch_size=1):
        return self.inner.new_cache(batch_size)

    def num_params(self):
        return self.inner.num_params()


@contextlib.contextmanager
def live_server(app, **config):
    """uvicorn on 127.0.0.1, a free port, in a thread, configured as `bytelm serve` configures it (config:
    server_config's keywords); stopped on exit. Yields the base URL."""
    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), timeout=20)
    assert server.started
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)

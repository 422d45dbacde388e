"""Serving throughput and latency: `bytelm serve` on loopback with 1, 2, 4, 8 and 16 concurrent streaming clients.

    python bench/bench_serve.py                          # appends its table to docs/benchmarks.md
    python bench/bench_serve.py --no-write --clients 1 2 --requests-per-client 2 --new-bytes 64   # a quick check
    python bench/bench_serve.py --model byte_llm_model.pt --workers 1 2

Each client sends its requests one after another: POST /v1/completions with stream=true, a 64-byte prompt,
256 new bytes (stop-at-separator off, so every request produces all of them), temperature 0.8, its own seed.
Per request: time to the first streamed text and to [DONE]; per level: p50/p95 of both, aggregate bytes/s
(all bytes over the level's wall time) and errors (anything but a complete stream). The server runs as a
subprocess on 127.0.0.1 (a free port) with --threads 1; the clients share the machine with it. Everything is
bounded: a fixed number of requests, a timeout per request and a deadline for the whole run.

Targets (the serving issue): with 8 clients, aggregate bytes/s at least 3x one client's, and the p95 time to
the end at most 3x a lone request's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import markdown_table, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over the lazy dog. Byte-level models read"[:64]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_checkpoint(folder: str) -> str:
    """The default model shape, untrained: speed does not depend on the weights."""
    from bytelm.checkpoint import save_checkpoint
    from bytelm.config import ModelConfig
    from bytelm.model import ByteLM
    torch.manual_seed(0)
    model = ByteLM(ModelConfig())
    path = os.path.join(folder, "bench_serve_model.pt")
    save_checkpoint(path, model, model.config)
    return path


class Server:
    """`bytelm serve MODEL` on a free loopback port, stopped on exit."""

    def __init__(self, model: str, workers: int, max_active: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bytelm.cli", "serve", model, "--port", str(self.port), "--threads", "1",
             "--workers", str(workers), "--max-active", str(max_active), "--max-queue", "64"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        import httpx
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"bytelm serve exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("bytelm serve did not start within 120 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def one_request(http, body: dict, timeout: float) -> dict:
    """One streamed completion: time to first text, time to [DONE], bytes; error text if it did not end well."""
    t0 = time.perf_counter()
    first = None
    done = False
    n_bytes = 0
    try:
        async with asyncio.timeout(timeout):
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return {"error": chunk["error"]["message"]}
                    if first is None and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        n_bytes = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - counted as an error, reported below
        return {"error": f"{type(e).__name__}: {e}"}
    if not done or n_bytes != body["max_tokens"]:
        return {"error": f"incomplete stream ({n_bytes} of {body['max_tokens']} bytes)"}
    return {"ttfb": first, "total": time.perf_counter() - t0, "bytes": n_bytes}


async def run_level(url: str, clients: int, per_client: int, new_bytes: int, timeout: float) -> dict:
    import httpx
    limits = httpx.Limits(max_connections=clients + 2)

    async def client(http, c: int) -> list[dict]:
        out = []
        for i in range(per_client):
            body = {"prompt": PROMPT, "max_tokens": new_bytes, "stream": True, "temperature": 0.8,
                    "seed": 1000 * c + i, "stop_at_separator": False}
            out.append(await one_request(http, body, timeout))
        return out

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        await one_request(http, {"prompt": PROMPT, "max_tokens": 8, "stream": True, "seed": 0,
                                 "stop_at_separator": False}, timeout)  # warm: the C library, the connection
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(http, c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    return {"clients": clients, "requests": len(results), "wall": wall, "ok": ok, "errors": errors,
            "bytes": sum(r["bytes"] for r in ok)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the default shape, untrained)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends in turn")
    parser.add_argument("--new-bytes", type=int, default=256, help="bytes per completion")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="server engine threads to compare")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows, summary = [], None
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or untrained_checkpoint(tmp)
        for workers in args.workers:
            with Server(model, workers, max_active=max(args.clients)) as server:
                solo = None
                for clients in args.clients:
                    if time.monotonic() - started > args.deadline:
                        print(f"deadline of {args.deadline:.0f} s reached; skipping the rest", file=sys.stderr)
                        break
                    level = asyncio.run(run_level(server.url, clients, args.requests_per_client, args.new_bytes,
                                                  args.timeout))
                    ttfb = [r["ttfb"] * 1000 for r in level["ok"]]
                    total = [r["total"] * 1000 for r in level["ok"]]
                    rate = level["bytes"] / level["wall"]
                    if solo is None:
                        solo = {"rate": rate, "p95": percentile(total, 95)}
                    rows.append([workers, clients, level["requests"], percentile(ttfb, 50), percentile(ttfb, 95),
                                 percentile(total, 50), percentile(total, 95), rate, rate / solo["rate"],
                                 percentile(total, 95) / solo["p95"], len(level["errors"])])
                    for e in sorted(set(level["errors"]))[:3]:
                        print(f"error ({clients} clients): {e}", file=sys.stderr)
                    if clients == (8 if 8 in args.clients else max(args.clients)) and workers == args.workers[0]:
                        summary = (f"{clients} clients: {rate:,.0f} B/s ({rate / solo['rate']:.1f}x one client)",
                                   f"1 client: {solo['rate']:,.0f} B/s")
    verdict = ""
    eight = next((r for r in rows if r[0] == args.workers[0] and r[1] == 8), None)
    if eight is not None:
        verdict = (f" At 8 clients ({args.workers[0]} worker): {eight[8]:.2f}x one client's bytes/s (target 3x: "
                   f"{'met' if eight[8] >= 3 else 'missed'}), p95 {eight[9]:.1f}x a lone request's (target 3x: "
                   f"{'met' if eight[9] <= 3 else 'missed'}); dev/LOG.md says where the time goes.")
    headers = ["workers", "clients", "requests", "first byte p50 (ms)", "p95", "to [DONE] p50 (ms)", "p95",
               "aggregate bytes/s", "x one client", "p95 / alone", "errors"]
    table = markdown_table(headers, rows)
    notes = (f"Streaming completions of {args.new_bytes} bytes after a 64-byte prompt, {args.requests_per_client} "
             "per client one after another; `bytelm serve` on 127.0.0.1 with --threads 1, its clients (httpx, "
             "asyncio) in the benchmark's process on the same machine. Targets: aggregate at 8 clients >= 3x "
             "one client's; p95 / alone <= 3. Model: "
             + (args.model or "the default shape (6 x 8 x 192, 2.7M parameters), untrained") + "." + verdict)
    report("Serving: concurrent streaming clients", table, notes, write=not args.no_write, summary=summary)
    return 1 if any(r[-1] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

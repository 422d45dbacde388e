"""Shared helpers for the bench/ scripts: machine description, matmul peak, peak RSS, results table output.

Every script prints a Markdown table and appends it to docs/benchmarks.md with the date, the machine and
the exact command, so each number in the docs can be traced to a run.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from bytelm.device import cpu_has_fast_bf16
    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = "native bf16" if cpu_has_fast_bf16() else "no native bf16"
    load = ", load average %.2f at the end (other processes share the machine)" % os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} cores, {isa}, {bf16}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; Python {platform.python_version()}{load}")


def matmul_peak_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Best observed GFLOP/s of an n x n matmul in `dtype` on this machine, now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, table: str, notes: str = "", write: bool = True) -> None:
    """Print the table and append it, with date, machine and command, to docs/benchmarks.md."""
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"\n## {title}\n\n{stamp}; {machine()}\n\n`{command}`\n\n{table}\n"
             + (f"\n{notes.strip()}\n" if notes.strip() else ""))
    print(block)
    if write:
        BENCH_DOC.parent.mkdir(exist_ok=True)
        if not BENCH_DOC.exists():
            BENCH_DOC.write_text("# Benchmarks\n\nEach section was appended by the bench/ script named in it.\n")
        with open(BENCH_DOC, "a") as f:
            f.write(block)

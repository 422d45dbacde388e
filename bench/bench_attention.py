"""Attention for training: the C kernel (bytelm/csrc/attention.c) against torch's scaled_dot_product_attention,
side by side in one process, at the two shapes this project trains.

    python bench/bench_attention.py [--no-write]

For each shape, two comparisons, alternating kernel and torch run by run so that the shared machine's drift
hits both alike (medians reported):
- the attention op alone, forward + backward, on q, k, v read from a fused projection as the model does;
- a whole training forward + backward of the model (blocks compiled, as training runs them), with the kernel
  switched off and on between runs (bytelm.attention's `_ready`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import markdown_table, report  # noqa: E402
import bytelm.attention as attention  # noqa: E402
from bytelm.config import ModelConfig  # noqa: E402
from bytelm.model import ByteLM  # noqa: E402

SHAPES = [  # name, (layers, heads, width), batch, sequence
    ("time-to-quality recipe, 4x4x160", (4, 4, 160), 16, 128),
    ("upstream shape, 6x8x192", (6, 8, 192), 24, 512),
]


def alternate(fns: dict, runs: int) -> dict:
    """Median seconds per call of each function, calling them in turn `runs` times."""
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def op_times(B: int, T: int, H: int, D: int, runs: int) -> dict:
    qkv = torch.randn(B, T, 3, H, D, requires_grad=True)
    grad = torch.randn(B, T, H, D)

    def run(use_kernel: bool):
        attention._ready = use_kernel
        q, k, v = qkv.unbind(2)
        attention.causal_attention(q, k, v).backward(grad)

    for use in (True, False):  # warm-up
        run(use)
    return alternate({"kernel": lambda: run(True), "torch": lambda: run(False)}, runs)


def step_times(shape: tuple, B: int, T: int, runs: int) -> dict:
    L, H, C = shape
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(n_layer=L, n_head=H, n_embd=C, block_size=T)).train()
    model.compile_blocks()
    x, y = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))

    def run(use_kernel: bool):
        attention._ready = use_kernel
        _, loss = model(x, y)
        loss.backward()

    for use in (True, False, True, False):  # compiles once for each, then warm
        run(use)
    return alternate({"kernel": lambda: run(True), "torch": lambda: run(False)}, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=0, help="runs of each (default: 30 for the op, 10 or 4 for steps)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not attention.kernel_ready():
        sys.exit("error: the attention kernel is not available here (needs a C compiler and AVX2)")
    rows = []
    for name, shape, B, T in SHAPES:
        L, H, C = shape
        op = op_times(B, T, H, C // H, args.runs or 30)
        step = step_times(shape, B, T, args.runs or (10 if T <= 128 else 4))
        rows.append([name, f"{B} x {T}, {H} heads of {C // H}",
                     f"{op['torch'] * 1e3:.1f}", f"{op['kernel'] * 1e3:.1f}", f"{op['torch'] / op['kernel']:.2f}",
                     f"{step['torch'] * 1e3:.0f}", f"{step['kernel'] * 1e3:.0f}",
                     f"{step['torch'] / step['kernel']:.2f}"])
    attention._ready = True
    table = markdown_table(["shape", "batch, heads", "attention fwd+bwd ms, torch", "kernel", "speed-up",
                            "model fwd+bwd ms, torch", "kernel", "speed-up"], rows)
    notes = (f"{torch.get_num_threads()} threads, fp32; medians of alternating runs; model rows: the whole "
             "model's forward + backward, blocks compiled, random bytes.")
    report("Training attention: C kernel vs torch", table, notes, write=not args.no_write,
           summary=("model fwd+bwd " + ", ".join(f"{r[6]} ms ({r[7]}x) at {r[1].split(',')[0]}" for r in rows),
                    "torch SDPA " + ", ".join(f"{r[5]} ms" for r in rows)))


if __name__ == "__main__":
    main()

"""How fast the deterministic compression step (bytelm/codec/model_step.py) makes counts, against the torch
step compression used before it (BatchStep + quantize, segments of the context, no sliding), side by side.

    python bench/bench_model_step.py                   # replaces its section of docs/benchmarks.md
    python bench/bench_model_step.py --rows 32 --no-write

Speed depends on the shapes only, so the models are freshly initialised: the cpu10 preset's (4 x 4 x 160,
context 128, value embeddings, 1.4M parameters) and the default (6 x 8 x 192, context 512, 2.7M). Each figure
is bytes of counts per second over whole slide cycles after a first full window (the steady state of a long
file), wall clock, median of --repeats.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import markdown_table, report  # noqa: E402
from bytelm.codec.model_step import DeterministicStep  # noqa: E402
from bytelm.config import ModelConfig  # noqa: E402
from bytelm.infer.batch_step import BatchStep  # noqa: E402
from bytelm.model import ByteLM  # noqa: E402

SHAPES = {"cpu10": dict(n_layer=4, n_head=4, n_embd=160, block_size=128, value_embeds=True),
          "default": {}}


def det_speed(model: ByteLM, rows: int, stride: int, threads: int, repeats: int) -> tuple[float, float]:
    """(bytes per second of wall clock, bytes per second of this process's CPU time, all threads summed)"""
    ctx = model.config.block_size
    step = DeterministicStep(model, rows, ctx, stride, threads=threads)
    prev = np.zeros(rows, np.uint8)
    for _ in range(ctx):  # the first window: no slides yet
        step.next(prev)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(stride):  # one slide and the stride of bytes it makes room for
            step.next(prev)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return rows * stride / statistics.median(times), rows * stride / statistics.median(cpu)


def quantize(logits: torch.Tensor) -> np.ndarray:
    """Counts (B, 256) >= 1 summing to 2^16 from torch's softmax, as the torch-step compressor quantised."""
    counts = torch.floor(torch.softmax(logits.double(), -1) * ((1 << 16) - 256)).long() + 1
    top = counts.argmax(-1, keepdim=True)
    counts.scatter_add_(1, top, (1 << 16) - counts.sum(-1, keepdim=True))
    return counts.numpy()


def torch_speed(model: ByteLM, rows: int, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    step = BatchStep(model, rows)
    x = torch.zeros(rows, dtype=torch.long)
    for _ in range(8):
        quantize(step(x))
    t0 = time.perf_counter()
    for _ in range(steps):
        quantize(step(x))
    return rows * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="rows stepped together")
    ap.add_argument("--repeats", type=int, default=3, help="slide cycles timed per figure (median)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    table_rows = []
    headline = {}
    for name, shape in SHAPES.items():
        model = ByteLM(ModelConfig(**shape)).eval()
        ctx = model.config.block_size
        for threads in (1, 2):
            peer = torch_speed(model, args.rows, threads, steps=32)
            for stride in (ctx // 2, 3 * ctx // 4):
                wall, cpu = det_speed(model, args.rows, stride, threads, args.repeats)
                kbs = wall / 1000
                headline[name, threads, stride] = kbs
                table_rows.append([f"{name} ({model.num_params() / 1e6:.1f}M)", threads, stride, f"{kbs:.1f}",
                                   f"{cpu / 1000:.1f}", f"{peer / 1000:.1f}"])
                print(table_rows[-1], flush=True)
    table = markdown_table(["model", "threads", "stride", "C step, kB/s of counts", "C step, kB per CPU second",
                            "torch BatchStep (no sliding), kB/s"], table_rows)
    notes = (f"{args.rows} rows stepped together; context = the model's; a slide re-encodes context - stride "
             "bytes, so the C step does context / stride times the torch step's work per byte. Both quantise "
             "to integer counts; the torch step's counts differ between torch versions and CPU levels, the C "
             "step's do not (tests/test_model_step.py). kB per CPU second: bytes over the process's CPU time (all "
             "threads), less disturbed than the wall clock when other jobs share the cores.")
    c10 = headline["cpu10", 2, 96]
    report("Deterministic compression step", table, notes, write=not args.no_write,
           summary=(f"cpu10, 2 threads, stride 96: {c10:.1f} kB/s of counts",
                    f"torch BatchStep {table_rows[3][5]} kB/s (not portable)"))


if __name__ == "__main__":
    main()

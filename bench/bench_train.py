"""Training throughput: bytes/s, model FLOPs per byte, MFU and peak RSS, eager vs torch.compile, fp32 vs bf16.

    python bench/bench_train.py                      # upstream shape (6x8x192, batch 24 x 512)
    python bench/bench_train.py --batch-size 16 --seq-len 128 --no-write   # the default run's shape

Each row times full optimizer steps (forward, backward, Muon + AdamW) after warm-up steps, on random bytes.
MFU divides achieved model FLOP/s by the best matmul FLOP/s measured in the same run, for fp32 and bf16.
FLOPs per byte use nanoGPT's estimate, 6 N + 12 L C T, so the numbers compare with its MFU.
Each row runs in a fresh process, so its peak RSS is its own: the C allocator keeps what an earlier row freed
(at the upstream shape an eager row peaks near 1.9 GB, a compiled one near 1.6 GB).
A bf16 row is measured only where the CPU has native bf16 (see bytelm/device.py): elsewhere one step takes
minutes, and the row says so instead.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import markdown_table, matmul_peak_gflops, peak_rss_mb, report  # noqa: E402
from bytelm.config import ModelConfig  # noqa: E402
from bytelm.device import autocast, cpu_has_fast_bf16  # noqa: E402
from bytelm.model import ByteLM  # noqa: E402
from bytelm.train.optim import build_optimizers  # noqa: E402
from bytelm.train.loop import use_private_compile_cache  # noqa: E402


def flops_per_byte(model: ByteLM, seq_len: int) -> float:
    c = model.config
    return 6 * model.matmul_params() + 12 * c.n_layer * c.n_embd * seq_len


def time_steps(cfg: ModelConfig, batch: int, seq_len: int, dtype: str, compile_model: bool,
               warmup: int, steps: int) -> float:
    """Seconds per optimizer step (median of `steps` timed steps)."""
    torch.manual_seed(0)
    model = ByteLM(cfg)
    optimizers = build_optimizers(model, muon_lr=0.01, adam_lr=0.001)
    if compile_model:
        use_private_compile_cache("")  # as training does: bytelm.train.loop
    model.compile_blocks(compile_model)
    g = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    times = []
    for i in range(warmup + steps):
        x = torch.randint(0, 256, (batch, seq_len), generator=g)
        y = torch.randint(0, 256, (batch, seq_len), generator=g)
        t = time.perf_counter()
        with autocast(device, dtype):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def time_steps_fresh(*args) -> tuple[float, float]:
    """time_steps(*args) in a new process: (seconds per step, that process's peak RSS in MB)."""
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no memory held from earlier rows
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_time_steps_and_rss, *args).result()


def _time_steps_and_rss(*args) -> tuple[float, float]:
    return time_steps(*args), peak_rss_mb()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cfg = ModelConfig(block_size=max(512, args.seq_len))
    probe = ByteLM(cfg)
    fpb = flops_per_byte(probe, args.seq_len)
    del probe
    peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16, n=256, seconds=0.3)}
    bytes_per_step = args.batch_size * args.seq_len
    rows = []
    for dtype in ("fp32", "bf16"):
        for comp in ((False,) if args.no_compile else (False, True)):
            name = f"{dtype}, {'torch.compile' if comp else 'eager'}"
            if dtype == "bf16" and not cpu_has_fast_bf16():
                rows.append([name, "skipped: no native bf16 on this CPU", "", "", "", ""])
                continue
            sec, rss = time_steps_fresh(cfg, args.batch_size, args.seq_len, dtype, comp,
                                        args.warmup + (1 if comp else 0), args.steps)
            bps = bytes_per_step / sec
            achieved = bps * fpb / 1e9
            rows.append([name, sec, bps, achieved, f"{100 * achieved / peak[dtype]:.1f}%", rss])
    table = markdown_table(["precision, mode", "s/step", "bytes/s", "model GFLOP/s", "MFU (vs same-dtype peak)",
                            "peak RSS of the row (MB)"], rows)
    notes = (f"Shape: default model ({cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}), batch "
             f"{args.batch_size} x {args.seq_len} bytes = {bytes_per_step:,} bytes/step; {fpb / 1e6:.1f} MFLOP "
             f"per byte (6N + 12LCT). Matmul peak measured in this run: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 "
             f"{peak['bf16']:.1f} GFLOP/s. Median of {args.steps} steps after warm-up (compile time excluded).")
    measured = [r for r in rows if not isinstance(r[1], str)]
    report(f"Training throughput (batch {args.batch_size} x {args.seq_len})", table, notes, write=not args.no_write,
           summary=("; ".join(f"{r[0]} {r[2]:,.0f} B/s ({r[4]} MFU)" for r in measured),
                    f"fp32 matmul peak {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.1f}"))


if __name__ == "__main__":
    main()

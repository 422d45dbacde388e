"""Where one training step's time goes: batch, forward, backward, clipping, Muon, AdamW; then torch.profiler's ops.

    python bench/profile_train_step.py                          # seed shape: 6x8x192, batch 24 x 512, compiled
    python bench/profile_train_step.py --layers 4 --heads 4 --width 160 --batch 16 --seq 128 --value-embeds
    python bench/profile_train_step.py --ops 25                 # and the 25 costliest ops of two profiled steps

Prints medians over the steps after a warm-up (the first calls compile); nothing is written to the docs:
this is a profiling aid for deciding what to speed up, not a benchmark of record (bench/bench_train.py is).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bytelm.config import ModelConfig  # noqa: E402
from bytelm.data.batches import BatchSampler  # noqa: E402
from bytelm.model import ByteLM  # noqa: E402
from bytelm.train.loop import use_private_compile_cache  # noqa: E402
from bytelm.train.optim import build_optimizers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--value-embeds", action="store_true", help="the model with value embeddings")
    ap.add_argument("--ops", type=int, default=0, help="then profile two steps and print this many costliest ops")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): only the steps after it are timed")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.width, block_size=args.seq,
                                value_embeds=args.value_embeds))
    optimizers = build_optimizers(model, muon_lr=0.01, adam_lr=0.001)
    if not args.eager:
        use_private_compile_cache("")  # as training does: bytelm.train.loop
    model.compile_blocks(not args.eager)
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    sampler = BatchSampler(data, args.batch, args.seq, seed=0)
    names = ("batch", "forward", "backward", "clip", "Muon", "AdamW")
    times: dict[str, list[float]] = {name: [] for name in names}

    def step() -> list[float]:
        t = [time.perf_counter()]
        x, y = sampler.next_batch()
        t.append(time.perf_counter())
        _, loss = model(x, y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t.append(time.perf_counter())
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
            t.append(time.perf_counter())
        return [b - a for a, b in zip(t, t[1:])]

    for i in range(args.steps):
        dts = step()
        if i >= args.warmup:
            for name, dt in zip(names, dts):
                times[name].append(dt)
    medians = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    total = sum(medians.values())
    print(f"{args.layers}x{args.heads}x{args.width}, batch {args.batch} x {args.seq}, "
          f"{'eager' if args.eager else 'compiled'}, {args.threads} threads; median of "
          f"{args.steps - args.warmup} steps")
    for name, ms in medians.items():
        print(f"  {name:10s} {ms:8.1f} ms  {ms / total:6.1%}")
    print(f"  {'total':10s} {total:8.1f} ms  -> {args.batch * args.seq / total * 1e3:,.0f} bytes/s")
    if args.ops:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops, max_name_column_width=60))


if __name__ == "__main__":
    main()

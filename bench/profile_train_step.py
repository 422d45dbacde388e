"""Where one training step's time goes: forward + backward, gradient clipping, the optimizers' step.

    python bench/profile_train_step.py                          # 4x4x128, batch 16 x 128, compiled, 2 threads
    python bench/profile_train_step.py --layers 6 --heads 8 --width 192 --batch 24 --seq 512 --eager

Prints medians over the steps after a warm-up (the first calls compile); nothing is written to the docs:
this is a profiling aid for deciding what to speed up, not a benchmark of record.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bytelm.config import ModelConfig  # noqa: E402
from bytelm.model import ByteLM  # noqa: E402
from bytelm.train.optim import build_optimizers  # noqa: E402
from bytelm.train.loop import use_private_compile_cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--value-embeds", action="store_true", help="the model with value embeddings")
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
    x = torch.randint(0, 256, (args.batch, args.seq))
    y = torch.randint(0, 256, (args.batch, args.seq))
    times: dict[str, list[float]] = {"forward + backward": [], "clip": [], "optimizers": []}
    for i in range(args.steps):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t2 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= args.warmup:
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[name].append(dt)
    medians = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    total = sum(medians.values())
    print(f"{args.layers}x{args.heads}x{args.width}, batch {args.batch} x {args.seq}, "
          f"{'eager' if args.eager else 'compiled'}, {args.threads} threads; median of "
          f"{args.steps - args.warmup} steps")
    for name, ms in medians.items():
        print(f"  {name:20s} {ms:8.1f} ms  {ms / total:6.1%}")
    print(f"  {'total':20s} {total:8.1f} ms  -> {args.batch * args.seq / total * 1e3:,.0f} bytes/s")


if __name__ == "__main__":
    main()

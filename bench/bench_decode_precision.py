"""What the default generation step's fp16 weights cost in quality: a trained model's bits per byte and most likely
byte on held-out text, through the C step with fp32 weights and with fp16 copies, side by side.

    python bench/bench_decode_precision.py MODEL                 # appends to docs/benchmarks.md
    python bench/bench_decode_precision.py MODEL --bytes 1024 --no-write

The text is the last 10% of tinyshakespeare (the validation split of bench_time_to_quality.py), read in
windows of the model's context, each byte fed through the one-byte step with the KV cache exactly as
generation does.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import SHAKESPEARE, markdown_table, report  # noqa: E402
from bytelm.checkpoint import load_model  # noqa: E402
from bytelm.infer.step import FastDecoder  # noqa: E402
from bytelm.infer import native# noqa: E402


def run(model, decoder: FastDecoder, text: bytes) -> tuple[float, list[int], float]:
    """(bits per byte, the most likely byte at each position, steps per second)"""
    bs = model.config.block_size
    nll, top, n = 0.0, [], 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(text) - 1, bs):
            chunk = text[start:start + bs + 1]  # bs inputs, each predicting the next byte
            cache = model.new_cache(1)
            for i in range(len(chunk) - 1):
                logits = decoder.step(chunk[i], cache)
                nll += (torch.logsumexp(logits, 0) - logits[chunk[i + 1]]).item()
                top.append(int(logits.argmax()))
                n += 1
    return nll / n / math.log(2), top, n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a trained checkpoint")
    ap.add_argument("--bytes", type=int, default=8192, help="bytes of held-out text to score")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(args.model)
    data = SHAKESPEARE.read_bytes()
    text = data[int(len(data) * 0.9):][:args.bytes]
    exact, half = FastDecoder(model), FastDecoder(model, half=True)
    if not (exact.native and half.half):
        sys.exit(f"error: the C step with fp16 weights is not available here ({native.status()})")
    bpb32, top32, speed32 = run(model, exact, text)
    bpb16, top16, speed16 = run(model, half, text)
    agree = sum(a == b for a, b in zip(top32, top16)) / len(top32)
    cfg = model.config
    rows = [["C step, fp32 (exact)", bpb32, "", "", speed32],
            ["C step, fp16 weights (default)", bpb16, f"{bpb16 - bpb32:+.5f}", f"{agree:.2%}", speed16]]
    table = markdown_table(["step", "bits per byte", "difference", "same most likely byte", "steps/s"], rows)
    notes = (f"Model: {Path(args.model).name}, {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, context {cfg.block_size}, "
             f"{model.num_params():,} parameters. Text: the first {len(text):,} bytes of the last 10% of "
             f"{SHAKESPEARE.name}, in windows of the context; 1 thread.")
    report("Decode step precision: fp16 weights against fp32", table, notes, write=not args.no_write,
           summary=(f"fp16 weights {bpb16:.3f} bpb, same most likely byte {agree:.2%}",
                    f"fp32 step {bpb32:.3f} bpb (difference {bpb16 - bpb32:+.5f})"))


if __name__ == "__main__":
    main()

"""Lossless compression of held-out text: bytelm compress beside gzip -9, bzip2 -9, xz -9e and zstd -19.

    python bench/bench_compress.py                      # train the cpu10 recipe (10 min), into docs/benchmarks.md
    python bench/bench_compress.py --model cpu10.pt     # reuse a model trained on the same first 90%
    python bench/bench_compress.py --quick              # a check of this script: the tiny preset, 8 KB, no write

The text is tinyshakespeare: the model trains on its first 90% (`train.py --preset cpu10`, which holds out the
last 10% exactly as nanoGPT's prepare.py does), and every compressor gets those last 10% (111,540 bytes). Per
compressor: the file's size and bits per byte, compress and decompress speed (bytelm's through its Python API
in this process, the tools as subprocesses), peak resident memory (each as its own process: bytelm through
`bytelm compress|decompress`), and whether the round trip is exact. Beside it, the model's own bits per byte
over sliding windows (`bytelm score`, stride half the context), so the cost of coding segments of one context
each is visible, and the forward work per byte with the share of the fp32 matmul peak (measured in the same
run) that compress, decompress and score reach. Issue 26's targets: bytelm at most 0.75 x xz's size; compress
and decompress at least 10 kB/s with the cpu10 model (5 kB/s with the default 2.7M-parameter model) on 2 cores;
score at 50% or more of the matmul peak.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import SHAKESPEARE, markdown_table, matmul_peak_gflops, report  # noqa: E402
from bytelm.checkpoint import load_model  # noqa: E402
from bytelm.codec.compress import compress_bytes, decompress_bytes, read_header, step_rows  # noqa: E402
from bytelm.data.corpus import load_corpus  # noqa: E402
from bytelm.train.distributed import auto_threads  # noqa: E402
from bytelm.codec.score import score_bytes  # noqa: E402

TOOLS = [  # name, compress command, decompress command (stdin -> stdout)
    ("gzip -9", ["gzip", "-9", "-c"], ["gzip", "-d", "-c"]),
    ("bzip2 -9", ["bzip2", "-9", "-c"], ["bzip2", "-d", "-c"]),
    ("xz -9e", ["xz", "-9e", "-c"], ["xz", "-d", "-c"]),
    ("zstd -19", ["zstd", "-19", "-q", "-c"], ["zstd", "-d", "-q", "-c"]),
]


# Runs a command and prints its peak RSS: the command is forked from this small process, not from the benchmark
# (a child's ru_maxrss includes the memory of the process it was forked from, here hundreds of MB).
_MEASURE = """
import os, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(time.perf_counter() - t, usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], data: bytes) -> tuple[bytes, float, float]:
    """(stdout, seconds, peak RSS in MB) of one child process fed `data` on stdin."""
    with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as out:
        inp.write(data)
        inp.seek(0)
        proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], stdin=inp, stdout=out, stderr=subprocess.PIPE)
        err = proc.stderr.decode().strip().splitlines()
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {' '.join(err[-3:])}")
        seconds, rss_kb = err[-1].split()
        out.seek(0)
        return out.read(), float(seconds), int(rss_kb) / 1024


def tool_rows(data: bytes) -> list[dict]:
    rows = []
    for name, comp, decomp in TOOLS:
        if shutil.which(comp[0]) is None:
            print(f"{comp[0]} not installed: its row is left out", file=sys.stderr)
            continue
        packed, t_c, rss_c = run_measured(comp, data)
        unpacked, t_d, rss_d = run_measured(decomp, packed)
        rows.append(dict(name=name, size=len(packed), t_c=t_c, t_d=t_d, rss=max(rss_c, rss_d),
                         exact=unpacked == data))
    return rows


def bytelm_cli_rss(model_path: Path, data: bytes, threads: int) -> tuple[float, bool]:
    """Peak RSS of `bytelm compress` and `bytelm decompress` as a user runs them, and their round trip."""
    cli = [sys.executable, "-m", "bytelm.cli"]
    packed, _, rss_c = run_measured([*cli, "compress", str(model_path), "-", "-q", "--threads", str(threads)], data)
    unpacked, _, rss_d = run_measured([*cli, "decompress", str(model_path), "-", "-q", "--threads", str(threads)],
                                      packed)
    return max(rss_c, rss_d), unpacked == data


def step_flops_per_byte(model, segment_len: int) -> float:
    """Forward FLOPs of one coded byte: every weight matrix once (2 per weight), plus attention over the cache,
    whose length averages (segment_len + 1) / 2 over a segment."""
    cfg = model.config
    attention = 2 * 2 * cfg.n_embd * cfg.n_layer * (segment_len + 1) / 2
    return 2 * model.matmul_params() + attention


def score_flops_per_byte(model, stride: int) -> float:
    """Forward FLOPs `bytelm score` spends per scored byte: whole windows of the context, of which each later
    window scores `stride` bytes (causal attention: (T + 1) / 2 keys per query on average)."""
    cfg = model.config
    per_position = 2 * model.matmul_params() + 2 * 2 * cfg.n_embd * cfg.n_layer * (cfg.block_size + 1) / 2
    return per_position * cfg.block_size / stride


def train_model(out: Path, quick: bool) -> Path:
    from bytelm.train.config import TrainConfig
    from bytelm.train.loop import train
    overrides = dict(data=str(SHAKESPEARE), out=str(out), plot=False, sample_bytes=0, val_fraction=0.1)
    cfg = TrainConfig.from_preset("tiny" if quick else "cpu10", **overrides)
    train(cfg, progress=False, command="bench/bench_compress.py")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a checkpoint trained on tinyshakespeare's first 90%% "
                    "(default: train the cpu10 preset now, 10 minutes)")
    ap.add_argument("--quick", action="store_true", help="check this script: tiny preset, 8 KB, no docs write")
    ap.add_argument("--bytes", type=int, default=0, help="use only the first N held-out bytes (0: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores other processes leave free)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    held_out = bytes(load_corpus(str(SHAKESPEARE), val_fraction=0.1).val)
    limit = args.bytes or (8192 if args.quick else 0)
    data = held_out[:limit] if limit else held_out

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or train_model(Path(tmp) / "bench_compress.pt", args.quick)
        model, ckpt = load_model(model_path)
        peak = matmul_peak_gflops(torch.float32)

        t = time.perf_counter()
        blob = compress_bytes(model, data)
        t_c = time.perf_counter() - t
        t = time.perf_counter()
        exact = decompress_bytes(model, blob) == data
        t_d = time.perf_counter() - t
        stride = max(1, model.config.block_size // 2)
        t = time.perf_counter()
        scores = score_bytes(model, data, stride=stride)
        t_s = time.perf_counter() - t
        rss, cli_exact = bytelm_cli_rss(model_path, data, threads)
        peak_after = matmul_peak_gflops(torch.float32)
    tools = tool_rows(data)

    header = read_header(blob)
    cfg = model.config
    xz = next((r["size"] for r in tools if r["name"] == "xz -9e"), None)
    rows = [["bytelm (model)", f"{len(blob):,}", 8 * len(blob) / len(data), len(blob) / xz if xz else "n/a",
             f"{len(data) / t_c:,.0f}", f"{len(data) / t_d:,.0f}", f"{rss:,.0f}",
             "yes" if exact and cli_exact else "NO"]]
    rows += [[r["name"], f"{r['size']:,}", 8 * r["size"] / len(data), r["size"] / xz if xz else "n/a",
              f"{len(data) / r['t_c']:,.0f}", f"{len(data) / r['t_d']:,.0f}", f"{r['rss']:,.0f}",
              "yes" if r["exact"] else "NO"] for r in tools]
    table = markdown_table(["compressor", "size (bytes)", "bits/byte", "x xz", "compress B/s", "decompress B/s",
                            "peak RSS MB", "exact"], rows)
    step_flops = step_flops_per_byte(model, header.segment_len)
    score_flops = score_flops_per_byte(model, stride)
    peak_used = max(peak, peak_after)
    share = lambda flops, seconds: flops * len(data) / seconds / 1e9 / peak_used  # noqa: E731
    segments = (f"bytelm codes {header.segments} segments of {header.segment_len} bytes, {header.batch} side by side "
                f"({step_rows(header.batch)} rows per step) in {header.groups} group(s); its header takes "
                f"{len(blob) - 4 * sum(header.streams):,} bytes")
    notes = "\n".join([
        f"Input: the last 10% of tinyshakespeare ({len(data):,} bytes{' of it' if limit else ''}). Model: "
        f"{model_path.name}, {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, context {cfg.block_size}"
        f"{', value embeddings' if cfg.value_embeds else ''}, {model.num_params():,} parameters, step "
        f"{(ckpt.get('train_state') or {}).get('step', 'n/a')}; float32, {threads} torch thread(s). {segments}. "
        "Speeds: bytelm's through its Python API in this process (the command line adds about 2 s of start-up), "
        "the tools' as processes; peak RSS: each as its own process (`bytelm compress|decompress`).",
        "",
        f"- The model's bits per byte over sliding windows (`bytelm score`, stride {stride}): "
        f"{scores.bits_per_byte:.4f}; coded in segments of one context each: {8 * len(blob) / len(data):.4f} "
        "(header included).",
        f"- Forward work per coded byte: {step_flops / 1e6:.2f} MFLOP (every weight once, attention over "
        f"{(header.segment_len + 1) / 2:.0f} cached positions on average). fp32 matmul peak in this run: "
        f"{peak_used:,.0f} GFLOP/s ({peak:,.0f} before, {peak_after:,.0f} after). Compress reaches "
        f"{share(step_flops, t_c):.1%} of it, decompress {share(step_flops, t_d):.1%}.",
        f"- `bytelm score`: {len(data) / t_s:,.0f} B/s, {score_flops / 1e6:.2f} MFLOP computed per scored byte "
        f"(windows of {cfg.block_size}, stride {stride}): {share(score_flops, t_s):.1%} of the peak.",
    ])
    summary = (f"{8 * len(blob) / len(data):.3f} bpb, {len(data) / t_c / 1e3:.1f} / {len(data) / t_d / 1e3:.1f} kB/s",
               f"xz -9e {8 * xz / len(data):.3f} bpb" if xz else "no xz")
    report("Compression", table, notes, write=not (args.no_write or args.quick), summary=summary)


if __name__ == "__main__":
    main()

"""Generation speed, side by side in one run: bytelm with its KV cache (each one-byte step in C with fp16 or
fp32 weights, as lean torch operations, and through ByteLM.forward), bytelm recomputing the whole window for
every byte (what the upstream code did), and HuggingFace transformers GPT2LMHeadModel.generate() of the same
shape. Then bytelm alone past the window: 4,096 new bytes, time to first byte, peak RSS.

    python bench/bench_generation.py            # appends a table to docs/benchmarks.md
    python bench/bench_generation.py --no-write --new-bytes 64 --repeats 1

Settings (from the performance issue): 64-byte prompt, 448 new bytes (so a 512-position peer fits), batch 1,
temperature 0.8, top-k 50, top-p 0.9, default model shape (6 layers, 8 heads, width 192), untrained weights
(speed does not depend on them), stop-at-separator off so every run produces every byte.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import markdown_table, peak_rss_mb, report  # noqa: E402
from bytelm.config import ModelConfig  # noqa: E402
from bytelm.infer.step import FastDecoder  # noqa: E402
from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig  # noqa: E402
from bytelm.model import ByteLM  # noqa: E402
from bytelm.infer import native# noqa: E402
from bytelm.infer.sampling import CSampler, sample_next  # noqa: E402

PROMPT = (b"The quick brown fox jumps over the lazy dog. Byte-level models read"[:64])


def bytelm_kv(model, new_bytes, threads, step="auto") -> tuple[float, float]:
    """(bytes/s, seconds to first byte) for one generation with the KV cache; `step` as ByteLevelGenerator's
    decode_step (auto: the C step)."""
    torch.set_num_threads(threads)
    cfg = InferenceConfig(max_new_bytes=new_bytes, temperature=0.8, top_k=50, top_p=0.9,
                          repetition_penalty=1.0, seed=0, stop_at_separator=False)
    gen = ByteLevelGenerator(model, cfg, device="cpu", decode_step=step)
    t0 = time.perf_counter()
    it = gen.stream_bytes(PROMPT)
    next(it)
    ttfb = time.perf_counter() - t0
    n = 1 + sum(1 for _ in it)
    assert n == new_bytes, n
    return n / (time.perf_counter() - t0), ttfb


def bytelm_recompute(model, new_bytes, threads) -> float:
    """The upstream loop: run the whole (cropped) window through the model for every new byte."""
    torch.set_num_threads(threads)
    cfg = InferenceConfig(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.0)
    g = torch.Generator().manual_seed(0)
    ctx = torch.tensor(list(PROMPT), dtype=torch.long)[None]
    bs = model.config.block_size
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(new_bytes):
            logits, _ = model(ctx[:, -bs:])
            nxt = sample_next(logits[0, -1], cfg, None, g)
            ctx = torch.cat([ctx, nxt.view(1, 1)], dim=1)
    return new_bytes / (time.perf_counter() - t0)


def hf_gpt2(new_bytes, threads, cfg: ModelConfig) -> float | None:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                       n_layer=cfg.n_layer, n_head=cfg.n_head)).eval()
    ids = torch.tensor(list(PROMPT), dtype=torch.long)[None]
    kw = dict(max_new_tokens=new_bytes, min_new_tokens=new_bytes, do_sample=True, temperature=0.8, top_k=50,
              top_p=0.9, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
    assert out.shape[1] - ids.shape[1] == new_bytes
    return new_bytes / (time.perf_counter() - t0)


def step_costs(model, positions=(64, 256, 500), repeats=200) -> list[list]:
    """Milliseconds per one-byte step at a few cache positions, for each way of running it, and of choosing
    a byte with the benchmark's settings (sample_next in torch, and the C sampler): where a generation's time
    goes."""
    torch.set_num_threads(1)
    cfg = InferenceConfig(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.0)
    x = torch.tensor(65)
    steps = {"C step, fp16 weights": FastDecoder(model, half=True), "C step, fp32": FastDecoder(model),
             "lean torch step": FastDecoder(model, native=False)}
    rows = []
    with torch.inference_mode():
        cache = model.new_cache()
        model(torch.randint(0, 256, (1, max(positions))), cache=cache)  # fill the cache with something real
        for name, dec in [*steps.items(), ("ByteLM.forward step", None)]:
            row = [name]
            for pos in positions:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    cache.pos = pos
                    if dec is None:
                        model(x.view(1, 1), cache=cache, last_only=True)
                    else:
                        dec.step(x, cache)
                row.append((time.perf_counter() - t0) / repeats * 1e3)
            rows.append(row)
        logits, g = torch.randn(256) * 3, torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(repeats * 5):
            sample_next(logits, cfg, None, g)
        rows.append(["sample_next, torch (any position)",
                     *[(time.perf_counter() - t0) / (repeats * 5) * 1e3] * len(positions)])
        sampler = CSampler.create(cfg)
        if sampler is not None:
            t0 = time.perf_counter()
            for _ in range(repeats * 5):
                sampler(logits, 0, 0, g)
            ms = (time.perf_counter() - t0) / (repeats * 5) * 1e3
            rows.append(["C sampler (any position)", *[ms] * len(positions)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-bytes", type=int, default=448)
    ap.add_argument("--long-bytes", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds; each runs every row once, and each row reports its median")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = ByteLM(cfg).eval()
    threads = torch.get_num_threads()

    t0 = time.perf_counter()
    native.library()  # built (or loaded) once, before any timing: a first-use cost, not a per-generation one
    kernel_seconds = time.perf_counter() - t0
    # bytelm alone first, so the peak RSS is ours and not the HF model's.
    long_bps, long_ttfb = bytelm_kv(model, args.long_bytes, 1)  # 1 thread: what the CLIs use
    rss = peak_rss_mb()

    costs = step_costs(model)
    steps = {"C step, fp16 weights (default)": "auto", "C step, fp32 (exact)": "exact",
             "lean torch step": "torch", "ByteLM.forward step": "reference"}
    hf_threads = [t for t in sorted({1, threads}) if hf_gpt2(4, t, cfg)]  # [] where transformers is missing
    # Rounds: every row runs once per round, so each row sees the same spells of a shared machine's load and
    # the ratios compare like with like; each row reports its median over the rounds.
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, step in steps.items():
            runs.setdefault(name, []).append(bytelm_kv(model, args.new_bytes, 1, step)[0])
        runs.setdefault("recompute", []).append(bytelm_recompute(model, args.new_bytes, threads))
        for t in hf_threads:
            runs.setdefault(f"hf{t}", []).append(hf_gpt2(args.new_bytes, t, cfg))
    kv = {name: statistics.median(runs[name]) for name in steps}
    rec = statistics.median(runs["recompute"])
    hf = {t: statistics.median(runs[f"hf{t}"]) if t in hf_threads else None for t in sorted({1, threads})}
    best_hf = max((v for v in hf.values() if v), default=None)
    default = next(iter(steps))
    round_ratios = sorted(k / r for k, r in zip(runs[default], runs["recompute"]))
    rows = []
    for name, v in kv.items():
        rows.append([f"bytelm, KV cache, {name}", 1, v, v / rec, (v / best_hf) if best_hf else "n/a"])
    rows.append(["bytelm, full-window recompute (upstream)", threads, rec, 1.0, rec / best_hf if best_hf else "n/a"])
    for t, v in hf.items():
        rows.append(["HF transformers GPT2 generate()", t, v if v else "not installed", (v / rec) if v else "n/a",
                     (v / best_hf) if v else "n/a"])
    table = markdown_table([f"generator ({args.new_bytes} new bytes, 64-byte prompt)", "threads", "bytes/s",
                            "x recompute", "x best HF"], rows)
    table += "\n\n" + markdown_table(
        ["bytelm past the window", "new bytes", "bytes/s", "time to first byte (ms)", "peak RSS (MB)"],
        [["KV cache, default step, sliding window", args.long_bytes, long_bps, long_ttfb * 1000, rss]])
    table += "\n\n" + markdown_table(["ms per call, 1 thread", "cache position 64", "position 256",
                                       "position 500"], costs)
    report("Generation speed", table,
           notes=f"Median of {args.repeats} rounds per row (each round runs every row once); the default step "
                 f"against full recompute, round by round: "
                 f"{', '.join(f'{r:.0f}x' for r in round_ratios)}. Untrained default model "
                 f"({model.num_params():,} parameters), fp32 (the default C step reads fp16 copies of its "
                 f"matrices), batch 1, C sampler where the C step runs. C library: {native.status()} "
                 f"({kernel_seconds:.2f} s).",
           write=not args.no_write,
           summary=(f"{kv[default]:,.0f} B/s ({args.new_bytes} new bytes, default step)",
                    (f"HF generate() {best_hf:,.0f} B/s ({kv[default] / best_hf:.0f}x); " if best_hf else "")
                    + f"full recompute {rec:,.0f} B/s ({kv[default] / rec:.0f}x)"))


if __name__ == "__main__":
    main()

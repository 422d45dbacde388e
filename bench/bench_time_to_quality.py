"""Time to quality: validation bits per byte on tinyshakespeare after a fixed wall-clock budget.

    python bench/bench_time_to_quality.py                 # the cpu10 preset, 600 s in all, into docs/benchmarks.md
    python bench/bench_time_to_quality.py --budget 60 --no-write    # a quick look
    python bench/bench_time_to_quality.py --seeds 1337,1,2          # three runs of 600 s, a row each and the mean
    python bench/bench_time_to_quality.py n_layer=6                 # the preset with TrainConfig overrides

Each run is `train.py --preset cpu10` (bytelm.train.config.TRAIN_PRESETS): the first 90% of the file trains,
the last 10% validates, as nanoGPT's prepare.py splits it. The budget covers everything that the score needs:
loading the data, timing the final evaluation's reserve, training, its periodic evaluations and the final
evaluation of the best checkpoint on the WHOLE validation split over consecutive windows of seq_len bytes
(each window starts from no context, as nanoGPT-style evaluation does): that is the score. After the budget,
the same checkpoint is also scored over a sliding window that moves by seq_len / 2, so every byte after the
first window is predicted from at least seq_len / 2 bytes before it (the rate at which the model would
compress the text): a second view, not the score, so its cost is not taken from training.
Anchor: nanoGPT's CPU recipe stretched to 10 minutes on the same machine kind, 2.208 bpb; target <= 2.10.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import SHAKESPEARE, markdown_table, report  # noqa: E402
from bytelm.data.batches import SlidingBatches, eval_batches  # noqa: E402
from bytelm.checkpoint import load_model  # noqa: E402
from bytelm.data.corpus import load_corpus  # noqa: E402
from bytelm.device import thread_choice  # noqa: E402
from bytelm.train.evaluate import evaluate  # noqa: E402
from bytelm.train.metrics import bits_per_byte  # noqa: E402
from bytelm.model import ByteLM  # noqa: E402
from bytelm.train.config import TRAIN_PRESETS, TrainConfig  # noqa: E402
from bytelm.train.loop import train  # noqa: E402

# The final evaluation's reserve: its forward passes timed on a few batches before training, times this margin
# (the machine may be slower by then), plus LOAD_S for loading the best checkpoint; never more than
# `fixed_reserve` (so a busy moment during the timing cannot eat the budget). At 4x4x160 on the 2-core EPYC a
# batch takes 0.06-0.1 s as the machine's speed goes, so 7-10 s are kept for the 55 batches of the
# consecutive windows. A margin of 1.25 once left a run at 600 s of 600, rounded.
EVAL_MARGIN = 1.5
LOAD_S = 2.0
TIMED_BATCHES = 3


def fixed_reserve(n_params: int) -> float:
    """An upper bound on one evaluation's cost by model size: about 7 s at 4x4x128 (0.8M parameters) and 13 s
    at 6x8x192 (2.7M) were measured, and a 4x4x96 model (0.47M) used 599 s of 600 with 4 s + 7 s per million."""
    return 6.0 + 15.0 * n_params / 1e6


def final_eval_reserve(cfg: TrainConfig, val, n_batches: int) -> float:
    """Seconds to keep for scoring the best checkpoint on `n_batches` validation batches of cfg's shape: a fresh
    model of that shape is timed on TIMED_BATCHES of them, one at a time (after one to warm up), at the run's
    thread count, and the median taken. Costs about 0.2 s at 4x4x160, counted in the budget by the caller."""
    torch.set_num_threads(thread_choice(cfg.threads)[0])  # as train() will
    model = ByteLM(cfg.model_config())
    batches = eval_batches(val, cfg.batch_size, cfg.seq_len, max_batches=1 + TIMED_BATCHES)
    cpu = torch.device("cpu")
    times = []
    for i in range(len(batches)):
        t = time.perf_counter()
        evaluate(model, [batches[i]], cpu, "fp32")
        times.append(time.perf_counter() - t)
    per_batch = statistics.median(times[1:] or times)  # the first call allocates
    return min(fixed_reserve(model.matmul_params()), LOAD_S + EVAL_MARGIN * per_batch * n_batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=600.0, help="seconds for training + all evaluation")
    ap.add_argument("--data", default=str(SHAKESPEARE))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--preset", default="cpu10", choices=list(TRAIN_PRESETS),
                    help="the training recipe (TrainConfig preset) to run (default: cpu10)")
    ap.add_argument("--seeds", help="comma-separated seeds: one whole run (and budget) each, then their mean. "
                                    "Runs of one recipe differ by about 0.01-0.02 bpb with the seed")
    ap.add_argument("--save-model", type=Path, help="copy the first run's best checkpoint here (e.g. for "
                    "bench/bench_compress.py --model, which trains the same recipe on the same split)")
    ap.add_argument("train_flags", nargs="*", help="TrainConfig overrides as key=value, e.g. n_layer=4")
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"error: {args.data} not found (the benchmark text lives in ../shared/data)")
    overrides = {}
    defaults = TrainConfig.from_preset(args.preset)
    for kv in args.train_flags:
        k, sep, v = kv.partition("=")
        if not sep or not hasattr(defaults, k):
            ap.error(f"{kv!r} is not key=value with a TrainConfig field as key (e.g. n_layer=4)")
        t = type(getattr(defaults, k))
        try:
            overrides[k] = (v.lower() in ("1", "true", "yes")) if t is bool else t(v)
        except ValueError:
            ap.error(f"{k} takes a {t.__name__}, not {v!r}")

    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [None]
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, not {args.seeds!r}")
    runs = [one_run(args.data, args.budget, args.preset, overrides if seed is None else {**overrides, "seed": seed})
            for seed in seeds]
    if args.save_model:
        shutil.copyfile(runs[0]["model_path"], args.save_model)
    cfg = runs[0]["cfg"]
    shape = (f"bytelm --preset {args.preset}: {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}" + (", value embeddings" if cfg.value_embeds else "")
             + f", batch {cfg.batch_size} x {cfg.seq_len}"
             + (f" ({cfg.short_seq_share:.0%} of steps at {cfg.batch_size * cfg.seq_len // cfg.short_seq_len} x "
                f"{cfg.short_seq_len})" if cfg.short_seq_len else "")
             + f", compile {cfg.compile}")
    rows = [[shape + (f", seed {r['cfg'].seed}" if args.seeds else ""), r["params"], r["steps"], f"{r['wall']:.1f}",
             r["bpb"], r["bpb_sliding"], "2.208", "<= 2.10"] for r in runs]
    if len(runs) > 1:
        rows.append([f"mean of the {len(runs)} seeds", runs[0]["params"],
                     *(sum(r[k] for r in runs) / len(runs) for k in ("steps", "wall", "bpb", "bpb_sliding")),
                     "2.208", "<= 2.10"])
    table = markdown_table(["run", "parameters", "steps", "wall s (train + evals, in the budget)",
                            f"val bpb, whole split, consecutive {cfg.seq_len}-byte windows (best ckpt)",
                            f"same, sliding window (stride {cfg.seq_len // 2}; after the budget)", "nanoGPT anchor",
                            "target"], rows)
    notes = (f"Train/val: first 90% / last 10% of {Path(args.data).name} ({runs[0]['train_bytes']:,} / "
             f"{runs[0]['val_bytes']:,} bytes). " + " ".join(
                 f"{'Seed ' + str(r['cfg'].seed) + ': b' if args.seeds else 'B'}est checkpoint at step "
                 f"{r['best_step']} (val bpb on {cfg.eval_batches} batches during training: {r['best_val_bpb']:.4f}); "
                 f"{r['bytes_per_s']:,.0f} training bytes/s overall." for r in runs))
    mean_bpb = sum(r["bpb"] for r in runs) / len(runs)
    report(f"Time to quality: tinyshakespeare, {args.budget:.0f} s budget", table, notes, write=not args.no_write,
           summary=(f"{mean_bpb:.3f} val bpb after {args.budget:.0f} s"
                    + (f", mean of {len(runs)} seeds" if len(runs) > 1 else "") + " (target <= 2.10)",
                    "nanoGPT anchor 2.208 (published, not run here)"))


def one_run(data: str, budget: float, preset: str, overrides: dict) -> dict:
    """Train within `budget` seconds (the final evaluation's reserve included), then score the best checkpoint
    on the whole validation split over consecutive windows, within the budget, and over a sliding window."""
    out = Path(tempfile.mkdtemp(prefix="bytelm-ttq-")) / "model.pt"
    t0 = time.perf_counter()
    shape = TrainConfig.from_preset(preset, **{"data": data, **overrides})  # the shape and threads, for the reserve
    corpus = load_corpus(data, val_fraction=shape.val_fraction, cache_dir=shape.cache_dir or None)
    batches = eval_batches(corpus.val, shape.batch_size, shape.seq_len)  # the whole split
    sliding = SlidingBatches(corpus.val, shape.batch_size, shape.seq_len, stride=shape.seq_len // 2)
    reserve = final_eval_reserve(shape, corpus.val, len(batches))
    cfg = TrainConfig.from_preset(preset, **{**dict(data=data, out=str(out), plot=False, sample_bytes=0,
                                                    time_budget=budget - reserve - (time.perf_counter() - t0)),
                                             **overrides})
    summary = train(cfg, progress=False, command="bench/bench_time_to_quality.py")
    model, _ = load_model(out)
    cpu = torch.device("cpu")
    bpb = bits_per_byte(evaluate(model, batches, cpu, "fp32"))
    wall = time.perf_counter() - t0  # the budget ends here: the sliding score below is a second view
    bpb_sliding = bits_per_byte(evaluate(model, sliding, cpu, "fp32"))
    return dict(cfg=cfg, params=model.num_params(), steps=summary["steps"], wall=wall,
                bpb=bpb, bpb_sliding=bpb_sliding, best_step=summary["best_step"],
                best_val_bpb=summary["best_val_bpb"], bytes_per_s=summary["bytes_per_s"],
                train_bytes=len(corpus.train), val_bytes=len(corpus.val), model_path=out)


if __name__ == "__main__":
    main()

"""Fine-tuning against training from scratch, the same minutes each, in the same run: tinyshakespeare.

    python bench/bench_finetune.py                        # base: 180 s on the built-in corpus; then 120 s each
    python bench/bench_finetune.py --base byte_llm_model.pt --minutes 2
    python bench/bench_finetune.py --minutes 0.5 --base-seconds 60 --no-write     # a quick look

The base model is trained here (`--preset cpu10`, its shape, on the built-in corpus: Python's documentation)
unless --base names one. Then, one after the other and with the same time budget, the same threads and no
torch.compile (a compile cache warmed by the first run would favour the second):
  fine-tuned    train.py --preset finetune --init-from BASE --data tinyshakespeare.txt
  from scratch  train.py --preset cpu10 --data tinyshakespeare.txt      (the 10-minute recipe, the base's shape)
Both hold out the last 10% of tinyshakespeare (val_fraction 0.1); the score is the best checkpoint's bits per
byte on the WHOLE validation split over consecutive windows of 128 bytes, computed after each run (outside its
budget); the base model before fine-tuning is scored the same way.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import SHAKESPEARE, markdown_table, report  # noqa: E402
from bytelm.checkpoint import load_model, read_checkpoint  # noqa: E402
from bytelm.data.batches import eval_batches  # noqa: E402
from bytelm.data.corpus import load_corpus  # noqa: E402
from bytelm.train.config import TrainConfig  # noqa: E402
from bytelm.train.evaluate import evaluate  # noqa: E402
from bytelm.train.loop import train  # noqa: E402
from bytelm.train.metrics import bits_per_byte  # noqa: E402

COMMON = dict(plot=False, sample_bytes=0, compile="off", threads=2)


def score(path: Path, cfg: TrainConfig) -> float:
    """Bits per byte of the model at `path` on the whole validation split of cfg's data."""
    corpus = load_corpus(cfg.data, val_fraction=cfg.val_fraction, cache_dir=cfg.cache_dir or None)
    model, _ = load_model(path)
    return bits_per_byte(evaluate(model, eval_batches(corpus.val, cfg.batch_size, cfg.seq_len),
                                  torch.device("cpu"), "fp32"))


def describe(base: str) -> str:
    """'400 steps of --preset cpu10 on builtin, val 2.092 bpb there', from the checkpoint's training state."""
    state = read_checkpoint(base).get("train_state") or {}
    cfg, metrics = state.get("config") or {}, state.get("metrics") or {}
    if not cfg:
        return base
    return (f"{state.get('step')} steps of --preset {cfg.get('preset')} on {cfg.get('data')}"
            + (f", val {metrics['best_val_bpb']:.3f} bpb there" if metrics.get("best_val_bpb") else ""))


def run(name: str, cfg: TrainConfig) -> dict:
    print(f"--- {name}", flush=True)
    summary = train(cfg, progress=False, command="bench/bench_finetune.py")
    return dict(name=name, steps=summary["steps"], seconds=summary["seconds"], best_step=summary["best_step"],
                bytes_per_s=summary["bytes_per_s"], bpb=score(Path(cfg.out), cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a trained bytelm model to fine-tune (default: train one here)")
    parser.add_argument("--base-seconds", type=float, default=180.0, help="budget of the base model's training")
    parser.add_argument("--minutes", type=float, default=2.0, help="budget of each of the two runs")
    parser.add_argument("--data", default=str(SHAKESPEARE), help="the text to fine-tune on")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"{args.data} not found (the repository expects ../shared/data/tinyshakespeare.txt)")
    work = Path(tempfile.mkdtemp(prefix="bytelm-finetune-"))
    base = args.base
    if base is None:
        base = str(work / "base.pt")
        run("base", TrainConfig.from_preset("cpu10", data="builtin", val_fraction=0.05, out=base,
                                            time_budget=args.base_seconds, **COMMON))
    budget = 60 * args.minutes
    finetune = TrainConfig.from_preset("finetune", init_from=base, data=args.data, out=str(work / "ft.pt"),
                                       time_budget=budget, **COMMON).with_model(load_model(base)[0].config)
    scratch = TrainConfig.from_preset("cpu10", data=args.data, out=str(work / "scratch.pt"), time_budget=budget,
                                      **{**COMMON, **{k: getattr(finetune, k) for k in
                                                      ("n_layer", "n_head", "n_embd", "value_embeds")}})
    before = score(Path(base), finetune)
    runs = [run("fine-tuned (--preset finetune --init-from base)", finetune),
            run("from scratch (--preset cpu10)", scratch)]
    rows = [["base model, before fine-tuning", "", "", "", f"{before:.4f}"]]
    rows += [[r["name"], r["steps"], f"{r['seconds']:.0f}", f"{r['bytes_per_s']:,.0f}", f"{r['bpb']:.4f}"]
             for r in runs]
    table = markdown_table(["run", "steps", "train s", "train bytes/s", "val bpb (whole split)"], rows)
    shape = f"{finetune.n_layer}x{finetune.n_head}x{finetune.n_embd}" + (" + value embeddings"
                                                                         if finetune.value_embeds else "")
    notes = (f"Model {shape}; base: {describe(base)}. "
             f"Each run: {budget:.0f} s budget, 2 threads, no compile, one after the other; tinyshakespeare's "
             "last 10% held out, scored whole over consecutive 128-byte windows after training.")
    ft, sc = runs[0]["bpb"], runs[1]["bpb"]
    report(f"Fine-tuning: {budget:.0f} s on tinyshakespeare, fine-tuned against from scratch", table, notes,
           write=not args.no_write,
           summary=(f"{ft:.3f} val bpb fine-tuned for {budget:.0f} s", f"from scratch {sc:.3f} in the same time"))


if __name__ == "__main__":
    main()

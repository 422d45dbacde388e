"""Golden loss trace: the tiny preset's first training losses, pinned (as torchtitan pins its loss curves).

A change to the model's initialisation, the optimizer, the schedule, the data order or the loss moves these
numbers far more than the tolerance; float rounding on another CPU's kernels does not. Regenerate
tests/golden/losses.json only when a change to training is intended (tests/golden/README.md has the command),
and say why in the commit.
"""
import json
import random
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("golden") / "losses.json"
STEPS = 30
# Nats per step. Runs on one machine repeat to the last bit; another CPU's SIMD kernels round differently,
# and 30 steps amplify that to ~1e-4 at most, while any real change moves a loss by 1e-2 or more.
TOLERANCE = 2e-3
WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old tree and "
         "every morning the farmer walks to the river to fetch water for his garden").split()


def loss_trace(folder: Path) -> list[float]:
    """The per-step training losses of the tiny preset for STEPS steps on a fixed word-salad corpus: fp32, one
    thread, no compile, seed 1337 (TrainConfig's default)."""
    from bytelm.train.config import TrainConfig
    from bytelm.train.loop import train
    from bytelm.train.metrics import read_metrics
    from bytelm.train.run_files import RunPaths

    rng = random.Random(0)
    data = folder / "corpus.jsonl"
    docs = [" ".join(rng.choice(WORDS) for _ in range(150)) + "." for _ in range(40)]
    data.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    cfg = TrainConfig.from_preset("tiny", data=str(data), out=str(folder / "m.pt"), cache_dir=str(folder / "cache"),
                                  steps=STEPS, eval_every=STEPS, save_every=STEPS, dtype="fp32", threads=1,
                                  plot=False, sample_bytes=0)
    threads = torch.get_num_threads()
    try:
        train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return [r["loss"] for r in read_metrics(RunPaths.for_out(cfg.out).metrics) if "loss" in r]


def test_tiny_preset_loss_trace_matches_golden(tmp_path):
    pinned = json.loads(GOLDEN.read_text())
    got = loss_trace(tmp_path)
    assert len(got) == len(pinned["losses"]) == STEPS
    worst = max(abs(a - b) for a, b in zip(got, pinned["losses"]))
    assert worst <= TOLERANCE, (worst, got)
    assert got[-1] < got[0] - 1.0  # the trace is a learning run, not a flat line that anything would match


if __name__ == "__main__":  # python tests/test_golden_loss.py --write   (see tests/golden/README.md)
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        losses = loss_trace(Path(tmp))
    print("\n".join(f"{i + 1:3d} {x:.6f}" for i, x in enumerate(losses)))
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps({"preset": "tiny", "steps": STEPS, "dtype": "fp32", "threads": 1,
                                      "torch": torch.__version__, "losses": losses}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")

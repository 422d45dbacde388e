"""Training metrics on disk: a JSON-lines log and a loss plot, both next to the checkpoint.

    <out stem>.metrics.jsonl   one JSON object per line: {"step", "loss", "lr", ...} per training step,
                               {"step", "val_loss", "val_bpb", ...} per evaluation
    <out stem>.loss.png        train and validation bits per byte against step (matplotlib, Agg backend)

Only rank 0 writes. A resumed run first drops records past the step it resumes from (they belong to steps
that are about to be redone), so the log always reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

LN2 = math.log(2.0)


def bits_per_byte(nats: float) -> float:
    """Mean cross-entropy in nats per byte -> bits per byte."""
    return nats / LN2


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics log, skipping a torn last line (a crash mid-write)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return out


class MetricsLog:
    """Append-only JSON-lines log; `truncate_after(step)` rewinds it for a resumed run."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def reset(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the line being written

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> bool:
    """Draw train (raw and smoothed) and validation bits per byte. Returns False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed; must precede pyplot's import
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(metrics_path)
    train = [(r["step"], bits_per_byte(r["loss"])) for r in records if "loss" in r]
    val = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps, bpb = zip(*train)
        ax.plot(steps, bpb, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        window = min(100.0, max(1.0, len(bpb) / 30))  # ~30 independent points across any run length
        ax.plot(steps, _ema(bpb, 1 - 1 / window), color="tab:blue", linewidth=1.5, label="train (smoothed)")
    if val:
        steps, bpb = zip(*val)
        ax.plot(steps, bpb, "o-", color="tab:orange", markersize=3, label="validation")
        best = min(val, key=lambda sv: sv[1])
        ax.annotate(f"best {best[1]:.3f}", best, textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("bytelm training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


def _ema(values, beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam), so the curve starts at the first value."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out

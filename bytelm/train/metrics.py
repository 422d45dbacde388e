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

from bytelm.files import atomic_write

LN2 = math.log(2.0)
PLOT_TITLE = "bytelm training loss"  # also stored in the PNG's metadata: how --force knows the plot is ours


def bits_per_byte(nats: float) -> float:
    """Mean cross-entropy in nats per byte -> bits per byte."""
    return nats / LN2


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics log (objects with a "step"), skipping a torn last line (a crash mid-write)."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # JSONDecodeError, or a number too long to convert
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    out.append(record)
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
        keep = [r for r in read_metrics(self.path) if r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in keep).encode("utf-8")
        atomic_write(self.path, lambda f: f.write(text))

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
    train = [(r["step"], bits_per_byte(r["loss"])) for r in records if _is_number(r.get("loss"))]
    val = [(r["step"], r["val_bpb"]) for r in records if _is_number(r.get("val_bpb"))]
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
    ax.set_title(PLOT_TITLE)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda f: fig.savefig(f, format="png", metadata={"Title": PLOT_TITLE}))
    finally:
        plt.close(fig)
    return True


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ema(values, beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam), so the curve starts at the first value."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out

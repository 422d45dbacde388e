"""The sliding-window plan: score every position of a sequence once, each with as much context as a window allows.

    from bytelm.windows import sliding_windows
    starts, first = sliding_windows(n=10, context=4, stride=2)   # [0 2 4 6], [0 4 6 8]

Window k reads the inputs [starts[k], starts[k] + context) and scores the predictions [first[k], starts[k] +
context): those no earlier window scored. The first window scores all of its own; later ones start every
`stride` positions, and the last is moved back to end at the sequence's end, so all windows but a lone short
first one are exactly `context` long and stack into one batch. Every prediction after the first window is
made from at least context - stride positions before it, as a compressor running the model over the text
would see it. Costs context / stride times the positions of consecutive windows.

One plan for every sliding score: bytelm.data.batches.SlidingBatches (time-to-quality's sliding evaluation) and
bytelm.codec.score.score_bytes (`bytelm score`, the server's /v1/score, and the model's bits per byte that
bench/bench_compress.py sets beside the compressed sizes).
"""
from __future__ import annotations

import numpy as np


def sliding_windows(n: int, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, first): int64 arrays of one entry per window over n predictions (the module docstring has the
    plan); both empty for n <= 0. Needs 1 <= stride <= context."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be from 1 to the context ({context}), got {stride}")
    if n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    last = max(0, n - context)  # the start of the window that ends at the sequence's end
    starts = np.arange(0, last + 1, stride, dtype=np.int64)
    if starts[-1] != last:
        starts = np.append(starts, np.int64(last))
    first = np.concatenate((np.zeros(1, np.int64), starts[:-1] + context))  # past what the window before scored
    return starts, first

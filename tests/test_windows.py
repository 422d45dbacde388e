"""The one sliding-window plan (bytelm/windows.py) that SlidingBatches and score_bytes share."""
import numpy as np
import pytest

from bytelm.data.batches import SlidingBatches
from bytelm.windows import sliding_windows


def test_sliding_windows_score_every_prediction_once_with_context():
    for n in (1, 5, 64, 65, 100, 1000):
        for stride in (1, 7, 32, 64):
            starts, first = sliding_windows(n, 64, stride)
            scored = []
            for i, (start, lo) in enumerate(zip(starts.tolist(), first.tolist())):
                assert start <= lo and (start == 0 or start + 64 <= n)  # full windows, but a lone short first
                scored.extend(range(lo, min(start + 64, n)))
                assert lo - start >= (64 - stride if i else 0)  # every byte has at least context - stride before it
            assert scored == list(range(n))


def test_sliding_windows_of_nothing_and_bad_strides():
    assert [a.tolist() for a in sliding_windows(0, 8, 4)] == [[], []]
    for stride in (0, 9):
        with pytest.raises(ValueError, match="stride"):
            sliding_windows(10, 8, stride)


def test_sliding_batches_follow_the_plan():
    data = np.arange(200, dtype=np.uint8)
    batches = SlidingBatches(data, batch_size=4, seq_len=32, stride=12)
    starts, first = sliding_windows(len(data) - 1, 32, 12)  # 199 predictions: bytes 1..199
    assert batches.starts.tolist() == starts.tolist() and batches.first_scored.tolist() == (first - starts).tolist()

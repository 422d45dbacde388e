"""Windows and batches over a corpus split: training batches in shuffled passes, fixed validation batches.

    from bytelm.data.batches import BatchSampler, eval_batches
    sampler = BatchSampler(corpus.train, batch_size=32, seq_len=512, seed=0)
    x, y = sampler.next_batch()                      # (B, T) int64 each; y is x shifted left by one byte
    for x, y in eval_batches(corpus.val, 32, 512):   # fixed held-out batches for validation bits per byte
        ...
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bytelm.data.documents import check_rank
from bytelm.errors import DataError
from bytelm.device import require_memory
from bytelm.data.split import check_size
from bytelm.windows import sliding_windows

STATE_VERSION = 2  # of BatchSampler.state_dict(): refused unless equal, so a resumed stream is always exact
# Bytes per element of a (B, T + 1) batch while it is cut: the int64 index, the gathered uint8 window, its
# int64 copy, and x and y (int64, T each).
_BYTES_PER_WINDOW_BYTE = 8 + 1 + 8 + 16


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shape(batch_size: int, seq_len: int) -> None:
    for label, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not (_is_int(v) and v >= 1):
            raise DataError(f"{label} must be a positive integer, got {v!r}")


def check_memory(need: int, what: str, fix: str) -> None:
    """Raise DataError before allocating `need` bytes for `what` if that is more than half the memory this
    process may use (bytelm.device.require_memory): the model's activations for the same batch need many times
    more than the batch."""
    require_memory([(what, need)], "cpu", what=what, share=0.5, fix=fix, error=DataError)


def _check_batch_memory(batch_size: int, seq_len: int, n_windows: int, bytes_per_window: int,
                        rows: int | None = None) -> None:
    """One batch of `rows` windows (batch_size, unless the split has fewer), and the n_windows start positions
    (int64 arrays, bytes_per_window in all) made up front."""
    rows = batch_size if rows is None else rows
    check_memory(rows * (seq_len + 1) * _BYTES_PER_WINDOW_BYTE,
                 f"a batch of batch_size {batch_size:,} x seq_len {seq_len:,}", "lower batch_size or seq_len")
    check_memory(n_windows * bytes_per_window, f"indexing {n_windows:,} windows of seq_len {seq_len:,}",
                 "raise seq_len or use less data")


def _as_array(data) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1):
        raise TypeError(f"expected a 1-D uint8 numpy array (a corpus split), got {type(data).__name__}")
    return data


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T + 1)
    window = torch.from_numpy(np.asarray(data[idx], dtype=np.int64))  # gather copies, even from a memmap
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # x, y: (B, T) each


def _pass_seed(seed: int, p: int) -> int:
    """A well-mixed 63-bit seed for pass p of `seed`: no two passes or seeds share an order."""
    digest = hashlib.blake2b(f"bytelm-batch {seed} -1 {p}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BatchSampler:
    """Windows of seq_len+1 bytes -> (x, y) int64 tensors (B, T), in passes over the split; reproducible and
    resumable.

    Each pass tiles the split with windows that start every seq_len bytes from a random offset, so each window's
    last target is the next one's first input and every byte is a target once per pass (but for the offset at
    the start and less than two windows at the end), and hands them out in a random order. Batch k of rank r
    takes the window positions (k W + r) B ... (k W + r + 1) B - 1 of that sequence of passes (W ranks, B
    windows a batch), so the ranks share each pass out between them. A pass's offset and order come from a
    generator seeded with hash(seed, pass), so the whole state is the pair (seed, batches drawn): identical on
    every rank. Saving rank 0's state_dict and loading it on every rank resumes each rank's own stream exactly.

    Why passes: windows drawn independently (with replacement) leave some bytes never a target and others a
    target many times in a run of a few passes; passes make every byte a target once per pass, and scored
    lower validation bits per byte at equal steps (docs/training.md).
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, *, name: str = "train"):
        _check_shape(batch_size, seq_len)
        check_rank(rank, world_size)
        data = _as_array(data)
        check_size(data, seq_len, name)
        # Windows per pass: one fewer than fit, so that any offset in [0, seq_len) leaves room for them all.
        self.windows_per_pass = max(1, (len(data) - 1) // seq_len - 1)
        _check_batch_memory(batch_size, seq_len, self.windows_per_pass, 8)  # a pass's order: int64
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.batches = 0  # batches drawn so far
        self._order: tuple[int, int, np.ndarray] | None = None  # (pass, offset, window order) last drawn
        self._gen = torch.Generator()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._pass_starts()
        self.batches += 1
        return _windows(self.data, starts, self.seq_len)

    def _pass_starts(self) -> np.ndarray:
        first = (self.batches * self.world_size + self.rank) * self.batch_size
        slots = np.arange(first, first + self.batch_size)  # (B,) positions in the sequence of passes
        passes, index = np.divmod(slots, self.windows_per_pass)
        starts = np.empty(self.batch_size, dtype=np.int64)
        for p in np.unique(passes):  # one pass, or two where a batch spans a pass boundary
            offset, order = self._pass_order(int(p))
            here = passes == p
            starts[here] = offset + order[index[here]] * self.seq_len
        return starts

    def _pass_order(self, p: int) -> tuple[int, np.ndarray]:
        """(offset, window order) of pass p: the same on every rank."""
        if self._order is None or self._order[0] != p:
            self._gen.manual_seed(_pass_seed(self.seed, p))
            room = len(self.data) - 1 - self.windows_per_pass * self.seq_len  # >= 0: the windows always fit
            offset = int(torch.randint(0, min(self.seq_len, room + 1), (1,), generator=self._gen))
            self._order = (p, offset, torch.randperm(self.windows_per_pass, generator=self._gen).numpy())
        return self._order[1], self._order[2]

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "batches": self.batches,
                "batch_size": self.batch_size, "seq_len": self.seq_len}  # plain ints: weights_only-safe

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was saved. The continuation is exact when data, batch_size and seq_len are
        the ones it was saved with; otherwise the stream goes on from the same point with the new shapes."""
        if not (isinstance(state, Mapping) and state.get("version") == STATE_VERSION):
            raise DataError(f"invalid batch sampler state in checkpoint (expected a mapping with version "
                            f"{STATE_VERSION}, seed and batches)")
        seed, batches = state.get("seed"), state.get("batches")
        if not (_is_int(seed) and abs(seed) < 2**64):
            raise DataError(f"invalid batch sampler state in checkpoint: seed {seed!r:.40} is not a 64-bit integer")
        # Window positions are int64: batch `batches` of every rank must still be addressable.
        if not (_is_int(batches) and 0 <= batches and (batches + 1) * self.world_size * self.batch_size < 2**62):
            raise DataError(f"invalid batch sampler state in checkpoint: batches {batches!r:.40} is not a "
                            f"count of batches drawn")
        self.seed, self.batches = seed, batches
        self._order = None


class _FixedBatches(Sequence):
    """Fixed windows (self.starts), batch_size of them per item; subclasses say what batch(rows) holds."""

    batch_size: int
    starts: np.ndarray

    def __len__(self) -> int:
        return math.ceil(len(self.starts) / self.batch_size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.batch(slice(i * self.batch_size, (i + 1) * self.batch_size))

    def batch(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class EvalBatches(_FixedBatches):
    """Fixed validation batches, made on access so a large split costs no memory up front. A Sequence:
    len(), iteration and indexing behave like a list's. The last batch may have fewer than batch_size rows:
    weight batch losses by x.numel() for an exact mean over bytes."""

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None,
                 *, name: str = "validation"):
        _check_shape(batch_size, seq_len)
        if max_batches is not None and not (_is_int(max_batches) and max_batches >= 1):
            raise DataError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        data = _as_array(data)
        check_size(data, seq_len, name)
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        # Consecutive windows: window j predicts bytes j*T+1 .. (j+1)*T, so each byte is scored once.
        n_windows = (len(data) - 1) // seq_len
        k = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
        _check_batch_memory(batch_size, seq_len, k, 16, rows=min(batch_size, k))  # chosen and starts: int64
        chosen = np.arange(k, dtype=np.int64)
        if k < n_windows:  # spread the chosen windows evenly over the whole split
            chosen = chosen * n_windows // k
        self.starts = chosen * seq_len

    def batch(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return _windows(self.data, self.starts[rows], self.seq_len)


IGNORE = -100  # a target that scores nothing: F.cross_entropy's default ignore_index


class SlidingBatches(_FixedBatches):
    """Every byte of a split scored once, each with as much context as a window allows: windows of seq_len
    bytes start every `stride` bytes, and each scores only the targets that no earlier window scored (the
    first scores all of its own; the last is moved back to end at the split's end). So every byte after
    the first window is predicted from at least seq_len - stride bytes before it, as a compressor running
    the model over the text would see it, where consecutive windows (EvalBatches) restart from nothing at
    every boundary. Costs seq_len / stride times the forward passes. Items are (x, y): (B, T) int64 each,
    with y = IGNORE at the targets a window does not score."""

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, stride: int, *,
                 name: str = "validation"):
        _check_shape(batch_size, seq_len)
        if not (_is_int(stride) and 1 <= stride <= seq_len):
            raise DataError(f"stride must be an integer from 1 to seq_len ({seq_len}), got {stride!r}")
        data = _as_array(data)
        check_size(data, seq_len, name)
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        n_windows = (len(data) - 1 - seq_len) // stride + 2  # at most
        check_memory(n_windows * 40, f"sliding windows every {stride:,} bytes over {len(data):,} bytes",
                     "raise the stride")  # starts, first and temporaries: int64
        _check_batch_memory(batch_size, seq_len, 0, 0, rows=min(batch_size, n_windows))
        # Window k predicts bytes starts[k]+1 .. starts[k]+T and scores those from first[k] on (bytelm/windows.py).
        self.starts, first = sliding_windows(len(data) - 1, seq_len, stride)
        self.first_scored = first - self.starts  # first scored position in each window

    def batch(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _windows(self.data, self.starts[rows], self.seq_len)
        unscored = torch.arange(self.seq_len) < torch.from_numpy(self.first_scored[rows])[:, None]  # (B, T)
        return x, y.masked_fill(unscored, IGNORE)  # not in place: with one row, x and y share storage


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None,
                 *, name: str = "validation") -> EvalBatches:
    """Fixed, deterministic held-out batches: consecutive non-overlapping windows, evenly spread over the
    split when max_batches limits them; max_batches=None covers the whole split. Raises DataError if the
    split is shorter than one window."""
    return EvalBatches(data, batch_size, seq_len, max_batches, name=name)

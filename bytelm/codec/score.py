"""How surprising each byte of a file is to a model: surprisal, entropy and rank per byte; entropy patches.

    from bytelm import load_model
    from bytelm.codec.score import score_bytes, entropy_patches
    model, _ = load_model("byte_llm_model.pt")
    s = score_bytes(model, open("notes.txt", "rb").read(), top_k=3)   # TypeError for anything not bytes-like
    for piece, scores in score_stream(model, iter(lambda: f.read(1 << 20), b"")): ...   # bounded memory
    s.bits_per_byte, s.surprisal[:10], s.rank[:10], s.top_bytes[:10]
    starts = entropy_patches(s.entropy, threshold=2.0)     # Byte Latent Transformer style patch starts

`bytelm score MODEL FILE...` (bytelm/cli/score.py) is the command line.

Every byte is predicted from up to a full context. The data is read as the model was trained to read a
document: after the separator byte 0 (DOC_SEPARATOR), so the first byte is predicted from no context, as
generation does. Windows of the model's context slide over it with a stride (default half the context); the
first window scores all its predictions, every later one only those past the previous window's end, so each
byte is scored once with at least `context - stride` bytes before it (or all bytes before it, near the start).
Windows are stacked into batches so one forward pass scores many of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from bytelm.config import DOC_SEPARATOR
from bytelm.errors import BytelmError
from bytelm.model import ByteLM
from bytelm.windows import sliding_windows

_LN2 = math.log(2.0)
# Positions per forward pass when batch_size is not given: large enough that the matrix products run near the
# machine's peak, small enough that the (B, T, 256) logits stay a few MB.
_POSITIONS_PER_BATCH = 4096
_PROGRESS_MIN_BYTES = 1 << 16  # a progress bar for less than this would flash by


@dataclass
class ByteScores:
    """Per-byte scores of one input, one row per byte (N rows).

    surprisal  (N,) float32   -log2 p(byte | bytes before it), in bits
    entropy    (N,) float32   entropy of the predicted distribution over the 256 values, in bits
    rank       (N,) int16     rank of the actual byte among the 256 (1 = the model's most likely byte)
    top_bytes  (N, k) uint8   the k most likely bytes, most likely first (k = top_k; (N, 0) when top_k is 0)
    top_probs  (N, k) float32 their probabilities
    """
    surprisal: np.ndarray
    entropy: np.ndarray
    rank: np.ndarray
    top_bytes: np.ndarray
    top_probs: np.ndarray

    def __len__(self) -> int:
        return len(self.surprisal)

    @property
    def total_bits(self) -> float:
        return float(self.surprisal.sum(dtype=np.float64))

    @property
    def bits_per_byte(self) -> float:
        """Mean surprisal in bits; 0.0 for an empty input (nothing to code costs nothing)."""
        return self.total_bits / len(self) if len(self) else 0.0


def _empty_scores(top_k: int) -> ByteScores:
    return ByteScores(np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.int16),
                      np.zeros((0, top_k), np.uint8), np.zeros((0, top_k), np.float32))


def progress_callback(progress, total: int | None, label: str = "scoring"):
    """progress: None/False (silent), True (a tqdm bar on stderr when it is a terminal, for inputs of 64 KiB or
    more or of unknown size, total None) or a callable(bytes_done, total). Returns (update(n_new), close())."""
    if callable(progress):
        done = [0]

        def update(k: int) -> None:
            done[0] += k
            progress(done[0], total)
        return update, lambda: None
    if progress and (total is None or total >= _PROGRESS_MIN_BYTES):
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False, disable=None)
        return bar.update, bar.close
    return (lambda k: None), (lambda: None)


def _check_data(data) -> bytes | memoryview:
    """`data` as a bytes-like object; TypeError naming `data` for anything else (an int would be bytes(n) zeros)."""
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        return data.cast("B") if data.format != "B" else data
    raise TypeError(f"data must be bytes-like (bytes, bytearray or memoryview), not {type(data).__name__}")


def _check_settings(model: ByteLM, stride, top_k, batch_size) -> tuple[int, int]:
    """(stride, batch_size) with their defaults, each checked; the batch's memory checked against the limit."""
    cfg = model.config
    context = cfg.block_size
    stride = max(1, context // 2) if stride is None else stride
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= context:
        raise BytelmError(f"stride must be an integer in 1..{context} (the model's context), got {stride!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= 256:
        raise BytelmError(f"top_k must be an integer in 0..256, got {top_k!r}")
    if batch_size is None:
        batch_size = max(1, _POSITIONS_PER_BATCH // context)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise BytelmError(f"batch_size must be a positive integer, got {batch_size!r}")
    # What one forward pass of batch_size windows holds at once: per position the logits and their log-softmax
    # (V floats each, twice), a layer's activations (about 16 x n_embd floats), and one layer's attention
    # scores (n_head x context floats).
    positions = batch_size * context
    per_position = 4 * (3 * cfg.vocab_size + 16 * cfg.n_embd + 2 * cfg.n_head * context)
    from bytelm.device import require_memory
    require_memory([(f"scoring batch (batch_size {batch_size:,} x context {context} positions)",
                     positions * per_position)], next(model.parameters()).device)
    return stride, batch_size


def score_bytes(model: ByteLM, data: bytes, *, stride: int | None = None, top_k: int = 0,
                batch_size: int | None = None,
                progress: bool | Callable[[int, int], None] | None = None) -> ByteScores:
    """Score every byte of `data` (bytes-like) with `model` (see the module docstring for how windows slide).

    stride: bytes each window moves on (1..context; default half the context). top_k: how many most likely
    bytes to keep per position (0..256). batch_size: windows per forward pass (default: about 4,096 positions).
    progress: None/False, True (a tqdm bar for large inputs) or a callable(bytes_done, total).
    """
    data = _check_data(data)
    pieces = [s for _, s in score_stream(model, [data], stride=stride, top_k=top_k, batch_size=batch_size,
                                         progress=progress, total=len(data))]
    if not pieces:
        _check_settings(model, stride, top_k, batch_size)
        return _empty_scores(top_k)
    return ByteScores(*(np.concatenate([getattr(p, f) for p in pieces]) for f in ByteScores.__dataclass_fields__))


def score_stream(model: ByteLM, chunks: Iterable[bytes], *, stride: int | None = None, top_k: int = 0,
                 batch_size: int | None = None, progress: bool | Callable[[int, int], None] | None = None,
                 total: int | None = None) -> Iterator[tuple[bytes, ByteScores]]:
    """Score a stream given as chunks of bytes, yielding (bytes, their ByteScores) pieces in order.

    The windows are exactly score_bytes' over the concatenation (so are the scores), but memory holds one
    batch of windows, never the whole input: an endless stream is scored in bounded memory. `total` (bytes,
    if known) is for the progress bar only.
    """
    stride, batch_size = _check_settings(model, stride, top_k, batch_size)
    context = model.config.block_size
    device = next(model.parameters()).device
    buf = bytearray([DOC_SEPARATOR])  # seq[base:]: the separator, then the data; inputs[i] = seq[i]
    base, n, scored_to, last_start, planned = 0, 0, 0, None, 0  # n: data bytes read; planned: windows so far
    pending: list[tuple[int, int]] = []  # (start, first scored) of windows not yet run
    update, close = progress_callback(progress, total)
    was_training = model.training
    model.eval()

    def run(windows: list[tuple[int, int]], width: int) -> tuple[bytes, ByteScores]:
        nonlocal buf, base
        seq = np.frombuffer(bytes(buf), np.uint8)
        starts = torch.tensor([s - base for s, _ in windows])
        index = starts[:, None] + torch.arange(width)  # (B, T)
        inputs = torch.from_numpy(seq[:-1].astype(np.int64))
        targets = torch.from_numpy(seq[1:].astype(np.int64))
        first, end = windows[0][1], min(windows[-1][0] + width, n)
        out = ByteScores(np.empty(end - first, np.float32), np.empty(end - first, np.float32),
                         np.empty(end - first, np.int16), np.empty((end - first, top_k), np.uint8),
                         np.empty((end - first, top_k), np.float32))
        with torch.inference_mode():
            logits, _ = model(inputs[index].to(device))  # (B, T, V)
        for row, (start, lo) in enumerate(windows):
            hi = min(start + width, n)
            _score_rows(logits[row, lo - start:hi - start], targets[lo - base:hi - base], out, lo - first, top_k)
        update(end - first)
        piece = bytes(buf[first + 1 - base:end + 1 - base])
        keep = max(0, end - context)  # the next windows start at or after end - context
        del buf[:keep - base]
        base = keep
        return piece, out

    try:
        for chunk in chunks:
            buf += _check_data(chunk)
            n += len(chunk)
            # A window of sliding_windows' plan may run before the end is known once it is a full context
            # long: the plan's windows start every `stride` bytes, and only the last one (moved back to end at
            # n) needs n.
            while True:
                start = 0 if last_start is None else last_start + stride
                if start + context > n:
                    break
                pending.append((start, scored_to))
                last_start, scored_to, planned = start, start + context, planned + 1
                if len(pending) == batch_size:
                    yield run(pending, context)
                    pending = []
        starts, firsts = sliding_windows(n, context, stride)  # the whole plan, now that n is known
        pending += list(zip(starts[planned:].tolist(), firsts[planned:].tolist()))
        for b in range(0, len(pending), batch_size):
            yield run(pending[b:b + batch_size], min(context, n))
    finally:
        close()
        model.train(was_training)


def _score_rows(logits: torch.Tensor, targets: torch.Tensor, out: ByteScores, at: int, top_k: int) -> None:
    """Fill out[at : at + len(targets)] from logits (T, V) and the bytes that followed, targets (T,)."""
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # (T, V)
    targets = targets[:, None]
    actual = logp.gather(1, targets)  # (T, 1)
    end = at + len(targets)
    out.surprisal[at:end] = (-actual[:, 0] / _LN2).numpy()
    out.entropy[at:end] = (-(logp.exp() * logp).sum(-1) / _LN2).clamp_(min=0).numpy()
    out.rank[at:end] = ((logp > actual).sum(-1) + 1).numpy()
    if top_k:
        top = logp.topk(top_k, dim=-1)
        out.top_bytes[at:end] = top.indices.numpy()
        out.top_probs[at:end] = top.values.exp().numpy()


def entropy_patches(entropy: np.ndarray, *, threshold: float | None = None, relative: float | None = None,
                    max_len: int | None = None) -> np.ndarray:
    """Start positions of entropy patches, as the Byte Latent Transformer cuts bytes (Pagnoni et al., 2024).

    A new patch starts at byte i when the entropy of its prediction exceeds `threshold` (the global
    constraint) or rises over the previous byte's by more than `relative` (the approximate monotonic
    constraint); a patch that has reached `max_len` bytes is cut there. With neither threshold given, the
    global threshold is the input's mean entropy. Returns sorted int64 starts, 0 first (empty for no bytes);
    patch j spans [starts[j], starts[j + 1]).
    """
    h = np.asarray(entropy, dtype=np.float64)
    if h.ndim != 1:
        raise BytelmError("entropy must be a 1-D array, one value per byte")
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
        raise BytelmError(f"max_len must be a positive integer, got {max_len!r}")
    n = len(h)
    if n == 0:
        return np.zeros(0, np.int64)
    if threshold is None and relative is None:
        threshold = float(h.mean())
    cut = np.zeros(n, bool)
    cut[0] = True
    if threshold is not None:
        cut |= h > threshold
    if relative is not None:
        cut[1:] |= np.diff(h) > relative
    starts = np.flatnonzero(cut)
    if max_len is None:
        return starts.astype(np.int64)
    # Patches longer than max_len are cut every max_len bytes from their start.
    ends = np.append(starts[1:], n)
    long = np.flatnonzero(ends - starts > max_len)
    extra = [np.arange(starts[j] + max_len, ends[j], max_len) for j in long]
    return np.sort(np.concatenate([starts, *extra])).astype(np.int64)

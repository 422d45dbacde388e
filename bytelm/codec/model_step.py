"""STAND-IN (torch, not yet deterministic across machines): the model's step for compression.

    step = DeterministicStep(model, rows=64, context=model.config.block_size, stride=96)
    counts = step.next(np.full(64, DOC_SEPARATOR, np.uint8))   # (64, 256) uint32: what each row's first byte is
    counts = step.next(first_bytes)                             # (64, 256): and so on
    step.reset()                                                # every row starts over (next takes the separator)

R rows are coded side by side, in lockstep: call t feeds every row its t-th input (the separator first, then
the byte just coded) and returns, per row, integer frequencies of the next byte: every entry >= 1, every row
summing to exactly 2**COUNT_BITS. Each row's window slides as `bytelm score` slides it: the row's inputs
[s, s + context) with s = 0, stride, 2 * stride, ...; once a window is full, the next call starts the next
window by re-encoding its first context - stride inputs (the kept part), so a slide costs that many extra
steps. Predictions t in [w * stride + context - stride, w * stride + context) (the first window: all of them)
are made by window w, as in bytelm.codec.score.window_plan except that score's last window may start earlier
(score knows where the input ends; a stream does not).

This stand-in runs torch's BatchStep; the C step (bytelm/codec/csrc) replaces it with the same signature.
"""
from __future__ import annotations

import numpy as np
import torch

from bytelm.errors import BytelmError
from bytelm.infer.batch_step import BatchStep
from bytelm.model import ByteLM

STEP_VERSION = "bytelm-detstep/0-standin"
COUNT_BITS = 16  # every row of counts sums to 2**COUNT_BITS
_TOTAL = 1 << COUNT_BITS


def quantize(logits: np.ndarray) -> np.ndarray:
    """(R, 256) logits -> (R, 256) uint32 counts >= 1 summing to 2**COUNT_BITS (leftover to the first max)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    counts = (1 + np.floor(p * (_TOTAL - 256))).astype(np.int64)
    top = counts.argmax(-1)
    counts[np.arange(len(counts)), top] += _TOTAL - counts.sum(-1)
    return counts.astype(np.uint32)


class DeterministicStep:
    """R rows stepped together; see the module docstring. threads: worker threads (results never depend on it)."""

    def __init__(self, model: ByteLM, rows: int, context: int | None = None, stride: int | None = None,
                 threads: int | None = None):
        block = model.config.block_size
        context = block if context is None else context
        stride = max(1, context // 2) if stride is None else stride
        if not isinstance(rows, int) or rows < 1:
            raise BytelmError(f"rows must be a positive integer, got {rows!r}")
        if not isinstance(context, int) or not 1 <= context <= block:
            raise BytelmError(f"context must be in 1..{block} (the model's), got {context!r}")
        if not isinstance(stride, int) or not 1 <= stride <= context:
            raise BytelmError(f"stride must be in 1..{context}, got {stride!r}")
        self.rows, self.context, self.stride = rows, context, stride
        self._step = BatchStep(model, rows)
        self._history = np.zeros((rows, context), np.uint8)  # the current window's inputs
        self.reset()

    def reset(self) -> None:
        """Every row starts over: the next call feeds each row's first input at position 0."""
        self._step.reset()
        self._fill = 0  # inputs in the current window
        self.position = 0  # inputs fed so far (= calls of next since reset)

    def next(self, prev_bytes: np.ndarray) -> np.ndarray:
        """prev_bytes: (R,) uint8, each row's next input. Returns counts (R, 256) uint32 for the byte after it."""
        prev = np.asarray(prev_bytes)
        if prev.shape != (self.rows,) or prev.dtype != np.uint8:
            raise BytelmError(f"next() takes a ({self.rows},) uint8 array, got {prev.dtype} {prev.shape}")
        if self._fill == self.context:  # the window is full: slide, re-encoding the kept inputs
            kept = self.context - self.stride
            self._history[:, :kept] = self._history[:, self.stride:].copy()
            self._step.reset()
            for t in range(kept):
                self._step(torch.from_numpy(self._history[:, t].astype(np.int64)))
            self._fill = kept
        self._history[:, self._fill] = prev
        self._fill += 1
        self.position += 1
        logits = self._step(torch.from_numpy(prev.astype(np.int64)))
        return quantize(logits.numpy())

"""The model's step for compression: integer counts of every next byte, bit-identical on any machine.

    from bytelm.codec.model_step import DeterministicStep, STEP_VERSION, COUNT_BITS
    step = DeterministicStep(model, rows=64, context=model.config.block_size, stride=96)
    counts = step.next(np.full(64, DOC_SEPARATOR, np.uint8))   # (64, 256) uint32: each row's first byte
    counts = step.next(first_bytes)                             # (64, 256): the byte after those, and so on
    step.reset()                                                # every row starts over (next takes the separator)

The interface the coder (bytelm/codec/compress.py) relies on:
  * R rows step in lockstep: call t feeds every row its t-th input (the separator first, then the byte the row
    just coded) and returns, per row, frequencies of the next byte: every entry >= 1, every row summing to
    exactly 2**COUNT_BITS. A row whose input has ended is fed any byte and its counts ignored. A row's counts
    depend only on its own inputs, never on R, its index, the other rows or `threads`.
  * Each row's window slides as `bytelm score --stride S` slides it: window w reads the row's inputs
    [w S, w S + context) at positions 0.. of the model, and makes predictions w S + context - S .. w S +
    context - 1 (the first window: all of its predictions). When a window is full, the next call first
    re-encodes the kept context - S inputs, which costs (context - S) / S extra steps per coded byte: a larger
    stride is faster, a smaller one predicts from more context. This is bytelm.windows.sliding_windows, except
    that score's last window may start earlier (score knows where its input ends; a stream does not).
  * STEP_VERSION names the arithmetic: the container records it, and any build of a version on any machine
    gives the same counts. Change it whenever the C step or the quantisation changes a single bit.

The arithmetic is bytelm/codec/csrc/model_step.c (its top comment says how it stays deterministic: no FMA
contraction, no reassociation, sums in a fixed order independent of the SIMD width, its own exp, rows split
over threads that never meet), built with the system C compiler through bytelm/infer/native.py. A machine
without one gets a BytelmError in one line. tests/test_model_step.py builds it three ways and compares counts.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from bytelm.device import require_memory
from bytelm.errors import BytelmError
from bytelm.infer import native
from bytelm.model import ByteLM

STEP_VERSION = "bytelm-detstep/1"
COUNT_BITS = 16  # every row of counts sums to 2**COUNT_BITS
SOURCE = Path(__file__).with_name("csrc") / "model_step.c"
# -ffp-contract=off: no fused multiply-add (its single rounding would differ from builds without FMA).
# Never -ffast-math or -Ofast. -march=native only makes it faster: the counts are the same without it.
COMMON_FLAGS = ["-shared", "-fPIC", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-pthread"]
FLAGS = ["-O3", "-march=native", *COMMON_FLAGS]
_PREFILL_VECTORS = 2048  # (row, token) vectors per C call while re-encoding: bounds the step's scratch memory
_LAYER_BUFFERS = ("norm1", "w_qkv", "w_proj", "norm2", "w_fc", "w_out")
_BUFFERS = ("embed", "value_embed", *_LAYER_BUFFERS, "norm_f", "head", "rope_cos", "rope_sin")


class DetModel(ctypes.Structure):
    """The DetModel struct of model_step.c, field for field: dimensions, then each buffer and its length."""
    _fields_ = ([(n, ctypes.c_int32) for n in ("n_layer", "C", "H", "F", "V", "context", "value_embeds")]
                + [("eps", ctypes.c_float), ("qk_eps", ctypes.c_float)]
                + [(n, ctypes.c_void_p) for n in _BUFFERS] + [(n + "_size", ctypes.c_int64) for n in _BUFFERS])


class DetCall(ctypes.Structure):
    """The DetCall struct of model_step.c: what one call feeds, where the caches are, where counts go."""
    _fields_ = ([(n, ctypes.c_int32) for n in ("rows", "tokens", "pos", "threads")]
                + [(n, ctypes.c_void_p) for n in ("token", "keys", "values", "counts")]
                + [(n + "_size", ctypes.c_int64) for n in ("token", "keys", "values", "counts")]
                + [("error", ctypes.c_char * 200)])


def load_library(flags: list[str] | None = None) -> ctypes.CDLL:
    """model_step.c built with `flags` (default FLAGS), cached like the decode step's library; BytelmError
    (one line) where no compiler or no build can be had."""
    lib = native.build_library("model_step", SOURCE, list(FLAGS if flags is None else flags),
                               "the compression step")
    for name, size in (("detstep_model_size", DetModel), ("detstep_call_size", DetCall)):
        getattr(lib, name).restype = ctypes.c_size_t
        if getattr(lib, name)() != ctypes.sizeof(size):
            raise BytelmError(f"{size.__name__} differs between bytelm/codec/model_step.py and model_step.c")
    lib.detstep_forward.restype = ctypes.c_int
    lib.detstep_forward.argtypes = [ctypes.POINTER(DetModel), ctypes.POINTER(DetCall)]
    lib.detstep_rope.restype = ctypes.c_int
    lib.detstep_rope.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                                 ctypes.c_double]
    return lib


def _weights(model: ByteLM) -> dict[str, np.ndarray | None]:
    """Exact float32 copies of the weights in model_step.c's layouts (matrices transposed to (in, out))."""
    cfg = model.config
    t = lambda w: np.ascontiguousarray(w.detach().float().cpu().numpy())  # noqa: E731
    blocks = model.blocks
    stack = lambda f: np.ascontiguousarray(np.stack([t(f(b)) for b in blocks]))  # noqa: E731
    ve = model.value_embed
    return {"embed": t(model.embed.weight),
            "value_embed": None if ve is None else t(ve.weight).reshape(cfg.vocab_size, cfg.n_layer, cfg.n_embd),
            "norm1": stack(lambda b: b.norm1.weight), "w_qkv": stack(lambda b: b.attn.qkv.weight.t()),
            "w_proj": stack(lambda b: b.attn.proj.weight.t()), "norm2": stack(lambda b: b.norm2.weight),
            "w_fc": stack(lambda b: b.mlp.fc.weight.t()), "w_out": stack(lambda b: b.mlp.proj.weight.t()),
            "norm_f": t(model.norm_f.weight), "head": t(model.head.weight.t())}


class DeterministicStep:
    """R rows stepped together (see the module docstring). threads: worker threads (default torch's count);
    the counts never depend on it. flags: the compiler flags (default FLAGS; tests build other ways)."""

    def __init__(self, model: ByteLM, rows: int, context: int | None = None, stride: int | None = None,
                 threads: int | None = None, flags: list[str] | None = None):
        cfg = model.config
        context = cfg.block_size if context is None else context
        stride = max(1, context // 2) if stride is None else stride
        threads = torch.get_num_threads() if threads is None else threads
        for name, value, top in (("rows", rows, 1 << 20), ("context", context, cfg.block_size),
                                 ("stride", stride, context), ("threads", threads, 256)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
                raise BytelmError(f"{name} must be an integer in 1..{top}, got {value!r}")
        L, C = cfg.n_layer, cfg.n_embd
        cache = 2 * rows * L * C * context * 4
        require_memory([(f"the compression step's keys and values ({rows} rows x {L} layers x {context} "
                         f"positions x {C})", cache)], "cpu")
        self._lib = load_library(flags)
        self.rows, self.context, self.stride, self.threads = rows, context, stride, threads
        self._arrays = _weights(model)  # kept alive: the C step reads them by address
        half = cfg.head_dim // 2
        cos, sin = np.empty((context, half), np.float32), np.empty((context, half), np.float32)
        if self._lib.detstep_rope(cos.ctypes.data, sin.ctypes.data, cos.size, context, half, float(cfg.rope_base)):
            raise BytelmError(f"rope_base {cfg.rope_base!r} or context {context} is out of the C step's range")
        self._arrays.update(rope_cos=cos, rope_sin=sin)
        m = self._model = DetModel(n_layer=L, C=C, H=cfg.n_head, F=cfg.mlp_ratio * C, V=cfg.vocab_size,
                                   context=context, value_embeds=int(cfg.value_embeds), eps=cfg.norm_eps,
                                   qk_eps=float(np.finfo(np.float32).eps))
        for name in _BUFFERS:
            a = self._arrays[name]
            if a is not None:
                assert a.dtype == np.float32 and a.flags.c_contiguous
                setattr(m, name, a.ctypes.data)
                setattr(m, name + "_size", a.size)
        self._keys = np.zeros(rows * L * C * context, np.float32)
        self._values = np.zeros(rows * L * C * context, np.float32)
        self._history = np.zeros((rows, context), np.uint8)  # the current window's inputs
        self._counts = np.zeros((rows, cfg.vocab_size), np.uint32)
        self.reset()

    def reset(self) -> None:
        """Every row starts over: the next call feeds each row's first input at position 0."""
        self._fill = 0  # inputs in the current window
        self.position = 0  # inputs fed since reset (= calls of next)

    def _forward(self, tokens: np.ndarray, pos: int, counts: np.ndarray | None) -> None:
        """Feed tokens (R, J) uint8 at positions pos .. pos + J - 1; fill counts (R, V) if given."""
        tokens = np.ascontiguousarray(tokens, dtype=np.uint8)
        call = DetCall(rows=self.rows, tokens=tokens.shape[1], pos=pos, threads=self.threads,
                       token=tokens.ctypes.data, keys=self._keys.ctypes.data, values=self._values.ctypes.data,
                       counts=None if counts is None else counts.ctypes.data, token_size=tokens.size,
                       keys_size=self._keys.size, values_size=self._values.size,
                       counts_size=0 if counts is None else counts.size)
        if self._lib.detstep_forward(ctypes.byref(self._model), ctypes.byref(call)):
            raise BytelmError(f"the compression step refused a call: {call.error.decode(errors='replace')}")

    def next(self, prev_bytes: np.ndarray) -> np.ndarray:
        """prev_bytes: (R,) uint8, each row's next input. Returns counts (R, 256) uint32 (a new array) for the
        byte after it."""
        prev = np.asarray(prev_bytes)
        if prev.shape != (self.rows,) or prev.dtype != np.uint8:
            raise BytelmError(f"next() takes a ({self.rows},) uint8 array, got {prev.dtype} {prev.shape}")
        if self._fill == self.context:  # the window is full: slide it, re-encoding the kept inputs
            kept = self.context - self.stride
            self._history[:, :kept] = self._history[:, self.stride:].copy()
            chunk = max(1, _PREFILL_VECTORS // self.rows)
            for start in range(0, kept, chunk):
                self._forward(self._history[:, start:min(kept, start + chunk)], start, None)
            self._fill = kept
        self._history[:, self._fill] = prev
        self._forward(prev.reshape(self.rows, 1), self._fill, self._counts)
        self._fill += 1
        self.position += 1
        return self._counts.copy()

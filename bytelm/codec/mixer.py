"""The context-mixing coder (bytelm/codec/csrc/mix.c), compiled on first use, cached and loaded with ctypes.

    cm = ContextMixer()                                  # fresh tables; they keep learning block after block
    ContextMixer(flags=["-O0", *COMMON_FLAGS])            # another build: the same bits (tests compare three)
    coded = cm.encode(block, rows, model=None)           # bytes, or None when coding would not beat storing
    saved = cm.snapshot(); cm.restore(saved)             # the tables, copied out and back (40 MiB)
    block = cm.decode(coded, length, rows, model=None)   # the same calls in the same order give the same bytes

`model` is None (pure context mixing) or a callable step(prev (R,) uint8) -> counts (R, 256) uint32: the byte
model's integer frequencies of every row's next byte (DeterministicStep.next, bytelm/codec/model_step.py).
A block is coded as R contiguous runs side by side; the model is stepped once per byte position for all rows.

The C code is integer arithmetic only: any build (any flags, compiler or CPU) gives the same bits, so it is
built without -march=native. Building needs a C compiler; without one, compress and decompress refuse in one line.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Callable

import numpy as np

from bytelm.errors import BytelmError

SOURCE = Path(__file__).with_name("csrc") / "mix.c"
COMMON_FLAGS = ["-shared", "-fPIC", "-std=c11"]
FLAGS = ["-O2", *COMMON_FLAGS]  # integer arithmetic only: any flags give the same bits (-march buys nothing here)
MODES = {"encode": 0, "decode": 1}
Model = Callable[[np.ndarray], np.ndarray]

def library(flags: list[str] | None = None) -> ctypes.CDLL:
    """The library built with `flags` (default FLAGS; the tests build others and compare), once per process
    and flags (bytelm.infer.native.build_library); BytelmError where it can't be had."""
    from bytelm.infer import native
    lib = native.build_library("mix", SOURCE, list(FLAGS if flags is None else flags), "the context-mixing coder")
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    for name, res, args in [("cm_version", ctypes.c_int, []), ("cm_max_rows", ctypes.c_int, []),
                            ("cm_tables_size", ctypes.c_size_t, []), ("cm_new", p, [ctypes.c_int]),
                            ("cm_free", None, [p]), ("cm_copy_tables", None, [p, p, ctypes.c_int]),
                            ("cm_begin", ctypes.c_int, [p, p, i32, i32, p, i64, ctypes.c_int]),
                            ("cm_step", ctypes.c_int, [p, i32, p, ctypes.c_int]),
                            ("cm_run", ctypes.c_int, [p, ctypes.c_int]), ("cm_finish", i64, [p]),
                            ("cm_consumed", i64, [p]), ("cm_error", ctypes.c_char_p, [p])]:
        getattr(lib, name).restype = res
        getattr(lib, name).argtypes = args
    return lib


def coder_version() -> str:
    """What the container records about the coder: its arithmetic's version."""
    return f"cm/{library().cm_version()}"


def max_rows() -> int:
    return library().cm_max_rows()


class ContextMixer:
    """One coder's tables (about 25 MB), learning across the blocks of a file; see the module docstring."""

    def __init__(self, limit: int = 1023, flags: list[str] | None = None):
        self.lib = library(flags)
        self.ptr = self.lib.cm_new(limit)
        if not self.ptr:
            raise MemoryError("the context-mixing coder's tables")

    def __del__(self):
        if getattr(self, "ptr", None):
            self.lib.cm_free(self.ptr)
            self.ptr = None

    def _run(self, block: np.ndarray, rows: int, io: np.ndarray, cap: int, mode: str,
             model: Model | None) -> bool:
        """Code every byte of `block`; False if the encoder's output passed `cap`."""
        if self.lib.cm_begin(self.ptr, block.ctypes.data, len(block), rows, io.ctypes.data, cap,
                             int(mode == "decode")):
            raise BytelmError(self.lib.cm_error(self.ptr).decode())
        m = MODES[mode]
        if model is None:
            return self.lib.cm_run(self.ptr, m) == 0
        run = -(-len(block) // rows) if len(block) else 0
        starts = np.arange(rows) * run  # (R,): where each row's run begins in the block
        prev = np.zeros(rows, np.uint8)  # each row's previous byte; the separator 0 before its first
        for t in range(run):
            counts = np.ascontiguousarray(model(prev), dtype=np.uint32)  # (R, 256)
            if counts.shape != (rows, 256):
                raise ValueError(f"the model step gave counts of shape {counts.shape}, not ({rows}, 256)")
            if self.lib.cm_step(self.ptr, t, counts.ctypes.data, m):
                return False
            at = starts + t
            prev = np.where(at < len(block), block[np.minimum(at, len(block) - 1)], 0).astype(np.uint8)
        return True

    def snapshot(self) -> np.ndarray:
        """A copy of the tables (cm_tables_size() bytes), for restore()."""
        saved = np.empty(self.lib.cm_tables_size(), np.uint8)
        self.lib.cm_copy_tables(self.ptr, saved.ctypes.data, 0)
        return saved

    def restore(self, saved: np.ndarray) -> None:
        self.lib.cm_copy_tables(self.ptr, saved.ctypes.data, 1)

    def encode(self, block: bytes, rows: int, model: Model | None = None, cap: int | None = None,
               saved: np.ndarray | None = None) -> bytes | None:
        """The coded block, or None if it would not be shorter than the block itself (or than `cap` bytes):
        then the tables are put back as they were, as the decoder will find them after a stored block.
        `saved`: a snapshot() the caller took of the tables as they are now, so they are not copied again."""
        data = np.frombuffer(block, np.uint8).copy()
        saved = self.snapshot() if saved is None else saved
        cap = max(0, len(data) - 1) if cap is None else min(cap, max(0, len(data) - 1))
        out = np.empty(cap + 4, np.uint8)
        if self._run(data, rows, out, cap, "encode", model):
            n = self.lib.cm_finish(self.ptr)
            if 0 <= n <= cap:
                return out[:n].tobytes()
        self.restore(saved)
        return None

    def decode(self, coded: bytes, length: int, rows: int, model: Model | None = None) -> bytes:
        """The block of `length` bytes that `coded` holds (wrong bytes if it is damaged: check them)."""
        block = np.zeros(length, np.uint8)
        io = np.frombuffer(coded, np.uint8).copy() if coded else np.zeros(1, np.uint8)
        self._run(block, rows, io, len(coded), "decode", model)
        return block.tobytes()

"""Lossless compression: the byte model's distribution mixed with adaptive context models, arithmetic-coded.

    from bytelm import load_model
    from bytelm.codec.compress import compress_bytes, decompress_bytes
    model, _ = load_model("byte_llm_model.pt")
    blob = compress_bytes(model, data)              # bytes-like in; the container of bytelm/codec/container.py
    assert decompress_bytes(model, blob) == data    # ContainerError (one line) for another model, damage, ...
    blob = compress_bytes(None, data)               # no model: context mixing alone

compress_stream / decompress_stream do the same from a read(n) callable to a write(bytes) callable, a block at
a time, so memory does not depend on the input's size. `bytelm compress` / `bytelm decompress`
(bytelm/cli/compress.py) are the command lines; docs/compression.md says what is guaranteed.

How: the input is cut into blocks (BLOCK_SIZE bytes). A block is coded as R contiguous runs side by side
(rows_for: runs of at least MIN_RUN bytes, at most MAX_MODEL_ROWS of them), each row's window sliding over its
run as `bytelm score` slides it (the model step, bytelm/codec/model_step.py: integer counts of every next
byte, the same on any machine). The counts of all rows at one byte position go to the context-mixing coder
(bytelm/codec/mixer.py, integer C), which mixes them with its context models and codes the bytes. A block that
does not come out shorter than itself is stored, and the coder's tables are put back as they were before it,
so the decoder skips it. Each block is also coded by the context models alone (one row, no model); where that
is shorter (the model helps nothing out of its domain), it is kept, and the decoder skips the model too. The tables learn across blocks; the model's rows start afresh in each block.
"""
from __future__ import annotations

import hashlib
import io
import json
import zlib
from typing import Callable, Iterable

import torch

from bytelm.codec import container
from bytelm.codec.container import ContainerError, Header
from bytelm.codec.mixer import ContextMixer, coder_version
from bytelm.codec.score import progress_callback
from bytelm.errors import BytelmError
from bytelm.model import ByteLM

BLOCK_SIZE = 1 << 20  # bytes per block: what memory holds of the input, and the stored fallback's unit
MIN_RUN = 4096  # bytes per row at least: each row's first bytes are predicted from little context
MAX_MODEL_ROWS = 64  # rows the model steps together: its weights are read once per step for all of them
MAX_RATIO = 2842  # the coder's best: p <= 4095/4096 per bit costs >= 0.00282 bits per byte, 1/2842 of 8 bits
DEFAULT_MAX_OUTPUT = 4 << 30  # bytes decompress writes at most unless told otherwise (a decompression bomb)

Read = Callable[[int], bytes]
Write = Callable[[bytes], object]


def _check_data(data) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"data must be bytes-like (bytes, bytearray or memoryview), not {type(data).__name__}")


def model_fingerprint(model: ByteLM) -> str:
    """SHA-256 of the model's config and every weight's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def rows_for(length: int, max_rows: int) -> int:
    """Rows a block of `length` bytes is coded in: runs of MIN_RUN bytes or more, at most max_rows."""
    return max(1, min(max_rows, length // MIN_RUN))


class _Coder:
    """The coder of one file, both directions: the mixer's tables, and the model's step for the block's rows."""

    def __init__(self, model: ByteLM | None, header: Header):
        self.model, self.header = model, header
        self.mixer = ContextMixer()
        self._step = None  # the model step of the last row count: a file's blocks but its last share one

    def step(self, rows: int):
        """A callable prev (R,) uint8 -> counts (R, 256) for a block's rows, started afresh; None: no model."""
        if self.model is None:
            return None
        if self._step is None or self._step.rows != rows:
            from bytelm.codec.model_step import DeterministicStep
            self._step = None  # frees the old step's weights and cache before the new one asks the memory gate
            self._step = DeterministicStep(self.model, rows, self.header.context, self.header.stride)
        self._step.reset()
        return self._step.next

    def encode(self, raw: bytes) -> bytes:
        """One block, packed: coded with the model, or by the context models alone where that is shorter (the
        model helps nothing out of its domain), or stored when neither pays."""
        mixer, rows = self.mixer, rows_for(len(raw), self.header.rows)
        if self.model is None:
            coded = mixer.encode(raw, rows)
            return container.pack_block(container.STORED if coded is None else container.CODED, raw,
                                        raw if coded is None else coded)
        before = mixer.snapshot()
        with_model = mixer.encode(raw, rows, self.step(rows), saved=before)
        after = mixer.snapshot() if with_model is not None else None
        mixer.restore(before)
        alone = mixer.encode(raw, 1, cap=None if with_model is None else len(with_model), saved=before)
        if alone is not None:  # shorter than with the model: the tables stay as this coding left them
            return container.pack_block(container.MIXED_ALONE, raw, alone)
        if with_model is not None:
            mixer.restore(after)
            return container.pack_block(container.CODED, raw, with_model)
        return container.pack_block(container.STORED, raw, raw)  # the tables are as before the block

    def decode(self, block: container.Block) -> bytes:
        if block.kind == container.STORED:
            return block.payload
        if block.kind == container.MIXED_ALONE:
            return self.mixer.decode(block.payload, block.raw_len, 1)
        rows = rows_for(block.raw_len, self.header.rows)
        return self.mixer.decode(block.payload, block.raw_len, rows, self.step(rows))


def new_header(model: ByteLM | None, block_size: int = BLOCK_SIZE, stride: int | None = None) -> Header:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not 1 <= block_size <= container.MAX_BLOCK:
        raise BytelmError(f"block_size must be an integer in 1..{container.MAX_BLOCK}, got {block_size!r}")
    if model is None:
        return Header(model=None, step=None, coder=coder_version(), block_size=block_size, rows=1, context=0,
                      stride=0)
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise BytelmError(f"compression runs the model on the CPU; this one is on {p.device}")
    from bytelm.codec.model_step import STEP_VERSION
    context = model.config.block_size
    stride = max(1, 3 * context // 4) if stride is None else stride
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= context:
        raise BytelmError(f"stride must be an integer in 1..{context} (the model's context), got {stride!r}")
    return Header(model=model_fingerprint(model), step=STEP_VERSION, coder=coder_version(), block_size=block_size,
                  rows=MAX_MODEL_ROWS, context=context, stride=stride)


def compress_stream(model: ByteLM | None, chunks: Iterable[bytes], write: Write, *, block_size: int = BLOCK_SIZE,
                    stride: int | None = None, progress=None, total: int | None = None) -> tuple[int, int]:
    """Compress the concatenation of `chunks` into write(); returns (bytes in, bytes out). Memory holds one
    block. stride: bytes each model window moves on (default 3/4 of the context)."""
    header = new_header(model, block_size, stride)
    coder = _Coder(model, header)
    digest, n_in, n_out = hashlib.sha256(), 0, 0
    update, close = progress_callback(progress, total, "compressing")

    def emit(part: bytes) -> None:
        nonlocal n_out
        write(part)
        n_out += len(part)

    try:
        emit(container.pack_header(header))
        pending = bytearray()
        for chunk in chunks:
            pending += _check_data(chunk)
            while len(pending) >= block_size:
                raw = bytes(pending[:block_size])
                del pending[:block_size]
                digest.update(raw)
                n_in += len(raw)
                emit(coder.encode(raw))
                update(len(raw))
        if pending:
            digest.update(pending)
            n_in += len(pending)
            emit(coder.encode(bytes(pending)))
            update(len(pending))
        emit(container.pack_end(n_in, digest.digest()))
    finally:
        close()
    return n_in, n_out


def _check_decodable(model: ByteLM | None, header: Header) -> None:
    if header.coder != coder_version():
        raise ContainerError(f"written by coder {header.coder}; this bytelm has {coder_version()}: decompress it "
                             "with the bytelm that wrote it")
    if header.model is None:
        return
    if model is None:
        raise ContainerError("compressed with a model: decompress with the checkpoint that compressed it")
    from bytelm.codec.model_step import STEP_VERSION
    if header.step != STEP_VERSION:
        raise ContainerError(f"written with model step {header.step}; this bytelm has {STEP_VERSION}: decompress "
                             "it with the bytelm that wrote it")
    if header.model != model_fingerprint(model):
        raise ContainerError("compressed with another model (its fingerprint differs from this model's): "
                             "decompress with the same checkpoint that compressed it")
    if not 1 <= header.stride <= header.context == model.config.block_size:
        raise ContainerError("damaged: the model's window in the header does not fit this model")


def decompress_stream(model: ByteLM | None, read: Read, write: Write, *, max_output: int | None = DEFAULT_MAX_OUTPUT,
                      progress=None) -> int:
    """Decode from read(n) into write(), a block at a time, each checked (CRC-32 of its payload before it is
    decoded, of its bytes before they are written); returns the original's length. Raises ContainerError for
    anything wrong, the original's length and SHA-256 (checked last) included, and for output past max_output
    bytes (None: no limit)."""
    if max_output is not None and (not isinstance(max_output, int) or max_output < 0):
        raise BytelmError(f"max_output must be a number of bytes >= 0 or None, got {max_output!r}")
    header = container.read_header(read)
    _check_decodable(model, header)
    coder = _Coder(model, header)
    digest, produced = hashlib.sha256(), 0
    update, close = progress_callback(progress, None, "decompressing")
    try:
        while True:
            block = container.read_block(read, header, MAX_RATIO)
            if block.kind == container.END:
                break
            if max_output is not None and produced + block.raw_len > max_output:
                raise ContainerError(f"the output passes the limit of {max_output:,} bytes (--max-output); "
                                     "refusing to go on")
            raw = coder.decode(block)
            if zlib.crc32(raw) != block.raw_crc:
                raise ContainerError("damaged: a block decodes to bytes that fail their CRC-32 check")
            digest.update(raw)
            produced += len(raw)
            write(raw)
            update(len(raw))
    finally:
        close()
    length, sha = container.end_fields(block)
    if read(1):
        raise ContainerError("damaged: data after the end of the compressed file")
    if length != produced or sha != digest.digest():
        raise ContainerError("the decoded bytes fail the original's length or SHA-256 check (damaged file)")
    return produced


def compress_bytes(model: ByteLM | None, data, *, block_size: int = BLOCK_SIZE, stride: int | None = None,
                   progress=None) -> bytes:
    """The compressed bytes of `data` (bytes-like; TypeError naming `data` otherwise)."""
    data = _check_data(data)
    out = io.BytesIO()
    compress_stream(model, [data], out.write, block_size=block_size, stride=stride, progress=progress,
                    total=len(data))
    return out.getvalue()


def decompress_bytes(model: ByteLM | None, blob, *, max_output: int | None = DEFAULT_MAX_OUTPUT,
                     progress=None) -> bytes:
    """The original bytes of `blob` (bytes-like), checked; ContainerError for anything wrong."""
    blob = _check_data(blob)
    parts: list[bytes] = []
    decompress_stream(model, io.BytesIO(blob).read, parts.append, max_output=max_output, progress=progress)
    return b"".join(parts)


def read_header(blob: bytes) -> Header:
    """The checked header of a compressed file (ContainerError if it is not a sound one)."""
    return container.read_header(io.BytesIO(_check_data(blob)).read)

"""Lossless compression with a byte-level model: the model gives every next byte a probability, a range coder
(constriction's) turns those probabilities into bits, and the same model and arithmetic turn them back.

    from bytelm import load_model
    from bytelm.codec.compress import compress_bytes, decompress_bytes
    model, _ = load_model("byte_llm_model.pt")
    blob = compress_bytes(model, data)              # the container format of bytelm/codec/container.py
    assert decompress_bytes(model, blob) == data    # ContainerError (one line) for another model, damage, ...

`bytelm compress` / `bytelm decompress` (bytelm/cli/compress.py) are the command lines; docs/compression.md
says what is guaranteed.

How: the input is cut into segments of the model's context (so no window ever slides), and segments are
coded side by side, `batch` of them per group: each step feeds one byte of every segment in the group
through BatchStep (one batched forward), quantises the 256 probabilities of every row to integers, and codes
that step's byte of every row into the group's one range-coder stream, row after row. Decoding runs the very
same loop (`_code_group` serves both directions), with the range decoder supplying the bytes, so both sides
compute bit-identical probabilities: the same step, the same batch layout, the same quantisation.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable

import numpy as np
import torch

from bytelm.infer.batch_step import BatchStep
from bytelm.config import DOC_SEPARATOR
from bytelm.codec.container import ContainerError, Header, pack, unpack
from bytelm.errors import BytelmError
from bytelm.memory import format_bytes
from bytelm.model import ByteLM
from bytelm.codec.score import progress_callback

PRECISION = 24  # constriction's range coder works with 24-bit probabilities (its default preset)
_TOTAL = 1 << PRECISION
_FREE = _TOTAL - 256  # every byte gets one quantum for free; the model's probabilities share the rest
STEP_ID = "torch-batch-step/1"  # names the arithmetic of BatchStep + quantize; change it when either changes
_MUST_MATCH = ("step", "torch", "cpu", "device", "dtype")  # encoder fields a decoder must share
ENCODE_CACHE_BUDGET = 256 << 20  # bytes of keys and values the encoder may use: sets the batch
DECODE_CACHE_LIMIT = 2 << 30  # a file asking the decoder for more than this is refused


def _coder():
    try:
        import constriction
    except ImportError:
        raise BytelmError("bytelm compress needs the constriction package: pip install 'bytelm[compress]' "
                          "(or pip install constriction)") from None
    return constriction


def quantize(logits: torch.Tensor) -> np.ndarray:
    """Integer probabilities from logits (B, 256): counts >= 1 per byte, each row summing to 2^PRECISION.

    Returned as counts - 1 in float32 (exact: integers below 2^24), the form constriction's lazy categorical
    model reproduces exactly: it gives symbol s the quantum (counts - 1)[s] * scale + 1 with scale exactly 1,
    since the row sums to 2^24 - 256. One function, used by both directions: the coder never sees a float
    that the decoder could compute differently.
    """
    p = torch.softmax(logits.double(), dim=-1)  # (B, V)
    counts = torch.floor(p * _FREE).long()  # (B, V), each row sums to at most _FREE
    top = counts.argmax(-1, keepdim=True)  # the first most likely byte takes what flooring left over
    counts.scatter_add_(1, top, _FREE - counts.sum(-1, keepdim=True))
    return counts.numpy().astype(np.float32)


def model_fingerprint(model: ByteLM) -> str:
    """SHA-256 of the model's config and every weight's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encoder_description(model: ByteLM) -> dict:
    p = next(model.parameters())
    from bytelm import __version__
    return {"bytelm": __version__, "step": STEP_ID, "torch": torch.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(), "device": p.device.type, "dtype": str(p.dtype)}


def step_rows(segments: int) -> int:
    """Rows of the batched step for a group of `segments`: rounded up to a multiple of 8 with idle rows.

    Why: torch's CPU matrix product (MKL here) gives a row's result bit-identical for any thread count only
    when the number of rows is a multiple of 4 or at least of some size; with 5-7, 9-11, 17-19 or 25-27 rows the
    last bit changes between 1, 2 and 16 threads (a scan of 1..1,100 rows, four weight shapes). Multiples of 8
    agreed everywhere; tests/test_compress.py checks it on the machine that runs the tests.
    """
    return max(8, -(-segments // 8) * 8)


def _check_model(model: ByteLM) -> None:
    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":
        raise BytelmError(f"compression runs the model in float32 on the CPU (the arithmetic the guarantees are "
                          f"about); this one is {p.dtype} on {p.device}")


def _code_group(step: BatchStep, lengths: list[int], code: Callable[[np.ndarray, int], np.ndarray],
                progress: Callable[[int], None]) -> np.ndarray:
    """Run one group: rows (B, max length) uint8, filled step by step with what `code` returns.

    code(pmf (k, 256), t) receives the integer probabilities of the k rows still going at step t (rows are
    ordered longest first, so they are the first k) and returns their bytes: the encoder's own (after coding
    them), or the decoder's (decoded with them). Every row of the step (step_rows of them) steps every time,
    finished and idle ones on byte 0, so the batch layout is fixed by the header alone.
    """
    B, steps = step.batch, max(lengths)
    rows = np.zeros((B, steps), np.uint8)
    active = np.zeros(B, np.int64)
    active[:len(lengths)] = lengths  # idle rows (see step_rows) have length 0
    step.reset()
    x = torch.full((B,), DOC_SEPARATOR, dtype=torch.long)
    for t in range(steps):
        pmf = quantize(step(x))  # (B, V)
        k = int((active > t).sum())
        rows[:k, t] = code(pmf[:k], t)
        x = torch.from_numpy(rows[:, t].astype(np.int64))
        progress(k)
    return rows


def plan_batch(model: ByteLM, segments: int, batch_size: int | None = None) -> int:
    """Segments per group: what ENCODE_CACHE_BUDGET allows (or batch_size), spread evenly over the groups."""
    if batch_size is None:
        batch_size = max(1, ENCODE_CACHE_BUDGET // BatchStep.cache_bytes(model, 1))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BytelmError(f"batch_size must be a positive integer, got {batch_size!r}")
    if segments == 0:
        return 1
    groups = -(-segments // batch_size)
    return -(-segments // groups)


def compress_bytes(model: ByteLM, data: bytes, *, segment_len: int | None = None, batch_size: int | None = None,
             progress: bool | Callable[[int, int], None] | None = None) -> bytes:
    """The container's bytes for `data`. segment_len defaults to the model's context; batch_size (segments
    coded side by side) to what ENCODE_CACHE_BUDGET allows."""
    constriction = _coder()
    _check_model(model)
    data = bytes(data)
    context = model.config.block_size
    segment_len = context if segment_len is None else segment_len
    if not isinstance(segment_len, int) or not 1 <= segment_len <= context:
        raise BytelmError(f"segment_len must be in 1..{context} (the model's context), got {segment_len!r}")
    header = Header(model=model_fingerprint(model), length=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    segment_len=segment_len, batch=1, precision=PRECISION, encoder=encoder_description(model))
    header.batch = plan_batch(model, header.segments, batch_size)
    array = np.frombuffer(data, np.uint8)
    family = constriction.stream.model.Categorical(perfect=False)
    streams = []
    update, close = progress_callback(progress, len(data), "compressing")
    try:
        step = None
        for g in range(header.groups):
            first, count = header.group_segments(g)
            lo, hi = first * segment_len, min((first + count) * segment_len, len(data))
            segs = np.zeros((count, segment_len), np.uint8)
            segs.reshape(-1)[:hi - lo] = array[lo:hi]
            lengths = [min(segment_len, len(data) - (first + r) * segment_len) for r in range(count)]
            if step is None or step.batch != step_rows(count):
                step = BatchStep(model, step_rows(count))
            encoder = constriction.stream.queue.RangeEncoder()

            def encode(pmf: np.ndarray, t: int) -> np.ndarray:
                symbols = segs[:len(pmf), t]
                encoder.encode(symbols.astype(np.int32), family, pmf)
                return symbols
            _code_group(step, lengths, encode, update)
            streams.append(encoder.get_compressed())
    finally:
        close()
    header.streams = [len(s) for s in streams]
    return pack(header, streams)


def read_header(blob: bytes) -> Header:
    """The checked header of a compressed file (ContainerError if it is not a sound one)."""
    return unpack(blob)[0]


def _check_decodable(model: ByteLM, header: Header, any_encoder: bool) -> None:
    if header.model != model_fingerprint(model):
        raise ContainerError("compressed with another model (its fingerprint differs from this model's): "
                             "decompress with the same checkpoint that compressed it")
    mine = encoder_description(model)
    theirs = header.encoder
    differ = [k for k in _MUST_MATCH if theirs.get(k) != mine[k]]
    if differ and not any_encoder:
        what = ", ".join(f"{k} {theirs.get(k)!r} here {mine[k]!r}" for k in differ)
        raise ContainerError(f"encoded on another setup ({what}): its probabilities may differ in the last bit; "
                             "decode where it was encoded, or pass --any-encoder to try (the checksum still "
                             "refuses a wrong result)")
    if header.segment_len > model.config.block_size or header.precision != PRECISION:
        raise ContainerError("damaged: segment length or precision does not fit this model")
    need = BatchStep.cache_bytes(model, step_rows(header.batch))
    if need > DECODE_CACHE_LIMIT:
        raise ContainerError(f"its batch of {header.batch} segments needs {format_bytes(need)} for the model's "
                             f"cache, over the {format_bytes(DECODE_CACHE_LIMIT)} limit; refusing it")


def decompress_into(model: ByteLM, blob: bytes, write: Callable[[bytes], object], *, any_encoder: bool = False,
                    progress: bool | Callable[[int, int], None] | None = None) -> int:
    """Decode `blob`, handing the original to write() group by group; returns its length.

    Raises ContainerError if anything is wrong, including (last) a length or SHA-256 that does not match the
    original's: a caller must publish what write() received only after this returns.
    """
    constriction = _coder()
    _check_model(model)
    header, payload = unpack(blob)
    _check_decodable(model, header, any_encoder)
    family = constriction.stream.model.Categorical(perfect=False)
    words = np.frombuffer(payload, dtype="<u4")
    digest, produced, offset = hashlib.sha256(), 0, 0
    update, close = progress_callback(progress, header.length, "decompressing")
    try:
        step = None
        for g in range(header.groups):
            first, count = header.group_segments(g)
            lengths = [min(header.segment_len, header.length - (first + r) * header.segment_len)
                       for r in range(count)]
            stream = words[offset:offset + header.streams[g]].astype(np.uint32)
            offset += header.streams[g]
            if step is None or step.batch != step_rows(count):
                step = BatchStep(model, step_rows(count))
            decoder = constriction.stream.queue.RangeDecoder(stream)

            def decode(pmf: np.ndarray, t: int, g: int = g) -> np.ndarray:
                try:
                    return decoder.decode(family, pmf)
                except BaseException as e:  # noqa: BLE001 - constriction's answers to invalid data, a Rust
                    # panic (pyo3's PanicException derives from BaseException) included; nothing else runs here
                    if isinstance(e, Exception) or type(e).__name__ == "PanicException":
                        why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
                        raise ContainerError(f"damaged: group {g} does not decode ({why})") from None
                    raise
            rows = _code_group(step, lengths, decode, update)
            if not decoder.maybe_exhausted():
                raise ContainerError(f"damaged: group {g}'s stream holds more data than it decodes")
            chunk = b"".join(rows[r, :n].tobytes() for r, n in enumerate(lengths))
            digest.update(chunk)
            produced += len(chunk)
            write(chunk)
    finally:
        close()
    if produced != header.length or digest.hexdigest() != header.sha256:
        raise ContainerError("the decoded bytes fail the original's SHA-256 check (damaged file, or a setup whose "
                             "arithmetic differs); nothing was written")
    return produced


def decompress_bytes(model: ByteLM, blob: bytes, *, any_encoder: bool = False,
               progress: bool | Callable[[int, int], None] | None = None) -> bytes:
    """The original bytes of `blob` (checked against its SHA-256), or ContainerError."""
    parts: list[bytes] = []
    decompress_into(model, blob, parts.append, any_encoder=any_encoder, progress=progress)
    return b"".join(parts)

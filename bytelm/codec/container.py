"""The compressed file format of `bytelm compress`: a checked header, then blocks, each checked on its own.

    head = pack_header(header)                       # header: Header
    part = pack_block(kind, raw, payload)            # one block; pack_end(length, sha256) closes the file
    header = read_header(read)                       # read(n) -> bytes: ContainerError for a file not sound
    block = read_block(read, header, max_ratio)      # Block(kind, raw_len, raw_crc, payload), the end included

Layout (integers little-endian):

    offset  size  field
    0       8     magic b"\\x89BLZ\\r\\n\\x1a\\n" (the \\r\\n and \\x1a catch text-mode copies, as PNG's does)
    8       2     format version (FORMAT_VERSION); at this offset in every version
    10      4     H: length of the header JSON
    14      H     header JSON, UTF-8 (Header's fields)
    14+H    4     CRC-32 of bytes [0, 14+H)
    then blocks, each:
    0       1     kind: 0 stored, 1 coded, 2 the end, 3 coded without the model (context mixing alone)
    1       4     raw length: bytes of the original in this block (at most the header's block_size)
    5       4     payload length
    9       4     CRC-32 of the block's original bytes (checked after decoding, before they are written)
    13      4     CRC-32 of bytes 0..13 of the block and of its payload (checked before decoding)
    17      ...   payload: the bytes (stored), the coder's output (coded), or for the end the original's
                  length (8 bytes) and SHA-256 (32 bytes)

A file is read a block at a time, so memory does not grow with its size, and every size is checked before it
is used: a block's raw length against the header's block size, a coded block's against what its payload
could hold even at the coder's least cost per byte (max_ratio), the total against the caller's limit.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass
from typing import Callable

from bytelm.errors import BytelmError

MAGIC = b"\x89BLZ\r\n\x1a\n"
FORMAT_VERSION = 2
SUFFIX = ".blz"
STORED, CODED, END, MIXED_ALONE = 0, 1, 2, 3  # MIXED_ALONE: coded by the context models without the model
_PREFIX = struct.Struct("<8sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
_BLOCK = struct.Struct("<BIII")  # kind, raw length, payload length, raw CRC
_END = struct.Struct("<Q32s")  # original length, SHA-256
MAX_HEADER_BYTES = 1 << 16
MAX_BLOCK = 1 << 24  # the coder's limit (mix.c MAX_BLOCK)
MAX_ROWS = 256

Read = Callable[[int], bytes]


class ContainerError(BytelmError):
    """A compressed file that is not one, is damaged or truncated, or needs another model or bytelm."""


@dataclass
class Header:
    model: str | None  # SHA-256 of the model's config and weights (compress.model_fingerprint); None: no model
    step: str | None  # the model step's arithmetic (model_step.STEP_VERSION); None: no model
    coder: str  # the context-mixing coder's arithmetic (mixer.coder_version())
    block_size: int  # bytes of the original per block (the last may be shorter)
    rows: int  # most rows a block is coded in (compress.rows_for)
    context: int  # the model's window and its stride (0, 0 without a model)
    stride: int


@dataclass
class Block:
    kind: int
    raw_len: int
    raw_crc: int
    payload: bytes


def _fail(why: str) -> None:
    raise ContainerError(why)


def pack_header(header: Header) -> bytes:
    body = json.dumps(asdict(header), separators=(",", ":"), sort_keys=True).encode()
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    return head + _CRC.pack(zlib.crc32(head))


def pack_block(kind: int, raw: bytes, payload: bytes) -> bytes:
    head = _BLOCK.pack(kind, len(raw), len(payload), zlib.crc32(raw))
    return head + _CRC.pack(zlib.crc32(payload, zlib.crc32(head))) + payload


def pack_end(length: int, sha256: bytes) -> bytes:
    return pack_block(END, b"", _END.pack(length, sha256))


def _exactly(read: Read, n: int, where: str) -> bytes:
    data = read(n)
    if len(data) != n:
        _fail(f"truncated: the file ends inside {where}")
    return data


def read_header(read: Read) -> Header:
    """The checked header at the start of a file. Raises ContainerError naming the problem."""
    start = read(len(MAGIC))
    if start != MAGIC:
        if len(start) < len(MAGIC) and MAGIC.startswith(start):
            _fail("truncated: the file ends inside the bytelm header")
        _fail("not a bytelm compressed file (no bytelm magic bytes)")
    rest = _exactly(read, _PREFIX.size - len(MAGIC), "the bytelm header")
    _, version, size = _PREFIX.unpack(start + rest)
    if version < FORMAT_VERSION and version != 0:
        _fail(f"compressed format version {version}, written by an earlier bytelm: this bytelm reads version "
              f"{FORMAT_VERSION} only; decompress it with the bytelm that wrote it")
    if version != FORMAT_VERSION:
        _fail(f"compressed format version {version}: this bytelm reads version {FORMAT_VERSION}; upgrade bytelm "
              "(or the file is damaged)")
    if size > MAX_HEADER_BYTES:
        _fail(f"damaged: the header claims {size:,} bytes")
    body = _exactly(read, size, "the bytelm header")
    crc = _exactly(read, _CRC.size, "the bytelm header")
    if zlib.crc32(start + rest + body) != _CRC.unpack(crc)[0]:
        _fail("damaged: the header fails its CRC-32 check")
    return _parse(body)


def _parse(text: bytes) -> Header:
    """The header's JSON, every field checked for type and range (a CRC is no defence against a crafted file)."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        _fail("damaged: the header is not valid JSON")
    if not isinstance(raw, dict) or set(raw) != set(Header.__dataclass_fields__):
        _fail("damaged: the header's fields are not bytelm's")
    for name, lo, hi in (("block_size", 1, MAX_BLOCK), ("rows", 1, MAX_ROWS), ("context", 0, 1 << 20),
                         ("stride", 0, 1 << 20)):
        v = raw[name]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            _fail(f"damaged: header field {name} is {v!r}, outside {lo}..{hi}")
    for name in ("model", "step", "coder"):
        v = raw[name]
        if not (v is None and name != "coder" or isinstance(v, str) and 0 < len(v) <= 100):
            _fail(f"damaged: header field {name} is not a name")
    if (raw["model"] is None) != (raw["step"] is None) or raw["stride"] > raw["context"]:
        _fail("damaged: the header's model fields do not agree")
    return Header(**raw)


def read_block(read: Read, header: Header, max_ratio: int) -> Block:
    """The next block, checked: its sizes against the header and the coder's best ratio (before its payload
    is read), its CRC-32. A coded block of raw length n must have a payload p with n <= max_ratio * (p + 4):
    what the coder emits at least, at its least cost per byte."""
    head = _exactly(read, _BLOCK.size + _CRC.size, "a block's header")
    kind, raw_len, size, raw_crc = _BLOCK.unpack_from(head)
    if kind == END:
        if raw_len != 0 or size != _END.size:
            _fail("damaged: the end block's sizes are wrong")
    elif kind == STORED:
        if raw_len != size or not 0 < raw_len <= header.block_size:
            _fail(f"damaged: a stored block of {raw_len:,} bytes in a file of {header.block_size:,}-byte blocks")
    elif kind in (CODED, MIXED_ALONE):
        if not 0 < raw_len <= header.block_size:
            _fail(f"damaged: a block of {raw_len:,} bytes in a file of {header.block_size:,}-byte blocks")
        if not 4 <= size < raw_len or raw_len > max_ratio * (size + 4):
            _fail(f"damaged: a coded block claims {raw_len:,} bytes from {size:,} bytes of coded data, which "
                  "cannot hold them (or more than storing them would take)")
    else:
        _fail(f"damaged: unknown block kind {kind}")
    payload = _exactly(read, size, "a block")
    if zlib.crc32(payload, zlib.crc32(head[:_BLOCK.size])) != _CRC.unpack_from(head, _BLOCK.size)[0]:
        _fail("damaged: a block fails its CRC-32 check")
    return Block(kind, raw_len, raw_crc, payload)


def end_fields(block: Block) -> tuple[int, bytes]:
    """(original length, SHA-256 digest) of the end block."""
    return _END.unpack(block.payload)

"""The compressed file format of `bytelm compress`: a checked header, then one range-coder stream per group.

    blob = pack(header, streams)          # header: Header; streams: one uint32 array per group
    header, payload = unpack(blob)        # ContainerError (one clear line) for anything but a sound file

Layout (integers little-endian):

    offset  size  field
    0       8     magic b"\\x89BLZ\\r\\n\\x1a\\n" (the \\r\\n and \\x1a catch text-mode copies, as PNG's does)
    8       2     format version (FORMAT_VERSION); at this offset in every version
    10      4     H: length of the header JSON
    14      H     header JSON, UTF-8 (Header's fields: model fingerprint, original length and SHA-256,
                  segment length, batch, precision, the words of each group's stream, the encoder)
    14+H    4     CRC-32 of bytes [0, 14+H)
    18+H    4     CRC-32 of the payload
    22+H    ...   payload: the groups' streams one after another, 32-bit words

Everything is checked before any decoding starts: the magic, the version, the header's CRC and its fields
(types, ranges, and that they agree with each other and with the payload's actual size), the payload's CRC.
Nothing is allocated from a size the file only claims: the header is read only after the file is known to
hold it, and the payload's size is the file's.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass, field

from bytelm.errors import BytelmError

MAGIC = b"\x89BLZ\r\n\x1a\n"
FORMAT_VERSION = 1
SUFFIX = ".blz"
_PREFIX = struct.Struct("<8sHI")  # magic, version, header length
_CRCS = struct.Struct("<II")  # header CRC, payload CRC
MAX_HEADER_BYTES = 64 << 20  # a segment table for terabytes; anything larger is damage
MAX_BATCH = 4096  # segments coded side by side; the decoder allocates a KV cache for this many


class ContainerError(BytelmError):
    """A compressed file that is not one, is damaged or truncated, or needs another model or bytelm."""


@dataclass
class Header:
    model: str  # SHA-256 of the model's config and weights (compress.model_fingerprint)
    length: int  # bytes of the original
    sha256: str  # of the original, checked before any output is published
    segment_len: int  # bytes per segment (the last may be shorter); at most the model's context
    batch: int  # segments per group, coded side by side as one batch (the last group may have fewer)
    precision: int  # bits of the integer probabilities: every byte keeps at least 2^-precision
    streams: list[int] = field(default_factory=list)  # 32-bit words of each group's range-coder stream
    encoder: dict = field(default_factory=dict)  # which arithmetic produced the probabilities

    @property
    def segments(self) -> int:
        return -(-self.length // self.segment_len)

    @property
    def groups(self) -> int:
        return -(-self.segments // self.batch)

    def group_segments(self, g: int) -> tuple[int, int]:
        """(first segment, number of segments) of group g."""
        first = g * self.batch
        return first, min(self.batch, self.segments - first)


def pack(header: Header, streams: list) -> bytes:
    """The file's bytes; streams: one uint32 numpy array per group, header.streams their lengths."""
    body = json.dumps(asdict(header), separators=(",", ":"), sort_keys=True).encode()
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    payload = b"".join(s.astype("<u4").tobytes() for s in streams)
    return head + _CRCS.pack(zlib.crc32(head), zlib.crc32(payload)) + payload


def _fail(why: str) -> None:
    raise ContainerError(why)


def unpack(blob: bytes | memoryview) -> tuple[Header, memoryview]:
    """Check `blob` from end to end and return (header, payload). Raises ContainerError naming the problem."""
    blob = memoryview(blob)
    if len(blob) < len(MAGIC) or bytes(blob[:len(MAGIC)]) != MAGIC:
        if len(blob) < len(MAGIC) and MAGIC.startswith(bytes(blob)):
            _fail("truncated: the file ends inside the bytelm header")
        _fail("not a bytelm compressed file (no bytelm magic bytes)")
    if len(blob) < _PREFIX.size:
        _fail("truncated: the file ends inside the bytelm header")
    _, version, size = _PREFIX.unpack_from(blob)
    if version > FORMAT_VERSION or version == 0:
        _fail(f"compressed format version {version}: this bytelm reads version {FORMAT_VERSION}; upgrade bytelm "
              "(or the file is damaged)")
    if size > MAX_HEADER_BYTES:
        _fail(f"damaged: the header claims {size:,} bytes")
    end = _PREFIX.size + size
    if len(blob) < end + _CRCS.size:
        _fail("truncated: the file ends inside the bytelm header")
    header_crc, payload_crc = _CRCS.unpack_from(blob, end)
    if zlib.crc32(blob[:end]) != header_crc:
        _fail("damaged: the header fails its CRC-32 check")
    header = _parse(bytes(blob[_PREFIX.size:end]))
    payload = blob[end + _CRCS.size:]
    expected = 4 * sum(header.streams)
    if len(payload) != expected:
        _fail(f"{'truncated' if len(payload) < expected else 'damaged'}: the payload holds {len(payload):,} "
              f"bytes, the header says {expected:,}")
    if zlib.crc32(payload) != payload_crc:
        _fail("damaged: the compressed data fail their CRC-32 check")
    return header, payload


def _parse(text: bytes) -> Header:
    """The header's JSON, every field checked for type and range (a CRC is no defence against a crafted file)."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        _fail("damaged: the header is not valid JSON")
    if not isinstance(raw, dict) or set(raw) != {f for f in Header.__dataclass_fields__}:
        _fail("damaged: the header's fields are not bytelm's")

    def integer(name: str, lo: int, hi: int) -> int:
        v = raw[name]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            _fail(f"damaged: header field {name} is {v!r}, outside {lo}..{hi}")
        return v

    for name in ("model", "sha256"):
        v = raw[name]
        if not (isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
            _fail(f"damaged: header field {name} is not a SHA-256 digest")
    integer("length", 0, 1 << 62)
    integer("segment_len", 1, 1 << 17)
    integer("batch", 1, MAX_BATCH)
    integer("precision", 8, 24)
    streams, encoder = raw["streams"], raw["encoder"]
    if not isinstance(streams, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 40
                                                for s in streams):
        _fail("damaged: the segment table is not a list of stream lengths")
    if not isinstance(encoder, dict) or not all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in
                                                encoder.items()):
        _fail("damaged: the encoder description is not a table of names")
    header = Header(**raw)
    if header.batch > max(1, header.segments):
        _fail(f"damaged: a batch of {header.batch} for {header.segments} segments")
    if len(streams) != header.groups:
        _fail(f"damaged: {len(streams)} streams in the table, {header.groups} groups for {header.length:,} bytes")
    return header

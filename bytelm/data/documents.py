"""Documents: what every byte source yields and the split writer consumes.

    from bytelm.data.documents import FileDoc, doc_len, chunks, within
    doc = FileDoc("book.txt", 1_200_000)          # a whole file, read in pieces when it is written out
    doc_len(b"some text"), doc_len(doc)            # 9, 1200000
    b"".join(chunks(doc, 0, 100))                  # its first 100 bytes

A document is either `bytes` (a jsonl line's text, a parquet row, a streamed record, a builtin docstring
module) or a FileDoc (a file, or the first `size` bytes of one), so a large file never sits in memory at once.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from bytelm.errors import DataError

CHUNK = 16 << 20  # copy large files and arrays in pieces of this many bytes, so memory stays flat
ALTERNATIVES = "use --data builtin (ships with Python) or --data PATH (a file, folder or glob)"


@dataclass(frozen=True)
class FileDoc:
    """The first `size` bytes of the file at `path` as one document."""
    path: str
    size: int


def doc_len(doc) -> int:
    return doc.size if isinstance(doc, FileDoc) else len(doc)


def read_error(path, e: OSError) -> DataError:
    return DataError(f"cannot read {path}: {e.strerror or e}")


def chunks(doc, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    """The bytes doc[start:stop], in pieces of at most CHUNK."""
    stop = doc_len(doc) if stop is None else stop
    if not isinstance(doc, FileDoc):
        yield doc[start:stop]
        return
    try:
        with open(doc.path, "rb") as f:
            f.seek(start)
            left = stop - start
            while left > 0:
                piece = f.read(min(CHUNK, left))
                if not piece:
                    raise DataError(f"{doc.path} shrank while it was being read")
                left -= len(piece)
                yield piece
    except OSError as e:
        raise read_error(doc.path, e) from None


def within(docs: Iterable, max_bytes: int | None) -> Iterator:
    """Documents until max_bytes of them are taken; the one that crosses the limit is cut. Stops pulling
    from `docs` as soon as the limit is reached, so a network stream is not read further."""
    left = max_bytes
    for doc in docs:
        if left is not None:
            if doc_len(doc) > left:
                doc = FileDoc(doc.path, left) if isinstance(doc, FileDoc) else doc[:left]
            left -= doc_len(doc)
        yield doc
        if left is not None and left <= 0:
            return


def text_bytes(record, text_field: str, where: str) -> bytes:
    """record[text_field] as UTF-8 bytes; null is an empty document; anything else missing is an error."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object with a {text_field!r} field")
    if text_field not in record:
        fields = ", ".join(map(str, list(record)[:8])) or "none"
        raise DataError(f"{where}: no {text_field!r} field (fields: {fields}); name another with text_field")
    text = record[text_field]
    if text is None:
        return b""
    if isinstance(text, bytes):
        return text
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
    return text.encode("utf-8", "replace")


def check_rank(rank: int, world_size: int) -> None:
    """Raise DataError unless 0 <= rank < world_size (shared by the sharded sources and the batch sampler)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise DataError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")

"""Documents -> a train/validation split: two uint8 arrays, each split's documents joined by DOC_SEPARATOR.

    from bytelm.data.split import build
    corpus = build([b"doc one", b"doc two", b"doc three"], val_fraction=0.05, info={"source": "example"})
    corpus.train, corpus.val, corpus.summary()

Validation holds about val_fraction of the bytes, however few or uneven the documents:
  1. Whole documents, evenly spaced by count (every 20th with val_fraction 0.05), each taken only while
     validation then holds at most 1.5 x val_fraction of the bytes so far; a document too big for that goes
     to training, and the next one that fits is taken in its place.
  2. At the end, whatever validation still lacks of val_fraction of all bytes is taken from the end of the
     data (the last training documents, the first of them cut). A lone document is thus split as nanoGPT
     splits tinyshakespeare: val = the last ceil(n * val_fraction) bytes, train = the rest.
Decided while streaming: only the last training documents the end may still need are held back (as file
references or in memory, never more than about val_fraction of the bytes). docs/data.md has the details.
"""
from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from bytelm.config import DOC_SEPARATOR
from bytelm.data.documents import CHUNK, chunks, doc_len
from bytelm.errors import DataError

FORMAT_VERSION = 2  # of the split's bytes: bump when they change, so data caches built before are not reused
MAX_VAL_SHARE = Fraction(3, 2)  # whole documents may lift validation to this x val_fraction, never beyond

_SEP = bytes([DOC_SEPARATOR])
SPLITS = ("train", "val")


@dataclass
class Corpus:
    """A corpus split mostly by document. train/val: uint8, 1-D, read-only (np.memmap for cached sources)."""
    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    info: dict  # plain JSON: source, documents, train_bytes, val_bytes, sha256 (of train then val), ...

    def summary(self) -> str:
        """One line: the source, its size, and how much was held out (bytes, %, how)."""
        i = self.info
        train, val = i["train_bytes"], i["val_bytes"]
        return (f"{i['source']}: {_count(i['documents'], 'document')}, {train:,} train / {val:,} validation "
                f"bytes ({held_out(val, train + val, i.get('val_whole_documents', 0), i.get('val_tail_bytes', 0))})")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def held_out(val: int, total: int, whole: int, tail: int) -> str:
    """'4.9% held out: 23 whole documents and the last 1,234 bytes', or 'nothing held out'."""
    if not val:
        return "nothing held out"
    how = [_count(whole, "whole document")] if whole else []
    how += [f"the last {_count(tail, 'byte')}"] if tail else []
    return f"{100 * val / total:.1f}% held out: {' and '.join(how)}"


class _MemorySink:
    def __init__(self):
        self.buf = bytearray()

    def write(self, b) -> None:
        self.buf += b

    def finish(self) -> np.ndarray:
        arr = np.frombuffer(self.buf, dtype=np.uint8)
        arr.flags.writeable = False
        return arr


class _FileSink:
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")

    def write(self, b) -> None:
        self.f.write(b)

    def finish(self) -> np.ndarray:
        self.f.close()
        return map_split(self.path)


def map_split(path: Path) -> np.ndarray:
    """A split file as a read-only array (np.memmap cannot map an empty file: an empty split is valid)."""
    if path.stat().st_size:
        return np.memmap(path, dtype=np.uint8, mode="r")
    arr = np.zeros(0, dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def val_target(total: int, val_fraction: float) -> int:
    """Validation bytes for `total` bytes of documents: ceil(total * f), f as an exact fraction. With f = 0.1
    that is nanoGPT's split, train = data[:int(n * 0.9)]; exact, so 60 equal documents are 3 whole ones."""
    frac = Fraction(val_fraction).limit_denominator(1_000_000)
    return -(-total * frac.numerator // frac.denominator)


class SplitWriter:
    """Deal documents into train and val (the rule in the module docstring) and join each split with
    DOC_SEPARATOR, in memory or into train.bin / val.bin in out_dir.

    Documents are written in source order. The queue holds those not yet written: it starts at the earliest
    training document whose bytes the end may still need, that is, while the training documents behind it
    hold at least the bytes validation lacks (that lack grows by at most a new document's size, and a new
    training document brings its whole size, so the queue never has to reach back further).
    """

    def __init__(self, val_fraction: float, out_dir: Path | None = None):
        self.val_fraction = val_fraction
        frac = Fraction(val_fraction).limit_denominator(1_000_000)
        self.p, self.q = frac.numerator, frac.denominator
        self.share = MAX_VAL_SHARE * frac  # the most whole documents may make validation of the bytes so far
        self.sinks = {s: _FileSink(out_dir / f"{s}.bin") if out_dir else _MemorySink() for s in SPLITS}
        self.written = {s: 0 for s in SPLITS}  # documents (or pieces of one) written to each split
        self.n = self.seen = 0  # documents and their bytes so far
        self.whole_val = self.val_bytes = 0  # documents taken whole into validation, and their bytes
        self.queue: deque = deque()  # (doc, split), in source order
        self.queued_train = 0  # bytes of the training documents in the queue

    def add(self, doc) -> None:
        size = doc_len(doc)
        if size == 0:
            return  # zero-byte files and empty texts are not documents
        self.n += 1
        self.seen += size
        due = self.n * self.p // self.q  # validation documents due by now: floor(n * f)
        share = self.share
        if self.whole_val < due and (self.val_bytes + size) * share.denominator <= share.numerator * self.seen:
            self.whole_val += 1
            self.val_bytes += size
            self.queue.append((doc, "val"))
        else:
            self.queued_train += size
            self.queue.append((doc, "train"))
        self._flush()

    def _lack(self) -> int:
        """Bytes validation lacks of val_fraction of the bytes so far."""
        return max(0, -(-self.seen * self.p // self.q) - self.val_bytes)  # val_target, from the exact fraction

    def _flush(self) -> None:
        lack = self._lack()
        while self.queue:
            doc, split = self.queue[0]
            if split == "train":
                if self.queued_train - doc_len(doc) < lack:
                    return  # the end may need some of this document's bytes
                self.queued_train -= doc_len(doc)
            self.queue.popleft()
            self._write(doc, split)

    def _write(self, doc, split: str, start: int = 0, stop: int | None = None) -> None:
        stop = doc_len(doc) if stop is None else stop
        if stop <= start:
            return
        sink = self.sinks[split]
        if self.written[split]:
            sink.write(_SEP)
        for piece in chunks(doc, start, stop):
            sink.write(piece)
        self.written[split] += 1

    def _write_queue_with_tail(self, tail: int) -> None:
        """Write the queue, moving the last `tail` bytes of its training documents to validation."""
        items = list(self.queue)
        cut = [0] * len(items)  # bytes at the end of item j that go to validation
        left = tail
        for j in reversed(range(len(items))):
            if left == 0:
                break
            if items[j][1] == "train":
                cut[j] = min(left, doc_len(items[j][0]))
                left -= cut[j]
        for (doc, split), c in zip(items, cut):
            size = doc_len(doc)
            self._write(doc, split, 0, size - c)
            self._write(doc, "val", size - c, size)
        self.queue.clear()

    def finish(self, info: dict) -> Corpus:
        tail = self._lack()
        self._write_queue_with_tail(tail)
        train, val = (self.sinks[s].finish() for s in SPLITS)
        if self.n == 0:
            raise DataError(f"{info['source']}: no data (0 bytes of documents)")
        sha = hashlib.sha256()
        for arr in (train, val):
            for i in range(0, len(arr), CHUNK):
                sha.update(memoryview(np.ascontiguousarray(arr[i:i + CHUNK])))
        split = "bytes (one document)" if self.n == 1 else "documents and a tail" if tail else "documents"
        info = dict(info, format=FORMAT_VERSION, documents=self.n, train_documents=self.written["train"],
                    val_documents=self.written["val"], val_whole_documents=self.whole_val, val_tail_bytes=tail,
                    train_bytes=int(len(train)), val_bytes=int(len(val)), sha256=sha.hexdigest(), split=split,
                    val_fraction=self.val_fraction)
        return Corpus(train, val, info)


def build(docs, val_fraction: float, info: dict, out_dir: Path | None = None) -> Corpus:
    """Split `docs` (an iterable of documents) into a Corpus, in memory or into files in out_dir."""
    writer = SplitWriter(val_fraction, out_dir)
    for doc in docs:
        writer.add(doc)
    return writer.finish(info)


def check_size(data: np.ndarray, seq_len: int, name: str = "train") -> None:
    """Raise DataError unless data holds at least one window of seq_len + 1 bytes (input plus target)."""
    need = seq_len + 1
    if len(data) < need:
        raise DataError(f"the {name} split has {len(data):,} bytes but one window of seq_len + 1 = {need:,} "
                        f"bytes is needed; use more data, a shorter sequence length or another val_fraction")

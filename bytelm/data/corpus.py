"""Load a corpus: a byte source -> documents -> a train/validation split, cached on disk when large.

    from bytelm.data.corpus import load_corpus
    corpus = load_corpus("builtin")                  # or "cosmopedia", a file, a folder, a glob
    corpus.train, corpus.val                         # 1-D uint8 arrays (bytelm.data.batches cuts them into batches)
    print(corpus.summary())                          # sizes, and how much was held out for validation

Bytes are the tokens, so a corpus is a uint8 array. The parts, one module each:
  bytelm.data.builtin_corpus   builtin: Python's own documentation and the standard library's docstrings
  bytelm.data.sources          a file, a folder (recursive, sorted, hidden entries skipped) or a glob; .jsonl/.parquet
  bytelm.data.hf_stream        cosmopedia (HuggingFaceTB/smollm-corpus, cosmopedia-v2), streamed, sharded by rank
  bytelm.data.split            documents -> train/val, about val_fraction of the bytes held out
This module picks the source and keeps the cache: one folder per key, built under a temporary name and
renamed into place, so concurrent builders (DDP ranks) and interrupted builds never leave a half-written
entry that looks complete. docs/data.md has the details, sizes and cache layout.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from bytelm.data import builtin_corpus, hf_stream, sources
from bytelm.data.documents import ALTERNATIVES, check_rank, within
from bytelm.errors import DataError
from bytelm.files import cache_root
from bytelm.data.split import FORMAT_VERSION, SPLITS, Corpus, build, check_size, map_split

__all__ = ["Corpus", "FORMAT_VERSION", "check_size", "load_corpus", "load_stream"]

MEMMAP_THRESHOLD = 64 << 20  # local inputs above this many bytes are built once into a cached memmap, not RAM
COSMOPEDIA = ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2")
COSMOPEDIA_MAX_BYTES = 200_000_000  # per rank: far more than a small model sees, yet minutes (not hours) to stream


# ---------------------------------------------------------------------------------------------------------
# The on-disk cache.

def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _open_cached(d: Path, source: str) -> Corpus | None:
    """The split cached in d, or None if there is none or it is damaged (it is rebuilt then)."""
    try:
        info = json.loads((d / "info.json").read_text())
        if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
            return None
        train, val = (map_split(d / f"{s}.bin") for s in SPLITS)
    except (OSError, ValueError):
        return None
    if (len(train), len(val)) != (info.get("train_bytes"), info.get("val_bytes")):
        return None
    return Corpus(train, val, dict(info, source=source))


def _publish(d: Path, fill: Callable[[Path], None], valid: Callable[[Path], bool]) -> None:
    """Run fill(tmp_dir) and publish tmp_dir as d. An entry already at d is another process's, published
    first: kept if valid(d), replaced if damaged. Raises DataError if the cache cannot be written."""
    tmp = d.with_name(f"{d.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        try:
            os.rename(tmp, d)
        except OSError:
            if valid(d):
                return
            old = d.with_name(f"{d.name}.damaged-{uuid.uuid4().hex[:8]}")
            os.rename(d, old)
            shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, d)
    except OSError as e:
        raise DataError(f"cannot write the data cache in {d.parent}: {e.strerror or e}; "
                        f"set BYTELM_CACHE or cache_dir to a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_cached(d: Path, docs: Iterable, val_fraction: float, info: dict) -> Corpus:
    def fill(tmp: Path) -> None:
        corpus = build(docs, val_fraction, info, out_dir=tmp)
        (tmp / "info.json").write_text(json.dumps(corpus.info, indent=1))

    _publish(d, fill, lambda d: _open_cached(d, info["source"]) is not None)
    corpus = _open_cached(d, info["source"])
    if corpus is None:
        raise DataError(f"the data cache entry {d} is unreadable right after writing it")
    return corpus


# ---------------------------------------------------------------------------------------------------------
# The sources.

def _cached_documents(d: Path) -> list[bytes] | None:
    try:
        lengths = np.load(d / "lengths.npy", allow_pickle=False)
        blob = (d / "documents.bin").read_bytes()
    except (OSError, ValueError, EOFError):
        return None
    if not (lengths.ndim == 1 and lengths.dtype == np.int64 and (lengths >= 0).all()
            and int(lengths.sum()) == len(blob)):
        return None
    ends = np.cumsum(lengths).tolist()
    return [blob[a:b] for a, b in zip([0] + ends[:-1], ends)]


def _load_builtin(val_fraction: float, cache_dir, max_bytes: int | None) -> Corpus:
    # Cache the documents, not the split: splitting 2 MB in memory is instant, parsing 500 files is not.
    key = _key({"format": FORMAT_VERSION, **builtin_corpus.fingerprint()})
    d = cache_root(cache_dir) / f"builtin-py{platform.python_version()}-{key}"
    docs = _cached_documents(d)
    if docs is None:
        docs = builtin_corpus.builtin_documents()

        def fill(tmp: Path) -> None:
            (tmp / "documents.bin").write_bytes(b"".join(docs))
            np.save(tmp / "lengths.npy", np.array([len(x) for x in docs], dtype=np.int64))
            (tmp / "info.json").write_text(json.dumps({"format": FORMAT_VERSION, "documents": len(docs)}))

        try:
            _publish(d, fill, lambda d: _cached_documents(d) is not None)
        except DataError:
            pass  # an unwritable cache only costs the next run a rebuild
    if not docs:
        raise DataError("the builtin corpus is empty on this Python (no standard library sources found); "
                        "use --data PATH")
    info = {"source": "builtin", "python": platform.python_version()}
    return build(within(docs, max_bytes), val_fraction, info)


def _load_local(spec: str, val_fraction: float, text_field: str, cache_dir, max_bytes: int | None) -> Corpus:
    files = sources.list_files(spec)
    info = {"source": spec, "files": len(files)}
    docs = within(sources.local_documents(files, text_field), max_bytes)
    total = sum(st.st_size for _, st in files)
    if min(total, max_bytes or total) <= MEMMAP_THRESHOLD:
        return build(docs, val_fraction, info)
    key = _key({"format": FORMAT_VERSION, "files": [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p, st in files],
                "text_field": text_field, "val_fraction": val_fraction, "max_bytes": max_bytes})
    d = cache_root(cache_dir) / f"local-{key}"
    return _open_cached(d, spec) or _build_cached(d, docs, val_fraction, info)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_stream(path: str, name: str | None = None, *, data_files=None, split: str = "train",
                text_field: str = "text", val_fraction: float = 0.05, cache_dir=None,
                max_bytes: int | None = COSMOPEDIA_MAX_BYTES, rank: int = 0, world_size: int = 1,
                check_hub: bool = False, source: str | None = None) -> Corpus:
    """Stream a `datasets` source into a cached memmap, this rank's shard only, then split it.
    The cache key is the arguments (not the remote content): delete the cache folder to refetch."""
    check_rank(rank, world_size)
    source = source or (f"{path}/{name}" if name else str(path))
    key = _key({"format": FORMAT_VERSION, "path": path, "name": name, "data_files": data_files, "split": split,
                "text_field": text_field, "val_fraction": val_fraction, "max_bytes": max_bytes,
                "rank": rank, "world_size": world_size})
    d = cache_root(cache_dir) / f"stream-{key}"
    cached = _open_cached(d, source)
    if cached is not None:
        return cached  # no network needed once built
    if not hf_stream.have_datasets():
        raise DataError(f'{source} needs the datasets package: pip install "bytelm[hf]"; or {ALTERNATIVES}')
    if check_hub:
        reason = hf_stream.hub_unreachable_reason()
        if reason:
            raise DataError(f"cannot reach the HuggingFace hub ({reason}); {ALTERNATIVES}")
    try:
        dataset = hf_stream.open_stream(path, name, data_files=data_files, split=split)
    except Exception as e:
        raise DataError(f"cannot open {source}: {_first_line(e)}") from None
    info = {"source": source, "rank": rank, "world_size": world_size, "max_bytes": max_bytes}
    docs = hf_stream.stream_documents(dataset, text_field, rank, world_size, max_bytes)
    return _build_cached(d, docs, val_fraction, info)


# ---------------------------------------------------------------------------------------------------------
# The entry point.

def load_corpus(spec: str = "builtin", *, val_fraction: float = 0.05, text_field: str = "text",
                cache_dir: str | None = None, max_bytes: int | None = None,
                rank: int = 0, world_size: int = 1) -> Corpus:
    """Load a corpus: "builtin", "cosmopedia", a file, a folder (recursive) or a glob. Raises DataError.

    Ranks: builtin and local paths give every rank the same bytes (the BatchSampler's rank makes the
    windows differ); cosmopedia streams a disjoint shard per rank. max_bytes caps the documents taken
    (default: everything, 200 MB per rank for cosmopedia). A file named "builtin" is ./builtin.
    """
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"no data source given; {ALTERNATIVES}")
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if max_bytes is not None and not (isinstance(max_bytes, int) and max_bytes >= 1):
        raise DataError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    check_rank(rank, world_size)
    if spec == "builtin":
        return _load_builtin(val_fraction, cache_dir, max_bytes)
    if spec == "cosmopedia":
        return load_stream(*COSMOPEDIA, text_field=text_field, val_fraction=val_fraction, cache_dir=cache_dir,
                           max_bytes=max_bytes or COSMOPEDIA_MAX_BYTES, rank=rank, world_size=world_size,
                           check_hub=True, source="cosmopedia")
    return _load_local(spec, val_fraction, text_field, cache_dir, max_bytes)

"""Byte sources -> documents -> a train/validation split, cached. Bytes are the tokens, so a corpus is just a uint8 array.

    from bytelm.corpus import load_corpus
    corpus = load_corpus("builtin")                  # or "cosmopedia", a file, a folder, a glob
    corpus.train, corpus.val                         # 1-D uint8 arrays (bytelm.batches cuts them into batches)

Every source is read by one code path into a stream of documents (bytes); documents are joined with
DOC_SEPARATOR (one NUL byte) inside each split:
  builtin     Python's own documentation (pydoc_data topics) and the standard library's docstrings, parsed
              with `ast` (nothing is imported), in a fixed order: the same bytes on every run of one Python.
  PATH        a file, a folder (recursive, sorted, hidden entries skipped) or a glob. One file is one
              document, except .jsonl (one per line, field `text`) and .parquet (one per row, column `text`).
  cosmopedia  HuggingFaceTB/smollm-corpus, config cosmopedia-v2, streamed with `datasets`, sharded by rank.

The validation split is by whole document, evenly spaced (every 20th with val_fraction=0.05). A lone document
is split by bytes instead: its last val_fraction is validation, as nanoGPT splits tinyshakespeare.
docs/data.md has the details, sizes and cache layout.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import platform
import shutil
import socket
import sys
import sysconfig
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .config import DOC_SEPARATOR
from .errors import DataError
from .files import cache_root

FORMAT_VERSION = 1  # bump when the bytes a source produces change, so caches built before are not reused
MEMMAP_THRESHOLD = 64 << 20  # local inputs above this many bytes are built once into a cached memmap, not RAM
COSMOPEDIA = ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2")
COSMOPEDIA_MAX_BYTES = 200_000_000  # per rank: far more than a small model sees, yet minutes (not hours) to stream
HUB_TIMEOUT_S = 3.0  # connectivity probe before streaming: fail in seconds, not after minutes of retries
ALTERNATIVES = "use --data builtin (ships with Python) or --data PATH (a file, folder or glob)"

_SEP = bytes([DOC_SEPARATOR])
_CHUNK = 16 << 20  # copy large files in pieces so memory stays flat
_SPLITS = ("train", "val")


@dataclass
class Corpus:
    """A corpus split by document. train/val: uint8, 1-D, read-only (np.memmap for cached sources)."""
    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    info: dict  # plain JSON: source, documents, train_bytes, val_bytes, sha256 (of train then val), ...

    def summary(self) -> str:
        i = self.info
        return (f"{i['source']}: {i['documents']:,} documents, {i['train_bytes']:,} train bytes, "
                f"{i['val_bytes']:,} val bytes (split by {i['split']})")


# ---------------------------------------------------------------------------------------------------------
# Documents and the split writer: the one path every source goes through.

@dataclass(frozen=True)
class _FileDoc:
    """A whole file as one document; copied in chunks, so a large file never sits in memory at once."""
    path: str
    size: int


def _doc_len(doc) -> int:
    return doc.size if isinstance(doc, _FileDoc) else len(doc)


def _read_error(path, e: OSError) -> DataError:
    return DataError(f"cannot read {path}: {e.strerror or e}")


def _chunks(doc, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    """The bytes doc[start:stop], in pieces of at most _CHUNK."""
    stop = _doc_len(doc) if stop is None else stop
    if not isinstance(doc, _FileDoc):
        yield doc[start:stop]
        return
    try:
        with open(doc.path, "rb") as f:
            f.seek(start)
            left = stop - start
            while left > 0:
                piece = f.read(min(_CHUNK, left))
                if not piece:
                    raise DataError(f"{doc.path} shrank while it was being read")
                left -= len(piece)
                yield piece
    except OSError as e:
        raise _read_error(doc.path, e) from None


def _within(docs: Iterable, max_bytes: int | None) -> Iterator:
    """Documents until max_bytes of them are taken; the one that crosses the limit is cut. Stops pulling
    from `docs` as soon as the limit is reached, so a network stream is not read further."""
    left = max_bytes
    for doc in docs:
        if left is not None:
            if _doc_len(doc) > left:
                doc = _FileDoc(doc.path, left) if isinstance(doc, _FileDoc) else doc[:left]
            left -= _doc_len(doc)
        yield doc
        if left is not None and left <= 0:
            return


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
        return _map(self.path)


def _map(path: Path) -> np.ndarray:
    # np.memmap cannot map an empty file; an empty split is a valid (if useless) outcome.
    return np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else _empty()


def _empty() -> np.ndarray:
    arr = np.zeros(0, dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def _is_val(i: int, frac: Fraction) -> bool:
    """Document i is held out when the running count of val documents, floor(n * frac), steps up: evenly
    spaced and exact (val_fraction 0.05 -> documents 19, 39, 59, ...), and decidable while streaming."""
    p, q = frac.numerator, frac.denominator
    return (i + 1) * p // q > i * p // q


class _SplitWriter:
    """Deal documents into train and val and join each split with DOC_SEPARATOR, in memory or into files.

    The newest document is held back one step so the end can be decided once the count is known: a lone
    document is split by bytes, and a corpus the spacing rule gave no val document sends its last one there.
    """

    def __init__(self, val_fraction: float, out_dir: Path | None = None):
        self.val_fraction = val_fraction
        self.frac = Fraction(val_fraction).limit_denominator(1_000_000)
        self.sinks = {s: _FileSink(out_dir / f"{s}.bin") if out_dir else _MemorySink() for s in _SPLITS}
        self.docs = {s: 0 for s in _SPLITS}
        self.n = 0
        self.pending = None

    def add(self, doc) -> None:
        if _doc_len(doc) == 0:
            return  # zero-byte files and empty texts are not documents
        if self.pending is not None:
            self._write(self.pending, "val" if _is_val(self.n - 1, self.frac) else "train")
        self.pending = doc
        self.n += 1

    def _write(self, doc, split: str, start: int = 0, stop: int | None = None) -> None:
        stop = _doc_len(doc) if stop is None else stop
        if stop <= start:
            return
        sink = self.sinks[split]
        if self.docs[split]:
            sink.write(_SEP)
        for piece in _chunks(doc, start, stop):
            sink.write(piece)
        self.docs[split] += 1

    def finish(self, info: dict) -> Corpus:
        split = "documents"
        if self.n == 1:  # one document: nanoGPT's split, train = data[:int(n * 0.9)] for val_fraction 0.1
            n = _doc_len(self.pending)
            cut = int(n * (1 - self.val_fraction))
            self._write(self.pending, "train", 0, cut)
            self._write(self.pending, "val", cut, n)
            split = "bytes (one document)"
        elif self.n > 1:
            last = _is_val(self.n - 1, self.frac) or (self.docs["val"] == 0 and self.frac > 0)
            self._write(self.pending, "val" if last else "train")
        train, val = (self.sinks[s].finish() for s in _SPLITS)
        if self.n == 0:
            raise DataError(f"{info['source']}: no data (0 bytes of documents)")
        sha = hashlib.sha256()
        for arr in (train, val):
            for i in range(0, len(arr), _CHUNK):
                sha.update(memoryview(np.ascontiguousarray(arr[i:i + _CHUNK])))
        info = dict(info, format=FORMAT_VERSION, documents=self.n, train_documents=self.docs["train"],
                    val_documents=self.docs["val"], train_bytes=int(len(train)), val_bytes=int(len(val)),
                    sha256=sha.hexdigest(), split=split, val_fraction=self.val_fraction)
        return Corpus(train, val, info)


def _build(docs: Iterable, val_fraction: float, info: dict, out_dir: Path | None = None) -> Corpus:
    writer = _SplitWriter(val_fraction, out_dir)
    for doc in docs:
        writer.add(doc)
    return writer.finish(info)


# ---------------------------------------------------------------------------------------------------------
# The on-disk cache: one folder per key, built under a temporary name and renamed into place, so concurrent
# builders (DDP ranks) and interrupted builds never leave a half-written entry that looks complete.

def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _open_cached(d: Path, source: str) -> Corpus | None:
    try:
        info = json.loads((d / "info.json").read_text())
        if info.get("format") != FORMAT_VERSION:
            return None
        train, val = (_map(d / f"{s}.bin") for s in _SPLITS)
    except (OSError, ValueError):
        return None
    if (len(train), len(val)) != (info.get("train_bytes"), info.get("val_bytes")):
        return None
    return Corpus(train, val, dict(info, source=source))


def _in_cache(d: Path, fill) -> None:
    """Run fill(tmp_dir) and publish tmp_dir as d. Raises DataError if the cache cannot be written."""
    tmp = d.with_name(f"{d.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        if d.exists() and not (d / "info.json").exists():
            shutil.rmtree(d, ignore_errors=True)  # a broken entry left by an older, interrupted version
        try:
            os.rename(tmp, d)
        except OSError:
            if not (d / "info.json").exists():
                raise  # otherwise another process published the same entry first: use theirs
    except OSError as e:
        raise DataError(f"cannot write the data cache in {d.parent}: {e.strerror or e}; "
                        f"set BYTELM_CACHE or cache_dir to a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_cached(d: Path, docs: Iterable, val_fraction: float, info: dict) -> Corpus:
    def fill(tmp: Path) -> None:
        corpus = _build(docs, val_fraction, info, out_dir=tmp)
        (tmp / "info.json").write_text(json.dumps(corpus.info, indent=1))

    _in_cache(d, fill)
    corpus = _open_cached(d, info["source"])
    if corpus is None:
        raise DataError(f"the data cache entry {d} is unreadable right after writing it")
    return corpus


# ---------------------------------------------------------------------------------------------------------
# builtin: Python's documentation and the standard library's docstrings.

# Packages skipped: test suites, GUI code with little prose, and boilerplate (the ~120 codec modules of
# `encodings` share one generated docstring). Site-packages is never visited: the walk starts from names.
_BUILTIN_SKIP = frozenset({"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3",
                           "ensurepip", "encodings", "site-packages", "dist-packages", "__pycache__",
                           "__hello__", "__phello__", "this"})


def _stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's .py files, in a fixed order: sorted module names, then sorted walks."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for name in sorted(sys.stdlib_module_names):
        if name in _BUILTIN_SKIP:
            continue
        if (root / f"{name}.py").is_file():
            files.append(root / f"{name}.py")
        elif (root / name).is_dir():
            for dirpath, dirnames, filenames in os.walk(root / name):
                dirnames[:] = sorted(n for n in dirnames if n not in _BUILTIN_SKIP and not n.startswith("."))
                files += [Path(dirpath, n) for n in sorted(filenames) if n.endswith(".py")]
    return root, files


_HAS_DOCSTRING = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(path: Path) -> bytes:
    """A module's docstrings (module, classes, functions) in source order, or b"" on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return b""
    parts: list[str] = []

    def visit(node: ast.AST) -> None:
        # Statements only: expressions hold no docstrings, and skipping them is 5x faster than ast.walk.
        if isinstance(node, _HAS_DOCSTRING) and (doc := ast.get_docstring(node, clean=True)):
            parts.append(doc)
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, name, None) or ():
                visit(child)

    visit(tree)
    return "\n\n".join(parts).encode("utf-8", "replace")


def builtin_documents() -> list[bytes]:
    """The builtin corpus's documents: each pydoc topic (sorted by name), then each stdlib module's
    docstrings (see _stdlib_files). About 2 MB; ~4 s to parse on a busy core, hence the cache in _load_builtin."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package the docs separately
        topics = {}
    docs = [topics[k].encode("utf-8", "replace") for k in sorted(topics)]
    _, files = _stdlib_files()
    docs += [_docstrings(p) for p in files]
    return [d for d in docs if d]


def _builtin_key() -> str:
    root, files = _stdlib_files()
    listing = []
    for p in files:
        try:
            st = p.stat()
            listing.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
        except OSError:
            listing.append((str(p), -1, -1))
    spec = importlib.util.find_spec("pydoc_data.topics")
    topics = spec.origin if spec and spec.origin else ""
    return _key({"format": FORMAT_VERSION, "python": sys.version, "tag": sys.implementation.cache_tag,
                 "root": str(root), "files": listing, "topics": topics,
                 "topics_stat": os.stat(topics).st_size if os.path.isfile(topics) else -1})


def _load_builtin(val_fraction: float, cache_dir, max_bytes: int | None) -> Corpus:
    # Cache the documents, not the split: splitting 2 MB in memory is instant, parsing 500 files is not.
    d = cache_root(cache_dir) / f"builtin-py{platform.python_version()}-{_builtin_key()}"
    docs = None
    try:
        lengths = np.load(d / "lengths.npy", allow_pickle=False)
        blob = (d / "documents.bin").read_bytes()
        if int(lengths.sum()) == len(blob):
            ends = np.cumsum(lengths).tolist()
            docs = [blob[a:b] for a, b in zip([0] + ends[:-1], ends)]
    except (OSError, ValueError):
        pass
    if docs is None:
        docs = builtin_documents()

        def fill(tmp: Path) -> None:
            (tmp / "documents.bin").write_bytes(b"".join(docs))
            np.save(tmp / "lengths.npy", np.array([len(x) for x in docs], dtype=np.int64))
            (tmp / "info.json").write_text(json.dumps({"format": FORMAT_VERSION, "documents": len(docs)}))

        try:
            _in_cache(d, fill)
        except DataError:
            pass  # an unwritable cache only costs the next run a rebuild
    info = {"source": "builtin", "python": platform.python_version()}
    if not docs:
        raise DataError(f"the builtin corpus is empty on this Python (no standard library sources found); "
                        f"use --data PATH")
    return _build(_within(docs, max_bytes), val_fraction, info)


# ---------------------------------------------------------------------------------------------------------
# Local paths: a file, a folder or a glob.

def _walk(root: Path) -> list[Path]:
    def fail(e: OSError) -> None:
        raise DataError(f"cannot read folder {e.filename}: {e.strerror or e}")

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]  # .git, .venv, .cache, ...
        found += [Path(dirpath, n) for n in filenames if not n.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def list_files(spec: str) -> list[tuple[Path, os.stat_result]]:
    """The non-empty files `spec` names, in corpus order, with their stat. Raises DataError."""
    path = Path(os.path.expanduser(spec))
    if path.exists():
        matches = [path]
    elif any(c in spec for c in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
        if not matches:
            raise DataError(f"no files match {spec!r}; {ALTERNATIVES}")
    elif path.is_symlink():
        raise DataError(f"data path is a broken link: {spec}")
    else:
        raise DataError(f"data path not found: {spec}; {ALTERNATIVES}")
    files = []
    for m in matches:
        files += _walk(m) if m.is_dir() else [m]
    out, empty = [], 0
    for f in dict.fromkeys(files):  # a glob may name a file and its folder: keep the first
        try:
            st = f.stat()
        except OSError as e:
            raise _read_error(f, e) from None
        if not f.is_file():
            continue  # sockets, fifos, devices
        if st.st_size == 0:
            empty += 1
            continue
        if not os.access(f, os.R_OK):
            raise DataError(f"cannot read {f}: permission denied")
        out.append((f, st))
    if not out:
        what = f"all {empty} files in {spec} are empty (0 bytes)" if empty else f"no files in {spec}"
        raise DataError(f"{what}; {ALTERNATIVES}")
    return out


def _jsonl_documents(path: Path, text_field: str) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, UnicodeDecodeError) as e:
                    msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                    raise DataError(f"{path}:{lineno}: invalid JSON ({msg})") from None
                yield _text_bytes(record, text_field, f"{path}:{lineno}")
    except OSError as e:
        raise _read_error(path, e) from None


def _text_bytes(record, text_field: str, where: str) -> bytes:
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


def _parquet_documents(path: Path, text_field: str) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else e!r})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(names[:8])}); "
                        f"name another with text_field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _text_bytes({text_field: value}, text_field, f"{path}: row {row}")


def _file_documents(files: list[tuple[Path, os.stat_result]], text_field: str) -> Iterator:
    for path, st in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            yield _FileDoc(str(path), st.st_size)


def _load_local(spec: str, val_fraction: float, text_field: str, cache_dir, max_bytes: int | None) -> Corpus:
    files = list_files(spec)
    info = {"source": spec, "files": len(files)}
    docs = _within(_file_documents(files, text_field), max_bytes)
    total = sum(st.st_size for _, st in files)
    if min(total, max_bytes or total) <= MEMMAP_THRESHOLD:
        return _build(docs, val_fraction, info)
    key = _key({"format": FORMAT_VERSION, "files": [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p, st in files],
                "text_field": text_field, "val_fraction": val_fraction, "max_bytes": max_bytes})
    d = cache_root(cache_dir) / f"local-{key}"
    return _open_cached(d, spec) or _build_cached(d, docs, val_fraction, info)


# ---------------------------------------------------------------------------------------------------------
# HuggingFace streaming (cosmopedia), factored so tests drive the same code on local parquet/jsonl files.

def _have_datasets() -> bool:
    return importlib.util.find_spec("datasets") is not None


def _probe(host: str, port: int, timeout: float) -> None:
    socket.create_connection((host, port), timeout=timeout).close()


def hub_unreachable_reason(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the HuggingFace hub cannot be reached (offline setting, no DNS, no route), or None if it can."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    target = urlsplit(url if "://" in url else f"http://{url}")
    host, port = target.hostname or "huggingface.co", target.port or (443 if target.scheme == "https" else 80)
    result: list[str | None] = []

    def run() -> None:
        try:
            _probe(host, port, timeout)
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e.strerror or e}")

    # In a thread because name resolution ignores the socket timeout and can hang for much longer.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout + 2)
    return result[0] if result else f"{host}:{port}: no answer in {timeout + 2:.0f} s"


def open_stream(path: str, name: str | None = None, *, data_files=None, split: str = "train"):
    """`datasets.load_dataset(..., streaming=True)`: the hub for cosmopedia, "parquet"/"json" in tests."""
    import datasets
    return datasets.load_dataset(path, name, data_files=data_files, split=split, streaming=True)


def stream_documents(dataset: Iterable, text_field: str = "text", rank: int = 0, world_size: int = 1,
                     max_bytes: int | None = None) -> Iterator[bytes]:
    """This rank's documents from a stream of records, as UTF-8 bytes, stopping once max_bytes are taken.

    A `datasets.IterableDataset` is split with `split_dataset_by_node` (whole shards per rank when the shard
    count divides by world_size, else every world_size-th record); any other iterable gives rank the records
    i with i % world_size == rank. Either way the ranks' documents are disjoint.
    """
    _check_rank(rank, world_size)
    hf = sys.modules.get("datasets")
    if world_size > 1:
        if hf is not None and isinstance(dataset, hf.IterableDataset):
            from datasets.distributed import split_dataset_by_node
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        else:
            dataset = itertools.islice(dataset, rank, None, world_size)

    def records() -> Iterator[bytes]:
        i = 0
        try:
            for i, record in enumerate(dataset):
                yield _text_bytes(record, text_field, f"record {i}")
        except DataError:
            raise
        except Exception as e:  # network drops, auth, schema changes: the user's to see, in one line
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"reading the stream failed after {i} records: {msg}") from None

    yield from _within(records(), max_bytes)


def load_stream(path: str, name: str | None = None, *, data_files=None, split: str = "train",
                text_field: str = "text", val_fraction: float = 0.05, cache_dir=None,
                max_bytes: int | None = COSMOPEDIA_MAX_BYTES, rank: int = 0, world_size: int = 1,
                check_hub: bool = False, source: str | None = None) -> Corpus:
    """Stream a `datasets` source into a cached memmap, this rank's shard only, then split by document.
    The cache key is the arguments (not the remote content): delete the cache folder to refetch."""
    _check_rank(rank, world_size)
    source = source or (f"{path}/{name}" if name else str(path))
    key = _key({"format": FORMAT_VERSION, "path": path, "name": name, "data_files": data_files, "split": split,
                "text_field": text_field, "val_fraction": val_fraction, "max_bytes": max_bytes,
                "rank": rank, "world_size": world_size})
    d = cache_root(cache_dir) / f"stream-{key}"
    cached = _open_cached(d, source)
    if cached is not None:
        return cached  # no network needed once built
    if not _have_datasets():
        raise DataError(f'{source} needs the datasets package: pip install "bytelm[hf]"; or {ALTERNATIVES}')
    if check_hub:
        reason = hub_unreachable_reason()
        if reason:
            raise DataError(f"cannot reach the HuggingFace hub ({reason}); {ALTERNATIVES}")
    try:
        dataset = open_stream(path, name, data_files=data_files, split=split)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot open {source}: {msg}") from None
    info = {"source": source, "rank": rank, "world_size": world_size, "max_bytes": max_bytes}
    docs = stream_documents(dataset, text_field, rank, world_size, max_bytes)
    return _build_cached(d, docs, val_fraction, info)


# ---------------------------------------------------------------------------------------------------------
# The entry point.

def _check_rank(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise DataError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")


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
    _check_rank(rank, world_size)
    if spec == "builtin":
        return _load_builtin(val_fraction, cache_dir, max_bytes)
    if spec == "cosmopedia":
        return load_stream(*COSMOPEDIA, text_field=text_field, val_fraction=val_fraction, cache_dir=cache_dir,
                           max_bytes=max_bytes or COSMOPEDIA_MAX_BYTES, rank=rank, world_size=world_size,
                           check_hub=True, source="cosmopedia")
    return _load_local(spec, val_fraction, text_field, cache_dir, max_bytes)

def check_size(data: np.ndarray, seq_len: int, name: str = "train") -> None:
    """Raise DataError unless data holds at least one window of seq_len + 1 bytes (input plus target)."""
    need = seq_len + 1
    if len(data) < need:
        raise DataError(f"the {name} split has {len(data):,} bytes but one window of seq_len + 1 = {need:,} "
                        f"bytes is needed; use more data, a shorter sequence length or another val_fraction")

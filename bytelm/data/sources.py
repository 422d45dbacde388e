"""Local byte sources: a file, a folder or a glob -> documents. One file is one document, except .jsonl (one
per line, field `text`) and .parquet (one per row, column `text`).

    from bytelm.data.sources import list_files, local_documents
    files = list_files("books/")                       # [(path, stat), ...]: non-empty files, in corpus order
    for doc in local_documents(files, "text"): ...     # FileDoc for plain files, bytes for jsonl/parquet rows

Walks and globs follow symbolic links but read each folder once (by device and inode) and never enter a
folder that contains the walk's own root, so a link back up (`ln -s .. dir/a`) adds nothing and ends; and a
walk reads at most MAX_WALK_ENTRIES entries. Every parse failure is a DataError naming the file and line (or
row). Hidden files and folders (`.git`, `.venv`, ...) are skipped, as glob skips them.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from bytelm.data.documents import ALTERNATIVES, FileDoc, read_error, text_bytes
from bytelm.errors import DataError

# A million one-document files take minutes only to list and stat; beyond that, pack them into .jsonl or
# .parquet files. Also what ends a walk that a link to a huge tree (`ln -s / data/root`) would make long.
MAX_WALK_ENTRIES = 1_000_000


class _Walker:
    """Reads the folders of one data path: counts entries against MAX_WALK_ENTRIES and remembers the folders
    entered, so none is read twice and none that contains `root` (a loop back up) is read at all."""

    def __init__(self, spec: str, root: Path):
        self.spec, self.entries, self.seen = spec, 0, set()
        real = Path(os.path.realpath(root))
        self.above = set()  # (st_dev, st_ino) of root and every folder above it
        for folder in (real, *real.parents):
            try:
                self.above.add(_key(folder.stat()))
            except OSError:
                pass
        self.root = _key(real.stat()) if real.is_dir() else None

    def enter(self, st: os.stat_result, tag=None) -> bool:
        """Whether to read a folder (st: its stat) in pass `tag`: not if read in that pass before, and never
        root or a folder above it (reached again, it is a loop)."""
        key = _key(st)
        if key in self.above or (key, tag) in self.seen:
            return False
        self.seen.add((key, tag))
        return True

    def scan(self, folder: Path, hidden: bool = False) -> list[os.DirEntry]:
        """The entries of `folder`, sorted by name; hidden ones only if asked."""
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if hidden or not e.name.startswith(".")]
        except OSError as e:
            raise DataError(f"cannot read folder {e.filename or folder}: {e.strerror or e}") from None
        self.entries += len(entries)
        if self.entries > MAX_WALK_ENTRIES:
            raise DataError(f"{self.spec} names more than {MAX_WALK_ENTRIES:,} files and folders; point --data "
                            f"at a smaller folder, or pack documents into .jsonl or .parquet files")
        return sorted(entries, key=lambda e: e.name)

    def subfolders(self, entries: list[os.DirEntry], tag=None) -> Iterator[Path]:
        for e in entries:
            try:
                if e.is_dir() and self.enter(e.stat(), tag):  # both follow links
                    yield Path(e.path)
            except OSError:
                continue  # a link that broke meanwhile: not a folder

    def walk(self, top: Path) -> list[Path]:
        """Every non-folder entry below `top` (dangling links too: reading them names them), in corpus order;
        nothing if `top` was walked already or is a folder above the root."""
        try:
            key = _key(top.stat())
        except OSError as e:
            raise DataError(f"cannot read folder {top}: {e.strerror or e}") from None
        if (key, None) in self.seen or (key in self.above and key != self.root):
            return []
        self.seen.add((key, None))
        found, stack = [], [top]
        while stack:  # not recursion: a tree can be deeper than Python's recursion limit
            entries = self.scan(stack.pop())
            found += [Path(e.path) for e in entries if not _is_dir(e)]
            stack += self.subfolders(entries)
        return sorted(found, key=lambda p: p.relative_to(top).parts)


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _glob_base(parts: tuple[str, ...]) -> tuple[Path, int]:
    """The folder a glob starts from (its parts before the first with a wildcard), and that part's index."""
    first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return (Path(*parts[:first]) if first else Path(".")), first


def expand_glob(spec: str, walker: _Walker | None = None) -> list[Path]:
    """What glob.glob(spec, recursive=True) matches, sorted, but loop-safe and bounded (see _Walker): `**`
    reads each folder once per `**` in the pattern. A match ending in `**` is its folder (walked later)."""
    parts = Path(spec).parts
    base, first = _glob_base(parts)
    walker = walker or _Walker(spec, base)
    found: list[Path] = []
    stack = [(base, first)] if base.is_dir() else []
    while stack:
        folder, k = stack.pop()
        part, last = parts[k], k == len(parts) - 1
        if part == "**":
            if last:
                found.append(folder)  # everything below, as the folder's walk finds it
                continue
            stack.append((folder, k + 1))  # `**` matching no folder
            stack += [(sub, k) for sub in walker.subfolders(walker.scan(folder), tag=k)]
        elif glob.has_magic(part):
            for e in walker.scan(folder, hidden=part.startswith(".")):
                if fnmatch.fnmatch(e.name, part):
                    if last:
                        found.append(Path(e.path))
                    elif _is_dir(e):
                        stack.append((Path(e.path), k + 1))
        else:
            path = folder / part
            if last and (path.exists() or path.is_symlink()):
                found.append(path)
            elif not last and path.is_dir():
                stack.append((path, k + 1))
    return sorted(set(found), key=str)


def list_files(spec: str) -> list[tuple[Path, os.stat_result]]:
    """The non-empty files `spec` names, in corpus order, with their stat. Raises DataError."""
    path = Path(os.path.expanduser(spec))
    if path.exists():
        walker, matches = _Walker(spec, path), [path]
    elif glob.has_magic(spec):
        walker = _Walker(spec, _glob_base(path.parts)[0])
        matches = expand_glob(str(path), walker)
        if not matches:
            raise DataError(f"no files match {spec!r}; {ALTERNATIVES}")
    elif path.is_symlink():
        raise DataError(f"data path is a broken link: {spec}")
    else:
        raise DataError(f"data path not found: {spec}; {ALTERNATIVES}")
    files = []
    for m in matches:
        files += walker.walk(m) if m.is_dir() else [m]
    return _readable_files(spec, dict.fromkeys(files))  # a glob may name a file and its folder: keep the first


def _readable_files(spec: str, files) -> list[tuple[Path, os.stat_result]]:
    out, empty = [], 0
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise read_error(f, e) from None
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


def _number(text: str) -> int:
    return 0  # numbers are never a document's text; not converting them leaves no digit limit to exceed


def parse_json_line(line: bytes, where: str):
    """One JSON value, or a DataError naming `where` for any failure (syntax, encoding, nesting)."""
    try:
        return json.loads(line, parse_int=_number)
    except json.JSONDecodeError as e:
        msg = e.msg
    except UnicodeDecodeError:
        msg = "not UTF-8"
    except RecursionError:
        msg = "nested too deeply"
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f"{where}: invalid JSON ({msg})")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    where = f"{path}:{lineno}"
                    yield text_bytes(parse_json_line(line, where), text_field, where)
    except OSError as e:
        raise read_error(path, e) from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _parquet_documents(path: Path, text_field: str) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(names[:8])}); "
                        f"name another with text_field")
    row = 0
    batches = pf.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            values = [] if batch is None else batch.column(0).to_pylist()
        except Exception as e:  # a page damaged after a readable footer
            raise DataError(f"{path}: unreadable after row {row} ({_first_line(e)})") from None
        if batch is None:
            return
        for value in values:
            row += 1
            yield text_bytes({text_field: value}, text_field, f"{path}: row {row}")


def local_documents(files: list[tuple[Path, os.stat_result]], text_field: str) -> Iterator:
    """The documents of list_files' files, in order: FileDoc for plain files, bytes for jsonl/parquet."""
    for path, st in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            yield FileDoc(str(path), st.st_size)

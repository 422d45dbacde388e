"""The builtin corpus: Python's own documentation (pydoc_data topics) and the standard library's docstrings,
parsed with `ast` (nothing is imported), in a fixed order: the same bytes on every run of one Python.

    from bytelm.data.builtin_corpus import builtin_documents
    docs = builtin_documents()      # about 2 MB of English in ~470 documents; bytelm.data.corpus caches them
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
import sysconfig
import warnings
from pathlib import Path

# Packages skipped: test suites, GUI code with little prose, and boilerplate (the ~120 codec modules of
# `encodings` share one generated docstring). Site-packages is never visited: the walk starts from names.
SKIP = frozenset({"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
                  "encodings", "site-packages", "dist-packages", "__pycache__", "__hello__", "__phello__", "this"})


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's .py files, in a fixed order: sorted module names, then sorted walks."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for name in sorted(sys.stdlib_module_names):
        if name in SKIP:
            continue
        if (root / f"{name}.py").is_file():
            files.append(root / f"{name}.py")
        elif (root / name).is_dir():
            for dirpath, dirnames, filenames in os.walk(root / name):
                dirnames[:] = sorted(n for n in dirnames if n not in SKIP and not n.startswith("."))
                files += [Path(dirpath, n) for n in sorted(filenames) if n.endswith(".py")]
    return root, files


_HAS_DOCSTRING = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(path: Path) -> bytes:
    """A module's docstrings (module, classes, functions) in source order, or b"" on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError):
        return b""
    parts: list[str] = []

    def visit(node: ast.AST) -> None:
        # Statements only: expressions hold no docstrings, and skipping them is 5x faster than ast.walk.
        if isinstance(node, _HAS_DOCSTRING) and (doc := ast.get_docstring(node, clean=True)):
            parts.append(doc)
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, name, None) or ():
                visit(child)

    try:
        visit(tree)
    except RecursionError:  # statements nested deeper than Python's recursion limit
        return b""
    return "\n\n".join(parts).encode("utf-8", "replace")


def builtin_documents() -> list[bytes]:
    """The builtin corpus's documents: each pydoc topic (sorted by name), then each stdlib module's
    docstrings (see stdlib_files). About 2 MB; ~4 s to parse on a busy core, hence bytelm.data.corpus caches them."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package the docs separately
        topics = {}
    docs = [topics[k].encode("utf-8", "replace") for k in sorted(topics)]
    _, files = stdlib_files()
    docs += [_docstrings(p) for p in files]
    return [d for d in docs if d]


def fingerprint() -> dict:
    """What the builtin documents depend on (this Python and its stdlib files' names, sizes and mtimes): the
    builtin cache's key, so an upgraded or edited Python rebuilds it."""
    root, files = stdlib_files()
    listing = []
    for p in files:
        try:
            st = p.stat()
            listing.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
        except OSError:
            listing.append((str(p), -1, -1))
    spec = importlib.util.find_spec("pydoc_data.topics")
    topics = spec.origin if spec and spec.origin else ""
    return {"python": sys.version, "tag": sys.implementation.cache_tag, "root": str(root), "files": listing,
            "topics": topics, "topics_stat": os.stat(topics).st_size if os.path.isfile(topics) else -1}

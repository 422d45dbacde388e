"""Shared fixtures: small corpora that need nothing from outside the repo and ../shared, and caches kept out
of the user's: the data cache, the native library and torch.compile's output go to a temporary folder."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set at import, before any test module is collected (some load the native library at import), and in
# os.environ, so every subprocess a test starts inherits it.
CACHE = Path(tempfile.mkdtemp(prefix="bytelm-test-cache-"))
os.environ["BYTELM_CACHE"] = str(CACHE / "bytelm")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE / "torchinductor")


@pytest.fixture(scope="session", autouse=True)
def isolated_caches():
    """The session's cache folder (BYTELM_CACHE and TORCHINDUCTOR_CACHE_DIR below it), removed at the end."""
    yield CACHE
    shutil.rmtree(CACHE, ignore_errors=True)

# In CI the repo is cloned with shared/ beside it: <clone>/../shared.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY_DOCS = {  # corpus order (sorted by path) -> content; each a few KB, so windows of 64 + 1 bytes fit
    "a.txt": b"The quick brown fox jumps over the lazy dog. " * 50,
    "b.txt": b"Bytes are the tokens of a byte-level model. " * 50,
    "sub/c.txt": b"To be, or not to be, that is the question. " * 50,
}


@pytest.fixture
def tiny_corpus_dir(tmp_path) -> Path:
    """A folder of the three TINY_DOCS, plus a hidden file, a hidden folder and an empty file that loading
    skips. With val_fraction 0.05: train = a.txt NUL b.txt NUL most of sub/c.txt, val = the last 5%."""
    root = tmp_path / "corpus"
    for name, content in TINY_DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    (root / ".hidden.txt").write_bytes(b"hidden file")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    (root / "empty.txt").write_bytes(b"")
    return root


@pytest.fixture
def shakespeare_path() -> Path:
    """tinyshakespeare (1.1 MB) from ../shared/data; the test is skipped where it is missing."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path

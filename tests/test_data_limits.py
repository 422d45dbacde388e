"""Hostile data paths and sizes: walks and globs that always end, JSON lines that cannot crash the parser,
damaged parquet pages, and batches refused before they are allocated when the memory is not there. Each is
one DataError line naming the file (and line) or the field, never a hang, a traceback or a MemoryError.

    pytest tests/test_data_limits.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bytelm.data.sources as sources_mod
from bytelm.data.corpus import load_corpus
from bytelm.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (its own limits, killed if it runs on), with the tests' environment."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


# --- walks and globs ---------------------------------------------------------------------------------------

@pytest.fixture
def looped_tree(tmp_path) -> Path:
    """dir/{x.txt, sub/y.txt} with links back up at two levels (`ln -s .. dir/a`): a glob that follows them
    blindly meets 2^depth paths and runs for hours."""
    root = tmp_path / "dir"
    (root / "sub").mkdir(parents=True)
    (root / "x.txt").write_bytes(b"top-level text. " * 20)
    (root / "sub" / "y.txt").write_bytes(b"nested text. " * 20)
    for link in (root / "a", root / "b", root / "sub" / "up"):
        link.symlink_to("..")
    (tmp_path / "outside.txt").write_bytes(b"next to dir, not in it")
    return root


LIST = ("import sys, json\nfrom bytelm.data.sources import list_files\n"
        "print(json.dumps([str(p) for p, _ in list_files(sys.argv[1])]))")


@pytest.mark.parametrize("pattern", ["{root}/**", "{root}/**/*.txt", "{root}", "{root}/*", "{root}/*/**"])
def test_links_back_up_are_followed_no_further_and_the_walk_ends(looped_tree, pattern):
    r = run_python(LIST, pattern.format(root=looped_tree), timeout=60)
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)
    expected = {"{root}/**/*.txt": ["x.txt", "sub/y.txt"], "{root}/*/**": ["sub/y.txt"]}.get(pattern,
                                                                                               ["sub/y.txt", "x.txt"])
    assert sorted(files) == sorted(str(looped_tree / f) for f in expected)


def test_a_folder_linked_twice_is_read_once(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "book.txt").write_bytes(b"a book. " * 100)
    data = tmp_path / "data"
    data.mkdir()
    (data / "first").symlink_to(other)
    (data / "second").symlink_to(other)
    (data / "own.txt").write_bytes(b"own text. " * 100)
    files = [str(p.relative_to(data)) for p, _ in sources_mod.list_files(str(data))]
    assert files == ["first/book.txt", "own.txt"]  # each folder's files once, under the first name found


@pytest.fixture
def deep_tree(tmp_path):
    """Folders nested deeper than Python's recursion limit, a file at each end; removed folder by folder
    afterwards, since shutil.rmtree (and so pytest's cleanup of old temporary folders) recurses."""
    top = tmp_path / "deep"
    chain = [top]
    top.mkdir()
    for _ in range(sys.getrecursionlimit() + 100):
        chain.append(chain[-1] / "d")
        chain[-1].mkdir()  # one at a time: os.makedirs itself recurses
    (chain[-1] / "bottom.txt").write_bytes(b"found at the bottom. " * 10)
    (top / "top.txt").write_bytes(b"found at the top. " * 10)
    yield top
    (chain[-1] / "bottom.txt").unlink()
    (top / "top.txt").unlink()
    for folder in reversed(chain):
        folder.rmdir()


def test_a_tree_deeper_than_the_recursion_limit_is_walked(deep_tree):
    for spec in (str(deep_tree), str(deep_tree / "**" / "*.txt")):
        c = load_corpus(spec)
        assert c.info["files"] == 2 and b"bottom" in (bytes(c.train) + bytes(c.val)), spec


def test_a_walk_past_max_entries_stops_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "MAX_WALK_ENTRIES", 50)
    for i in range(60):
        (tmp_path / f"f{i:02d}.txt").write_bytes(b"x")
    for spec in (str(tmp_path), str(tmp_path / "**" / "*.txt")):
        with pytest.raises(DataError, match="names more than 50 files and folders.*pack documents") as e:
            load_corpus(spec)
        assert "\n" not in str(e.value)


# --- JSON lines and parquet --------------------------------------------------------------------------------

def test_a_jsonl_line_nested_200000_deep_is_one_line_naming_file_and_line(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n")
    with pytest.raises(DataError) as e:
        load_corpus(str(f))
    assert str(e.value) == f"{f}:2: invalid JSON (nested too deeply)"


def test_a_huge_integer_is_valid_json_and_never_called_not_utf8(tmp_path):
    f = tmp_path / "numbers.jsonl"
    f.write_bytes(b'{"text": "first", "n": 1}\n{"text": "second", "id": ' + b"7" * 5000 + b"}\n")
    c = load_corpus(str(f))
    assert bytes(c.train) + bytes(c.val) == b"first\0second"
    f.write_bytes(b'{"text": ' + b"7" * 5000 + b"}\n")
    with pytest.raises(DataError, match=f"{f}:1: field 'text' is int, not text"):
        load_corpus(str(f))


def test_a_parquet_page_damaged_after_a_good_footer_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 50 for i in range(3000)]}), f, compression="snappy",
                   row_group_size=1000)
    data = bytearray(f.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(b ^ 0x5A for b in data[middle:middle + 200])
    f.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{f}: unreadable after row \\d+ \\(") as e:
        load_corpus(str(f))
    assert "\n" not in str(e.value)


# --- batches the machine cannot hold -----------------------------------------------------------------------

LIMITED = """
import resource, sys
import numpy as np
from bytelm.data.batches import BatchSampler, SlidingBatches, eval_batches
from bytelm.errors import DataError
kind, batch_size, seq_len, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = np.zeros(n, dtype=np.uint8)
mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), resource.RLIM_INFINITY))  # 2 GiB more than now
make = {"sampler": lambda: BatchSampler(data, batch_size, seq_len, seed=0).next_batch(),
        "eval": lambda: eval_batches(data, batch_size, seq_len)[0],
        "sliding": lambda: SlidingBatches(data, batch_size, seq_len, seq_len)[0]}[kind]
try:
    x, y = make()
    print("allocated", tuple(x.shape))
except DataError as e:
    print(e)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the process's size from /proc")
@pytest.mark.parametrize("kind, batch_size, seq_len, n", [
    ("sampler", 1_000_000, 1024, 4096),  # the index alone: 8 GiB
    ("sampler", 64, 10_000_000, 10_000_001),  # 5 GiB
    ("eval", 2_000_000, 64, 128 << 20),  # 2 million windows of the 128 MiB split in one batch: 1 GiB each copy
    ("sliding", 2_000_000, 64, 128 << 20),
])
def test_a_batch_the_memory_cannot_hold_is_refused_before_allocating(kind, batch_size, seq_len, n):
    """Under an address-space limit 2 GiB above what the process has mapped: one line naming both fields
    and the memory needed, where cutting the batch would raise MemoryError."""
    r = run_python(LIMITED, kind, str(batch_size), str(seq_len), str(n), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip()
    assert line.startswith(f"a batch of batch_size {batch_size:,} x seq_len {seq_len:,} needs "), line
    assert "GiB of cpu memory, over 50% of the" in line and "RLIMIT_AS" in line and line.endswith("lower batch_size or seq_len")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the process's size from /proc")
def test_a_huge_batch_size_over_a_small_split_costs_only_the_windows_there_are():
    r = run_python(LIMITED, "eval", "1000000000", "64", "1000", timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "allocated (15, 64)", (r.stdout, r.stderr[-2000:])

"""Corpus loading: every source gives the expected bytes and separators, validation holds about val_fraction
of the bytes (whole documents where they fit, the end of the data for the rest), the cache survives damage,
and user mistakes are one clear DataError line. Batches: tests/test_batches.py; hostile paths and sizes:
tests/test_data_limits.py.

    pytest tests/test_data.py
"""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bytelm.data.corpus as corpus_mod
import bytelm.data.hf_stream as hf_mod
from bytelm.config import DOC_SEPARATOR
from bytelm.data.corpus import Corpus, check_size, load_corpus, load_stream
from bytelm.errors import DataError
from bytelm.data.hf_stream import stream_documents
from bytelm.data.split import build, val_target

from conftest import TINY_DOCS

SEP = bytes([DOC_SEPARATOR])


def raw(arr) -> bytes:
    return np.asarray(arr).tobytes()


def pieces(arr) -> list[bytes]:
    return raw(arr).split(SEP) if len(arr) else []


def write_docs(folder, docs, pattern="doc{:03d}.txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / pattern.format(i)).write_bytes(d)
    return folder


def tail_split(docs: list[bytes], val_fraction: float = 0.05) -> tuple[bytes, bytes]:
    """(train, val) when no whole document is held out: the last val_target bytes of the data are validation."""
    keep = sum(map(len, docs)) - val_target(sum(map(len, docs)), val_fraction)
    train, val, at = [], [], 0
    for d in docs:
        cut = min(max(keep - at, 0), len(d))
        train += [d[:cut]] if cut else []
        val += [d[cut:]] if cut < len(d) else []
        at += len(d)
    return SEP.join(train), SEP.join(val)


# --- sources ---------------------------------------------------------------------------------------------

def test_folder_is_recursive_sorted_and_skips_hidden_and_empty_files(tiny_corpus_dir):
    c = load_corpus(str(tiny_corpus_dir))
    docs = [TINY_DOCS[k] for k in ("a.txt", "b.txt", "sub/c.txt")]
    assert (raw(c.train), raw(c.val)) == tail_split(docs)  # three documents: too few for whole ones
    assert raw(c.train).startswith(docs[0] + SEP + docs[1] + SEP + docs[2][:100])
    assert c.train.dtype == np.uint8 and c.train.ndim == 1
    assert c.info["documents"] == 3 and c.info["files"] == 3
    assert (c.info["train_documents"], c.info["val_documents"], c.info["val_whole_documents"]) == (3, 1, 0)
    assert c.info["val_tail_bytes"] == len(c.val) == val_target(sum(map(len, docs)), 0.05)
    assert (c.info["train_bytes"], c.info["val_bytes"]) == (len(c.train), len(c.val))
    json.dumps(c.info)  # plain JSON, goes into checkpoints


def test_info_sha256_is_of_train_then_val(tiny_corpus_dir):
    c = load_corpus(str(tiny_corpus_dir))
    assert c.info["sha256"] == hashlib.sha256(raw(c.train) + raw(c.val)).hexdigest()


def test_single_file_splits_its_bytes_last_fraction_is_validation(tmp_path):
    f = tmp_path / "one.bin"
    content = bytes(range(256)) * 4  # binary is fine: any file is bytes
    f.write_bytes(content)
    c = load_corpus(str(f), val_fraction=0.25)
    assert raw(c.train) == content[:768] and raw(c.val) == content[768:]
    assert c.info["documents"] == 1 and c.info["split"].startswith("bytes")


def test_tinyshakespeare_split_matches_nanogpt(shakespeare_path):
    text = shakespeare_path.read_bytes()
    n = len(text)
    c = load_corpus(str(shakespeare_path), val_fraction=0.1)
    assert raw(c.train) == text[:int(n * 0.9)]  # nanoGPT: train_data = data[:int(n*0.9)]
    assert raw(c.val) == text[int(n * 0.9):]


def test_glob_selects_matching_files_in_sorted_order(tiny_corpus_dir):
    top = load_corpus(str(tiny_corpus_dir / "*.txt"))
    assert (raw(top.train), raw(top.val)) == tail_split([TINY_DOCS["a.txt"], TINY_DOCS["b.txt"]])
    everything = load_corpus(str(tiny_corpus_dir / "**" / "*.txt"))
    assert everything.info["documents"] == 3
    assert raw(everything.val) == raw(load_corpus(str(tiny_corpus_dir)).val)


def test_jsonl_takes_the_text_field_per_line_and_skips_blank_lines(tmp_path):
    lines = [{"text": f"document {i} é", "id": i} for i in range(4)]
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n", encoding="utf-8")
    c = load_corpus(str(f), val_fraction=0.25)
    assert pieces(c.train) == [f"document {i} é".encode() for i in range(3)]
    assert raw(c.val) == "document 3 é".encode()


def test_jsonl_custom_text_field(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"content": f"c{i}", "text": "ignored"}) for i in range(4)))
    c = load_corpus(str(f), val_fraction=0.25, text_field="content")
    assert raw(c.train) == b"c0\0c1\0c2" and raw(c.val) == b"c3"


@pytest.mark.parametrize("line, expected", [
    ('{"text": "fine"', "invalid JSON"),
    ('{"body": "no text field"}', "no 'text' field"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"text": 42}', "not text"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, expected):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=expected) as e:
        load_corpus(str(f))
    assert f"{f}:2:" in str(e.value) and "\n" not in str(e.value)


def test_parquet_takes_a_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(4)], "body": [f"b{i}" for i in range(4)]}), f)
    c = load_corpus(str(f), val_fraction=0.25)
    assert raw(c.train) == b"row 0\0row 1\0row 2" and raw(c.val) == b"row 3"
    assert raw(load_corpus(str(f), val_fraction=0.25, text_field="body").train) == b"b0\0b1\0b2"
    with pytest.raises(DataError, match="no 'missing' column"):
        load_corpus(str(f), text_field="missing")


def test_max_bytes_cuts_the_corpus(tiny_corpus_dir):
    n = len(TINY_DOCS["a.txt"]) + 10
    c = load_corpus(str(tiny_corpus_dir), max_bytes=n)
    assert (raw(c.train), raw(c.val)) == tail_split([TINY_DOCS["a.txt"], TINY_DOCS["b.txt"][:10]])
    assert raw(c.val).endswith(SEP + TINY_DOCS["b.txt"][:10])  # the tail spans the last two documents


def test_large_input_goes_through_a_cached_memmap(tiny_corpus_dir, tmp_path, monkeypatch):
    in_memory = load_corpus(str(tiny_corpus_dir))
    monkeypatch.setattr(corpus_mod, "MEMMAP_THRESHOLD", 100)  # the tiny folder counts as large
    cache = tmp_path / "cache"
    built = load_corpus(str(tiny_corpus_dir), cache_dir=str(cache))
    again = load_corpus(str(tiny_corpus_dir), cache_dir=str(cache))
    for c in (built, again):
        assert isinstance(c.train, np.memmap)
        assert raw(c.train) == raw(in_memory.train) and raw(c.val) == raw(in_memory.val)
        assert c.info["sha256"] == in_memory.info["sha256"]
    assert len([p for p in cache.iterdir() if p.name.startswith("local-")]) == 1  # no leftover temp folders


def test_a_damaged_cache_entry_is_rebuilt(tiny_corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "MEMMAP_THRESHOLD", 100)
    cache = tmp_path / "cache"
    good = load_corpus(str(tiny_corpus_dir), cache_dir=str(cache))
    good_train, good_sha = raw(good.train), good.info["sha256"]
    del good  # a memmap of a file cut short would fault on access
    entry = next(cache.glob("local-*"))
    with open(entry / "train.bin", "r+b") as f:
        f.truncate(100)  # cut short, as by a full disk or a hand
    rebuilt = load_corpus(str(tiny_corpus_dir), cache_dir=str(cache))
    assert raw(rebuilt.train) == good_train and rebuilt.info["sha256"] == good_sha
    (entry / "info.json").write_text("[1, 2]")  # valid JSON, not an entry's info
    assert load_corpus(str(tiny_corpus_dir), cache_dir=str(cache)).info["sha256"] == good_sha
    assert [p.name for p in cache.iterdir()] == [entry.name]


# --- the split: about val_fraction of the bytes ------------------------------------------------------------

def test_validation_holds_out_every_twentieth_whole_document(tmp_path):
    docs = [f"document number {i}\n".encode() * 3 for i in range(60)]
    c = load_corpus(str(write_docs(tmp_path / "d", docs)), val_fraction=0.05)
    assert pieces(c.val) == [docs[19], docs[39], docs[59]]
    assert pieces(c.train) == [d for i, d in enumerate(docs) if i not in (19, 39, 59)]
    assert c.info["split"] == "documents" and c.info["val_tail_bytes"] == 0


@pytest.mark.parametrize("sizes", [(70_000, 120_000), (120_000, 70_000), (120_000, 2_000), (5_000, 900, 30_000)])
def test_few_uneven_documents_hold_out_val_fraction_of_the_bytes(tmp_path, sizes):
    """Two books of 0.7 and 1.2 MB once sent the whole second book (62%) to validation."""
    docs = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    c = load_corpus(str(write_docs(tmp_path / "books", docs)))
    assert (raw(c.train), raw(c.val)) == tail_split(docs)
    total = len(c.train) + len(c.val)
    assert 0.049 < len(c.val) / total < 0.051
    assert f"{len(c.val):,} validation bytes (5.0% held out: the last {len(c.val) - raw(c.val).count(SEP):,} bytes)" \
        in c.summary()


def test_a_huge_document_due_for_validation_goes_to_training(tmp_path):
    """Every 20th document is due, but not one that would make validation most of the data."""
    docs = [b"%03d small document. " % i * 40 for i in range(40)]
    docs[19] = b"one huge document. " * 50_000
    c = load_corpus(str(write_docs(tmp_path / "d", docs)))
    val = pieces(c.val)
    assert docs[19] not in val and docs[20] in val and docs[39] in val
    assert c.info["val_whole_documents"] == 2  # documents 20 and 39; the end of the data made up the rest
    share = len(c.val) / (len(c.train) + len(c.val))
    assert 0.05 <= share < 0.051, share


def tagged_docs(draw_sizes: list[int]) -> list[bytes]:
    """Distinct documents no piece of which equals another: each starts with its own number and a colon."""
    return [b"%d:" % i + b"x" * n for i, n in enumerate(draw_sizes)]


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.one_of(st.integers(0, 60), st.integers(0, 5_000)), min_size=1, max_size=60),
       percent=st.sampled_from([0, 5, 10, 30, 50]))
def test_split_keeps_order_cuts_at_most_one_document_and_holds_out_the_fraction(sizes, percent):
    docs, f = tagged_docs(sizes), percent / 100
    c = build(docs, f, {"source": "test"})
    train, val = pieces(c.train), pieces(c.val)
    ti = vi = 0
    for d in docs:  # walk the documents in order: each is the next train piece, the next val piece, or both
        if ti < len(train) and train[ti] == d:
            ti += 1
        elif vi < len(val) and val[vi] == d:
            vi += 1
        else:  # the one document cut: its head ends training, its tail is in validation
            assert ti == len(train) - 1 and d == train[ti] + val[vi], (d, train[ti:], val[vi:])
            ti, vi = ti + 1, vi + 1
    assert (ti, vi) == (len(train), len(val))
    total = sum(map(len, docs))
    val_bytes = sum(map(len, val))
    assert val_target(total, f) <= val_bytes <= max(val_target(total, f), 1.5 * f * total + 1e-6)
    if percent == 0:
        assert val == []


# --- builtin ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_builds(tmp_path_factory):
    """The builtin corpus built twice, independently: here, and in a subprocess with another hash seed (set
    or dict order leaking into the corpus would show). Concurrent, to halve the wait."""
    other_cache = tmp_path_factory.mktemp("other_cache")
    code = "import sys, bytelm.data.corpus as d; print(d.load_corpus('builtin', cache_dir=sys.argv[1]).info['sha256'])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(other_cache)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONHASHSEED="12345"))
    here = load_corpus("builtin", cache_dir=str(tmp_path_factory.mktemp("cache")))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    return here, out.strip(), other_cache


@pytest.fixture(scope="module")
def builtin(builtin_builds):
    return builtin_builds[0]


def test_builtin_is_deterministic_across_builds_and_the_cache(builtin_builds):
    here, other_sha, other_cache = builtin_builds
    cached = load_corpus("builtin", cache_dir=str(other_cache))  # what the other process cached
    assert other_sha == here.info["sha256"] == cached.info["sha256"]
    assert raw(cached.train) == raw(here.train)


def test_builtin_is_a_few_megabytes_of_english_text(builtin):
    text = raw(builtin.train) + raw(builtin.val)
    assert len(text) > 1_500_000 and builtin.info["documents"] > 300
    assert builtin.info["val_whole_documents"] >= builtin.info["documents"] // 25  # mostly whole documents
    assert 0.049 < len(builtin.val) / len(text) < 0.06
    decoded = text.replace(SEP, b"\n").decode("utf-8")
    assert sum(c.isascii() for c in decoded) / len(decoded) > 0.99
    words = decoded.lower().split()
    for common in ("the", "of", "and", "is", "to", "a"):  # English function words are frequent
        assert words.count(common) > 2000, common
    assert "Return the" in decoded


# --- cosmopedia and HuggingFace streaming ----------------------------------------------------------------

def assert_offline_error(e: DataError, elapsed: float) -> None:
    msg = str(e)
    assert elapsed < 15, f"took {elapsed:.1f} s to fail"
    assert "hub" in msg and "--data builtin" in msg and "--data PATH" in msg and "\n" not in msg


def test_cosmopedia_offline_fails_fast_naming_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_corpus("cosmopedia", cache_dir=str(tmp_path))
    assert_offline_error(e.value, time.perf_counter() - start)
    assert "HF_HUB_OFFLINE" in str(e.value)


def test_cosmopedia_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)

    def no_route(host, port, timeout):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(hf_mod, "_probe", no_route)
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_corpus("cosmopedia", cache_dir=str(tmp_path))
    assert_offline_error(e.value, time.perf_counter() - start)
    assert "huggingface.co:443" in str(e.value)


def test_cosmopedia_without_datasets_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_mod, "have_datasets", lambda: False)
    with pytest.raises(DataError, match=r'pip install "bytelm\[hf\]"'):
        load_corpus("cosmopedia", cache_dir=str(tmp_path))


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("stream")
    texts = [f"streamed document {i}: " + "word " * (i % 7) for i in range(40)]
    pq.write_table(pa.table({"text": texts}), root / "docs.parquet")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
    return root, [t.encode() for t in texts]


def corpus_docs(c: Corpus, texts: list[bytes]) -> list[bytes]:
    """The corpus's documents, the one cut between train and validation (if any) joined again."""
    known = set(texts)
    train, val = pieces(c.train), pieces(c.val)
    cut = [p for p in train if p not in known] + [p for p in val if p not in known]
    return [p for p in train + val if p in known] + ([b"".join(cut)] if cut else [])


@pytest.mark.parametrize("builder, file, field", [("parquet", "docs.parquet", "text"), ("json", "docs.jsonl", "body")])
def test_hf_streaming_shards_documents_between_ranks(stream_files, tmp_path, builder, file, field):
    root, texts = stream_files
    shards = [load_stream(builder, data_files=str(root / file), text_field=field, rank=r, world_size=2,
                          cache_dir=str(tmp_path)) for r in (0, 1)]
    docs = [corpus_docs(c, texts) for c in shards]
    assert not set(docs[0]) & set(docs[1])
    assert sorted(docs[0] + docs[1]) == sorted(texts)
    assert shards[0].info["val_whole_documents"] == 1  # 20 documents per rank: every 20th is held out
    assert isinstance(shards[0].train, np.memmap)
    again = load_stream(builder, data_files=str(root / file), text_field=field, rank=0, world_size=2,
                        cache_dir=str(tmp_path))  # from the cache
    assert again.info["sha256"] == shards[0].info["sha256"]


def test_stream_documents_stops_at_max_bytes_and_reports_missing_fields():
    records = [{"text": "abcd"}] * 10
    assert list(stream_documents(records, max_bytes=10)) == [b"abcd", b"abcd", b"ab"]
    assert list(stream_documents(records[:4], rank=1, world_size=2)) == [b"abcd", b"abcd"]
    with pytest.raises(DataError, match="record 1: no 'text' field"):
        list(stream_documents([{"text": "a"}, {"body": "b"}]))


# --- errors ----------------------------------------------------------------------------------------------

def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files in"):
        load_corpus(str(tmp_path / "empty"))
    (tmp_path / "empty" / "zero.txt").write_bytes(b"")
    with pytest.raises(DataError, match="all 1 files .* are empty"):
        load_corpus(str(tmp_path / "empty"))


def test_nonexistent_path_and_glob_name_the_alternatives(tmp_path):
    with pytest.raises(DataError, match="data path not found: .*--data builtin"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="no files match"):
        load_corpus(str(tmp_path / "*.nothing"))


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    f = write_docs(tmp_path / "d", [b"one", b"two"]) / "doc001.txt"
    f.chmod(0)
    if os.access(f, os.R_OK):  # root reads anything: make the check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(f) else real(p, mode))
    with pytest.raises(DataError, match=f"cannot read {f}: permission denied"):
        load_corpus(str(tmp_path / "d"))


def test_too_little_data_says_how_much_there_is_and_is_needed():
    small = np.zeros(10, dtype=np.uint8)
    check_size(small, 9)  # exactly one window fits
    with pytest.raises(DataError, match="the val split has 10 bytes but .* 12 bytes is needed"):
        check_size(small, 11, "val")
    with pytest.raises(DataError, match="has 0 bytes"):
        check_size(np.zeros(0, dtype=np.uint8), 1, "val")


def test_bad_arguments_are_data_errors(tiny_corpus_dir):
    for kwargs in (dict(val_fraction=1.0), dict(val_fraction=float("nan")), dict(max_bytes=0),
                   dict(rank=2, world_size=2)):
        with pytest.raises(DataError):
            load_corpus(str(tiny_corpus_dir), **kwargs)


def test_caches_in_tests_go_to_a_temporary_folder_subprocesses_included():
    code = ("import os\nfrom bytelm.files import cache_root\n"
            "print(cache_root())\nprint(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    from conftest import CACHE
    assert all(line.startswith(str(CACHE)) for line in out), out
    assert not any(line.startswith(os.path.expanduser("~/.cache")) for line in out)

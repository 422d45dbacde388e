"""Data layer: every source gives the expected bytes and separators, the split is by document, batches are
reproducible and resumable, and user mistakes are one clear DataError line."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bytelm.corpus as data_mod
from bytelm.config import DOC_SEPARATOR
from bytelm.batches import IGNORE, BatchSampler, SlidingBatches, _batch_seed, eval_batches
from bytelm.corpus import Corpus, check_size, load_corpus, load_stream, stream_documents
from bytelm.errors import DataError

from conftest import TINY_DOCS

SEP = bytes([DOC_SEPARATOR])


def raw(arr) -> bytes:
    return np.asarray(arr).tobytes()


def write_docs(folder, docs, pattern="doc{:03d}.txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / pattern.format(i)).write_bytes(d)
    return folder


# --- sources ---------------------------------------------------------------------------------------------

def test_folder_is_recursive_sorted_and_skips_hidden_and_empty_files(tiny_corpus_dir):
    c = load_corpus(str(tiny_corpus_dir))
    assert raw(c.train) == TINY_DOCS["a.txt"] + SEP + TINY_DOCS["b.txt"]
    assert raw(c.val) == TINY_DOCS["sub/c.txt"]  # too few documents for every 20th: the last one is held out
    assert c.train.dtype == np.uint8 and c.train.ndim == 1
    assert c.info["documents"] == 3 and c.info["files"] == 3
    assert (c.info["train_documents"], c.info["val_documents"]) == (2, 1)
    assert (c.info["train_bytes"], c.info["val_bytes"]) == (len(c.train), len(c.val))
    json.dumps(c.info)  # plain JSON, goes into checkpoints


def test_info_sha256_is_of_train_then_val(tiny_corpus_dir):
    import hashlib
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
    assert raw(top.train) == TINY_DOCS["a.txt"] and raw(top.val) == TINY_DOCS["b.txt"]
    everything = load_corpus(str(tiny_corpus_dir / "**" / "*.txt"))
    assert everything.info["documents"] == 3
    assert raw(everything.val) == TINY_DOCS["sub/c.txt"]


def test_jsonl_takes_the_text_field_per_line_and_skips_blank_lines(tmp_path):
    lines = [{"text": f"document {i} é", "id": i} for i in range(4)]
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n", encoding="utf-8")
    c = load_corpus(str(f), val_fraction=0.25)
    assert raw(c.train).split(SEP) == [f"document {i} é".encode() for i in range(3)]
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
    assert raw(c.train) == TINY_DOCS["a.txt"] and raw(c.val) == TINY_DOCS["b.txt"][:10]


def test_large_input_goes_through_a_cached_memmap(tiny_corpus_dir, tmp_path, monkeypatch):
    in_memory = load_corpus(str(tiny_corpus_dir))
    monkeypatch.setattr(data_mod, "MEMMAP_THRESHOLD", 100)  # the tiny folder counts as large
    cache = tmp_path / "cache"
    built = load_corpus(str(tiny_corpus_dir), cache_dir=str(cache))
    again = load_corpus(str(tiny_corpus_dir), cache_dir=str(cache))
    for c in (built, again):
        assert isinstance(c.train, np.memmap)
        assert raw(c.train) == raw(in_memory.train) and raw(c.val) == raw(in_memory.val)
        assert c.info["sha256"] == in_memory.info["sha256"]
    assert len([p for p in cache.iterdir() if p.name.startswith("local-")]) == 1  # no leftover temp folders


# --- the split is by whole documents ---------------------------------------------------------------------

def test_validation_holds_out_every_twentieth_whole_document(tmp_path):
    docs = [f"document number {i}\n".encode() * 3 for i in range(60)]
    c = load_corpus(str(write_docs(tmp_path / "d", docs)), val_fraction=0.05)
    assert raw(c.val).split(SEP) == [docs[19], docs[39], docs[59]]
    assert raw(c.train).split(SEP) == [d for i, d in enumerate(docs) if i not in (19, 39, 59)]


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(st.binary(min_size=1, max_size=20).filter(lambda b: 0 not in b), min_size=2, max_size=80,
                     unique=True),
       percent=st.sampled_from([0, 5, 10, 30, 50]))
def test_split_partitions_documents_whole_and_in_order(docs, percent):
    c = data_mod._build(docs, percent / 100, {"source": "test"})
    train = raw(c.train).split(SEP) if len(c.train) else []
    val = raw(c.val).split(SEP) if len(c.val) else []
    assert sorted(train + val) == sorted(docs)  # every document whole, exactly once
    assert train == [d for d in docs if d in set(train)] and val == [d for d in docs if d in set(val)]
    expected_val = len(docs) * percent // 100  # at least one when held out at all
    assert len(val) == (max(1, expected_val) if percent else 0)


# --- builtin ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_builds(tmp_path_factory):
    """The builtin corpus built twice, independently: here, and in a subprocess with another hash seed (set
    or dict order leaking into the corpus would show). Concurrent, to halve the wait."""
    other_cache = tmp_path_factory.mktemp("other_cache")
    code = "import sys, bytelm.corpus as d; print(d.load_corpus('builtin', cache_dir=sys.argv[1]).info['sha256'])"
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
    assert builtin.info["val_documents"] == builtin.info["documents"] // 20
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

    monkeypatch.setattr(data_mod, "_probe", no_route)
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_corpus("cosmopedia", cache_dir=str(tmp_path))
    assert_offline_error(e.value, time.perf_counter() - start)
    assert "huggingface.co:443" in str(e.value)


def test_cosmopedia_without_datasets_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "_have_datasets", lambda: False)
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


def corpus_docs(c: Corpus) -> list[bytes]:
    return [d for arr in (c.train, c.val) for d in raw(arr).split(SEP) if d]


@pytest.mark.parametrize("builder, file, field", [("parquet", "docs.parquet", "text"), ("json", "docs.jsonl", "body")])
def test_hf_streaming_shards_documents_between_ranks(stream_files, tmp_path, builder, file, field):
    root, texts = stream_files
    shards = [load_stream(builder, data_files=str(root / file), text_field=field, rank=r, world_size=2,
                          cache_dir=str(tmp_path)) for r in (0, 1)]
    docs = [corpus_docs(c) for c in shards]
    assert not set(docs[0]) & set(docs[1])
    assert sorted(docs[0] + docs[1]) == sorted(texts)
    assert shards[0].info["val_documents"] == 1  # 20 documents per rank: every 20th is held out
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


# --- batches ---------------------------------------------------------------------------------------------

DATA = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)


def take(sampler, k):
    return [sampler.next_batch() for _ in range(k)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def test_batches_are_windows_with_targets_shifted_by_one():
    x, y = BatchSampler(DATA, batch_size=8, seq_len=32, seed=0).next_batch()
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x[:, 0] + 1) % 256, y[:, 0])  # DATA counts upwards, so the next byte is +1


def test_sampler_is_reproducible_and_resumes_exactly(tmp_path):
    run = take(BatchSampler(DATA, 4, 16, seed=7), 6)
    assert_same_batches(take(BatchSampler(DATA, 4, 16, seed=7), 6), run)

    first = BatchSampler(DATA, 4, 16, seed=7)
    assert_same_batches(take(first, 3), run[:3])
    torch.save({"sampler": first.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["sampler"]  # plain data only
    resumed = BatchSampler(DATA, 4, 16, seed=123)  # the state brings the seed back
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 3), run[3:])


def test_ranks_draw_different_windows_and_resume_from_rank0_state():
    r0, r1 = BatchSampler(DATA, 4, 16, seed=0, rank=0, world_size=2), BatchSampler(DATA, 4, 16, seed=0, rank=1, world_size=2)
    b0, b1 = take(r0, 2), take(r1, 2)
    assert not torch.equal(b0[0][0], b1[0][0])
    assert not torch.equal(take(BatchSampler(DATA, 4, 16, seed=1), 1)[0][0], b0[0][0])  # seeds differ too
    resumed = BatchSampler(DATA, 4, 16, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(r0.state_dict())  # one checkpoint (rank 0's) restores every rank's own stream
    assert_same_batches(take(resumed, 2), take(r1, 2))


def window_starts(data, batches):
    """Where in `data` each window of (x, y) batches starts (data is random bytes: every 17-byte run is unique)."""
    at = {bytes(data[i:i + 17]): i for i in range(len(data) - 16)}
    assert len(at) == len(data) - 16
    return [at[bytes(torch.cat([x_row, y_row[-1:]]).to(torch.uint8).numpy())]
            for x, y in batches for x_row, y_row in zip(x, y)]


RANDOM_DATA = np.random.default_rng(0).integers(0, 256, 1937, dtype=np.uint8)  # 120 windows of 16 per pass


def test_each_pass_makes_every_byte_a_target_once_in_a_new_order():
    sampler = BatchSampler(RANDOM_DATA, 3, 16, seed=5)
    assert sampler.windows_per_pass == 120
    passes = [window_starts(RANDOM_DATA, take(sampler, 40)) for _ in range(3)]  # 40 x 3 windows: one pass
    for starts in passes:
        offset = min(starts)
        assert 0 <= offset < 16 and sorted(starts) == [offset + 16 * i for i in range(120)]  # tiled, no gaps
    assert len({tuple(p) for p in passes}) == 3  # each pass in its own order (and offset)
    assert len({min(p) for p in passes}) > 1


def test_ranks_share_each_pass_out_between_them():
    r0 = BatchSampler(RANDOM_DATA, 3, 16, seed=5, rank=0, world_size=2)
    r1 = BatchSampler(RANDOM_DATA, 3, 16, seed=5, rank=1, world_size=2)
    s0, s1 = window_starts(RANDOM_DATA, take(r0, 20)), window_starts(RANDOM_DATA, take(r1, 20))
    assert not set(s0) & set(s1)
    offset = min(s0 + s1)
    assert sorted(s0 + s1) == [offset + 16 * i for i in range(120)]  # together, exactly one pass


def test_a_state_saved_before_passes_goes_on_drawing_independent_windows():
    """A resume state from the first sampler (version 1) continues its own stream, as the run began."""
    sampler = BatchSampler(DATA, 4, 16, seed=123)
    sampler.load_state_dict({"version": 1, "seed": 7, "batches": 2, "batch_size": 4, "seq_len": 16})
    x, y = sampler.next_batch()
    gen = torch.Generator().manual_seed(_batch_seed(7, 0, 2))  # what version 1 drew for batch 2
    starts = torch.randint(0, len(DATA) - 16, (4,), generator=gen)
    assert torch.equal(x[:, 0], torch.from_numpy(DATA[starts.numpy()].astype(np.int64)))
    assert sampler.state_dict()["version"] == 1 and sampler.batches == 3
    assert BatchSampler(DATA, 4, 16, seed=0).state_dict()["version"] == 2  # a new run takes passes


def test_eval_batches_are_deterministic_and_cover_the_split():
    data = np.frombuffer(bytes(range(256)) * 3 + b"tail", dtype=np.uint8)  # 772 bytes: 24 windows of 32
    full = eval_batches(data, batch_size=5, seq_len=32)
    assert len(full) == 5 and full[-1][0].shape == (4, 32)  # 24 windows: the last batch has 4
    assert_same_batches(list(full), list(eval_batches(data, 5, 32)))
    xs = torch.cat([x for x, _ in full]).flatten()
    assert raw(data[:768]) == bytes(xs.tolist())  # consecutive, non-overlapping, in order
    assert int(full[-1][1][-1, -1]) == data[768]

    few = eval_batches(data, batch_size=2, seq_len=32, max_batches=2)
    assert len(few) == 2
    starts = [int(x[i, 0]) for x, _ in few for i in range(2)]  # DATA-like bytes: the first byte is the offset
    assert starts == [0, (6 * 32) % 256, (12 * 32) % 256, (18 * 32) % 256]  # spread over the split


@pytest.mark.parametrize("n, seq_len, stride", [(772, 32, 16), (772, 32, 32), (771, 32, 7), (33, 32, 8)])
def test_sliding_batches_score_every_byte_once_with_context(n, seq_len, stride):
    data = np.random.default_rng(n + stride).integers(0, 256, n, dtype=np.uint8)
    batches = SlidingBatches(data, batch_size=3, seq_len=seq_len, stride=stride)
    scored, row = [], 0
    for x, y in batches:
        for i in range(x.shape[0]):
            start = int(batches.starts[row])
            assert bytes(x[i].tolist()) == raw(data[start:start + seq_len])  # the window's bytes
            for p in torch.nonzero(y[i] != IGNORE).flatten().tolist():
                assert int(y[i, p]) == data[start + p + 1]
                assert row == 0 or p + 1 >= seq_len - stride  # at least T - stride bytes of context
                scored.append(start + p + 1)
            row += 1
    assert scored == list(range(1, n))  # each target once, in order, none missed
    with pytest.raises(DataError, match="stride must be"):
        SlidingBatches(data, 3, seq_len, seq_len + 1)
    with pytest.raises(DataError, match="one window"):
        SlidingBatches(data[:seq_len], 3, seq_len, stride)


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
    with pytest.raises(DataError, match="the train split has 10 bytes but .* 17 bytes is needed"):
        BatchSampler(small, 2, 16, seed=0)
    with pytest.raises(DataError, match="the validation split has 10 bytes"):
        eval_batches(small, 2, 16)
    check_size(small, 9)  # exactly one window fits
    with pytest.raises(DataError, match="has 0 bytes"):
        check_size(np.zeros(0, dtype=np.uint8), 1, "val")


def test_bad_arguments_are_data_errors(tiny_corpus_dir):
    for kwargs in (dict(val_fraction=1.0), dict(max_bytes=0), dict(rank=2, world_size=2)):
        with pytest.raises(DataError):
            load_corpus(str(tiny_corpus_dir), **kwargs)
    with pytest.raises(DataError, match="invalid batch sampler state"):
        BatchSampler(DATA, 2, 8, seed=0).load_state_dict({"batches": "3"})

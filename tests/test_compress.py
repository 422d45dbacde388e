"""bytelm.codec.compress, bytelm.codec.container, bytelm.infer.batch_step and `bytelm compress|decompress`.

    .venv/bin/python -m pytest -q tests/test_compress.py
"""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bytelm import ByteLM, ModelConfig, save_checkpoint
from bytelm.infer.batch_step import BatchStep
from bytelm.codec.compress import (PRECISION, compress_bytes, decompress_bytes, model_fingerprint, quantize,
                             read_header, step_rows)
from bytelm.config import MODEL_PRESETS
from bytelm.codec.container import FORMAT_VERSION, MAGIC, ContainerError
from bytelm.codec.score import score_bytes

pytest.importorskip("constriction")


def tiny_model(seed: int = 0, **overrides) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(ModelConfig(**{**MODEL_PRESETS["tiny"], **overrides})).eval()


@pytest.fixture(scope="module")
def model() -> ByteLM:
    return tiny_model()


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread unless a test says otherwise: the results do not depend on it (tested below), and on a
    machine busy with other work a second thread mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


TEXT = b"It was the best of times, it was the worst of times, it was the age of wisdom. " * 40


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)), random_bytes(1000), TEXT],
                         ids=["empty", "one-byte", "every-byte-value", "random", "text"])
def test_round_trip(model, data):
    blob = compress_bytes(model, data)
    assert decompress_bytes(model, blob) == data


def test_round_trip_of_many_contexts_in_several_groups(model):
    data = TEXT + random_bytes(3000, seed=1)  # 6,160 bytes: 97 segments of 64 in 13 groups of at most 8
    blob = compress_bytes(model, data, batch_size=8)
    header = read_header(blob)
    assert header.segments == 97 and header.groups == 13 and header.batch == 8
    assert decompress_bytes(model, blob) == data


def test_random_bytes_cost_about_eight_bits_each(model):
    data = random_bytes(4000, seed=2)
    blob = compress_bytes(model, data)
    header_bytes = len(blob) - 4 * sum(read_header(blob).streams)
    assert len(blob) - header_bytes <= 1.01 * len(data) + 16  # a random model: close to 8 bits per byte
    assert header_bytes < 600


def test_compressed_size_matches_the_models_bits(model):
    """The coder spends what the model's probabilities say: the payload is the sum, over segments, of each
    segment's surprisal (each predicted from its own start), within quantisation and stream endings."""
    data = TEXT[:2000]
    blob = compress_bytes(model, data)
    bits = sum(score_bytes(model, data[i:i + 64]).total_bits for i in range(0, len(data), 64))
    payload_bits = 32 * sum(read_header(blob).streams)
    assert bits * 0.999 <= payload_bits <= bits * 1.001 + 64 * read_header(blob).groups


def test_same_input_gives_identical_output(model):
    assert compress_bytes(model, TEXT) == compress_bytes(model, TEXT)


def test_one_and_two_threads_give_identical_files_and_bytes(model):
    data = random_bytes(1500, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compress_bytes(model, data, batch_size=16)
        torch.set_num_threads(2)
        two = compress_bytes(model, data, batch_size=16)
        assert decompress_bytes(model, one) == data
    finally:
        torch.set_num_threads(before)
    assert one == two


@pytest.mark.parametrize("overrides", [{}, {"value_embeds": True}, {"n_layer": 1, "n_head": 4, "n_embd": 64}])
def test_batch_step_matches_the_models_forward_and_ignores_thread_count(overrides):
    """Every row count the coder uses (step_rows: multiples of 8) gives the same bits with 1, 2 and 3 threads."""
    model = tiny_model(**overrides)
    gen = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    try:
        for segments in (1, 9, 33):
            rows = step_rows(segments)
            data = torch.randint(0, 256, (rows, 24), generator=gen)
            outs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                step = BatchStep(model, rows)
                outs.append(torch.stack([step(data[:, t]) for t in range(24)], 1))  # (B, T, V)
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
            with torch.no_grad():
                reference, _ = model(data)
            torch.testing.assert_close(outs[0], reference, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_row_counts_of_the_step_give_thread_independent_matrix_products():
    """The premise of step_rows, checked on this machine: x @ w.T for every multiple of 8 rows up to 256, at
    the model shapes' widths, has the same bits with 1, 2 and 4 threads."""
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    try:
        for k, n in ((32, 96), (192, 576), (768, 192)):
            w = torch.randn(n, k, generator=gen)
            for rows in range(8, 257, 8):
                x = torch.randn(rows, k, generator=gen)
                results = []
                for threads in (1, 2, 4):
                    torch.set_num_threads(threads)
                    results.append(x @ w.t())
                assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2]), (rows, k, n)
    finally:
        torch.set_num_threads(before)


def test_quantize_keeps_a_quantum_for_every_byte_and_sums_exactly():
    logits = torch.randn(50, 256) * 30  # very peaked rows: most bytes would round to zero
    logits[0] = 0.0
    logits[1, 7] = 1e4
    pmf = quantize(logits)
    counts = pmf.astype(np.int64) + 1
    assert (counts >= 1).all() and (counts.sum(1) == 1 << PRECISION).all()
    assert pmf.dtype == np.float32 and np.array_equal(pmf, quantize(logits.clone()))


def test_an_unexpected_byte_costs_at_most_the_precision_in_bits():
    import constriction
    pmf = quantize(torch.full((1, 256), -1e4).index_fill_(1, torch.tensor([65]), 1e4)).repeat(1000, 0)
    assert pmf[0, 66] == 0  # byte 66 keeps only the free quantum
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(np.full(1000, 66, np.int32), constriction.stream.model.Categorical(perfect=False), pmf)
    assert PRECISION * 1000 <= encoder.num_bits() <= PRECISION * 1000 + 64


def test_refuses_another_model(model):
    blob = compress_bytes(model, TEXT[:500])
    with pytest.raises(ContainerError, match="another model"):
        decompress_bytes(tiny_model(seed=1), blob)


def test_refuses_every_truncation(model):
    data = TEXT[:300]
    blob = compress_bytes(model, data)
    for n in range(len(blob)):
        with pytest.raises(ContainerError, match="truncated|not a bytelm"):
            decompress_bytes(model, blob[:n])


def test_refuses_a_newer_version_and_other_files(model):
    blob = bytearray(compress_bytes(model, b"abc"))
    blob[8:10] = struct.pack("<H", FORMAT_VERSION + 1)
    with pytest.raises(ContainerError, match="version 2: this bytelm reads version 1"):
        decompress_bytes(model, bytes(blob))
    for other in (b"", b"hello", b"\x1f\x8b\x08\x00" + bytes(40), TEXT):
        with pytest.raises(ContainerError, match="not a bytelm compressed file|truncated"):
            decompress_bytes(model, other)


def repack(blob: bytes, **changes) -> bytes:
    """`blob` with header fields changed and both CRCs recomputed: a crafted, well-formed file."""
    header_len = struct.unpack_from("<I", blob, 10)[0]
    fields = json.loads(blob[14:14 + header_len])
    fields.update(changes)
    body = json.dumps(fields).encode()
    head = MAGIC + struct.pack("<HI", FORMAT_VERSION, len(body)) + body
    payload = blob[14 + header_len + 8:]
    return head + struct.pack("<II", zlib.crc32(head), zlib.crc32(payload)) + payload


def test_refuses_crafted_headers_without_allocating(model):
    blob = compress_bytes(model, TEXT[:500])
    header = read_header(blob)
    for changes, why in [({"length": 1 << 60}, "streams in the table"),
                         ({"batch": 4096}, "batch of 4096"),
                         ({"segment_len": 1 << 17}, "batch of 8 for 1 segments"),
                         ({"streams": [1 << 39] * header.groups}, "truncated"),
                         ({"precision": 99}, "precision"),
                         ({"sha256": "zz"}, "SHA-256"),
                         ({"extra": 1}, "fields")]:
        with pytest.raises(ContainerError, match=why):
            decompress_bytes(model, repack(blob, **changes))


def test_checksum_failure_publishes_nothing(model):
    data = TEXT[:500]
    wrong = repack(compress_bytes(model, data), sha256="0" * 64)
    with pytest.raises(ContainerError, match="SHA-256"):
        decompress_bytes(model, wrong)


def test_crafted_payloads_with_valid_crcs_are_refused(model):
    """Garbage that passes both CRCs reaches the range decoder: it must end in one ContainerError (a stream that
    does not decode, or decodes to bytes that fail the SHA-256), never another exception or wrong bytes."""
    data = TEXT[:600]
    blob = compress_bytes(model, data, segment_len=32)
    header_len = struct.unpack_from("<I", blob, 10)[0]
    head, payload = blob[:14 + header_len], blob[14 + header_len + 8:]
    rng = np.random.default_rng(0)
    for i in range(60):
        if i % 3 == 0:
            body = rng.integers(0, 256, len(payload), dtype=np.uint8).tobytes()
        elif i % 3 == 1:
            body = bytearray(payload)
            body[rng.integers(0, len(body))] ^= 1 << int(rng.integers(0, 8))
            body = bytes(body)
        else:
            body = bytes(len(payload)) if i % 2 else b"\xff" * len(payload)
        with pytest.raises(ContainerError, match="damaged|SHA-256"):
            decompress_bytes(model, head + struct.pack("<II", zlib.crc32(head), zlib.crc32(body)) + body)


def test_refuses_another_encoder_setup_unless_asked(model):
    data = TEXT[:200]
    blob = compress_bytes(model, data)
    encoder = dict(read_header(blob).encoder, torch="0.0.1")
    foreign = repack(blob, encoder=encoder)
    with pytest.raises(ContainerError, match="another setup .*torch '0.0.1'"):
        decompress_bytes(model, foreign)
    assert decompress_bytes(model, foreign, any_encoder=True) == data


def test_fingerprint_changes_with_any_weight(model):
    other = tiny_model()
    assert model_fingerprint(other) == model_fingerprint(model)
    with torch.no_grad():
        other.blocks[1].mlp.fc.weight[3, 4] += 1e-6
    assert model_fingerprint(other) != model_fingerprint(model)


FUZZ_DATA = TEXT[:150] + bytes(range(0, 256, 7))


@pytest.fixture(scope="module")
def fuzz_blob(model) -> bytes:
    return compress_bytes(model, FUZZ_DATA, segment_len=32)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_damage_never_tracebacks_or_decodes_wrong(model, fuzz_blob, data):
    blob = bytearray(fuzz_blob)
    kind = data.draw(st.sampled_from(["flip", "flips", "truncate", "byte"]))
    if kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 3)) if kind == "flips" else 1):
            at = data.draw(st.integers(0, len(blob) - 1))
            if kind == "byte":
                blob[at] = data.draw(st.integers(0, 255))
            else:
                blob[at] ^= 1 << data.draw(st.integers(0, 7))
    try:
        out = decompress_bytes(model, bytes(blob))
    except ContainerError as e:
        assert "\n" not in str(e)
        return
    assert out == FUZZ_DATA  # only an unchanged file may decode (a byte set to its own value)


# --- the command line -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("compress") / "tiny.pt"
    save_checkpoint(path, model, model.config)
    return path


def cli(*args, stdin: bytes | None = None, cwd=None, preexec_fn=None, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "bytelm.cli", *map(str, args)], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=120, cwd=cwd, preexec_fn=preexec_fn,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def one_error_line(r) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_files_round_trip_keeping_the_input_and_refusing_to_overwrite(checkpoint, tmp_path):
    src = tmp_path / "notes.txt"
    src.write_bytes(TEXT)
    r = cli("compress", checkpoint, src, "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    assert src.read_bytes() == TEXT and (tmp_path / "notes.txt.blz").is_file()
    assert "bits per byte" in r.stderr.decode()
    assert "already exists" in one_error_line(cli("decompress", checkpoint, tmp_path / "notes.txt.blz"))
    assert "already exists" in one_error_line(cli("compress", checkpoint, src))
    src.unlink()
    assert cli("decompress", checkpoint, tmp_path / "notes.txt.blz").returncode == 0
    assert src.read_bytes() == TEXT
    r = cli("decompress", checkpoint, tmp_path / "notes.txt.blz", "-f", "-q", "--threads", "2")
    assert r.returncode == 0 and r.stderr == b"" and src.read_bytes() == TEXT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "notes.txt.blz"]


def test_cli_stdin_to_stdout_round_trip(checkpoint):
    data = random_bytes(700, seed=5) + TEXT[:700]
    packed = cli("compress", checkpoint, "-", stdin=data)
    assert packed.returncode == 0 and packed.stdout.startswith(MAGIC)
    unpacked = cli("decompress", checkpoint, "-", stdin=packed.stdout)
    assert unpacked.returncode == 0 and unpacked.stdout == data


def test_cli_refusals_are_one_line_and_leave_no_output(checkpoint, tmp_path):
    src = tmp_path / "a.txt"
    src.write_bytes(TEXT[:400])
    assert cli("compress", checkpoint, src, "-o", tmp_path / "a.blz").returncode == 0
    blob = (tmp_path / "a.blz").read_bytes()
    other = tmp_path / "other.pt"
    m = tiny_model(seed=2)
    save_checkpoint(other, m, m.config)
    (tmp_path / "bad.blz").write_bytes(blob[:-3] + bytes([blob[-3] ^ 4]) + blob[-2:])
    (tmp_path / "short.blz").write_bytes(blob[:len(blob) // 2])
    (tmp_path / "wrong.blz").write_bytes(repack(blob, sha256="1" * 64))
    cases = [(("decompress", other, tmp_path / "a.blz"), "another model"),
             (("decompress", checkpoint, tmp_path / "bad.blz"), "damaged"),
             (("decompress", checkpoint, tmp_path / "short.blz"), "truncated"),
             (("decompress", checkpoint, tmp_path / "wrong.blz"), "SHA-256"),
             (("decompress", checkpoint, src, "-o", tmp_path / "x"), "not a bytelm"),
             (("decompress", checkpoint, tmp_path / "missing.blz"), "cannot read"),
             (("decompress", checkpoint, src), "no .blz suffix")]
    for args, why in cases:
        assert why in one_error_line(cli(*args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.blz", "a.txt", "bad.blz", "other.pt", "short.blz",
                                                          "wrong.blz"]


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_cli_full_disk_is_one_line_and_leaves_no_partial_file(checkpoint, tmp_path):
    src = tmp_path / "a.txt"
    src.write_bytes(TEXT)
    assert cli("compress", checkpoint, src).returncode == 0
    (tmp_path / "a.txt").unlink()
    # A file-size limit below the output's size: the write fails as on a full disk (EFBIG).
    r = cli("decompress", checkpoint, tmp_path / "a.txt.blz", preexec_fn=_file_size_limit(1000))
    assert "File too large" in one_error_line(r)
    src.write_bytes(TEXT)
    r = cli("compress", checkpoint, src, "-o", tmp_path / "b.blz", preexec_fn=_file_size_limit(1000))
    assert "cannot write" in one_error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "a.txt.blz"]
    if Path("/dev/full").exists():
        with open("/dev/full", "wb") as full:
            r = cli("decompress", checkpoint, "-", stdin=(tmp_path / "a.txt.blz").read_bytes(), stdout=full)
        assert "No space left" in one_error_line(r)

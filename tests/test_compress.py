"""bytelm.codec.compress, bytelm.codec.container, bytelm.codec.mixer and `bytelm compress|decompress`.

    .venv/bin/python -m pytest -q tests/test_compress.py
"""
from __future__ import annotations

import io
import os
import resource
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bytelm import ByteLM, ModelConfig, save_checkpoint
from bytelm.codec import container
from bytelm.codec.compress import (MAX_RATIO, MIN_RUN, compress_bytes, compress_stream, decompress_bytes,
                                   decompress_stream, read_header)
from bytelm.codec.container import FORMAT_VERSION, MAGIC, ContainerError
from bytelm.codec.mixer import ContextMixer
from bytelm.config import MODEL_PRESETS


def tiny_model(seed: int = 0, **overrides) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(ModelConfig(**{**MODEL_PRESETS["tiny"], **overrides})).eval()


@pytest.fixture(scope="module")
def model() -> ByteLM:
    return tiny_model()


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread unless a test says otherwise: on a machine busy with other work a second one waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


TEXT = b"It was the best of times, it was the worst of times, it was the age of wisdom. " * 40
SMALL_BLOCK = 2 * MIN_RUN + 100  # two rows per full block


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)), random_bytes(1000), TEXT],
                         ids=["empty", "one-byte", "every-byte-value", "random", "text"])
@pytest.mark.parametrize("with_model", [True, False], ids=["model", "no-model"])
def test_round_trip(model, data, with_model):
    m = model if with_model else None
    blob = compress_bytes(m, data)
    assert decompress_bytes(m, blob) == data


@pytest.fixture
def english_model(shakespeare_path) -> ByteLM:
    """The tiny model trained for a few seconds on English: it helps on English the context models have
    not seen yet."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(**MODEL_PRESETS["tiny"]))
    text = torch.from_numpy(np.frombuffer(shakespeare_path.read_bytes()[:200_000], np.uint8).astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(text) - 65, (32,), generator=gen)
        batch = text[starts[:, None] + torch.arange(65)]  # (B, T + 1)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_round_trip_of_several_blocks_and_rows_with_stored_blocks_between(english_model, shakespeare_path):
    english = shakespeare_path.read_bytes()[-3 * SMALL_BLOCK:]
    data = english[:SMALL_BLOCK] + random_bytes(SMALL_BLOCK, seed=1) + english[SMALL_BLOCK:] + b"tail"
    blob = compress_bytes(english_model, data, block_size=SMALL_BLOCK, stride=48)
    kinds = [b.kind for b in blocks_of(blob)]
    assert kinds[0] == container.CODED and container.STORED in kinds and kinds[-1] == container.END
    assert len(blob) < len(compress_bytes(None, data, block_size=SMALL_BLOCK))  # the model helped
    assert decompress_bytes(english_model, blob) == data


def blocks_of(blob: bytes) -> list[container.Block]:
    read = io.BytesIO(blob).read
    header = container.read_header(read)
    out = [container.read_block(read, header, MAX_RATIO)]
    while out[-1].kind != container.END:
        out.append(container.read_block(read, header, MAX_RATIO))
    return out


def test_an_untrained_model_steps_aside_and_the_context_models_carry_the_file(model):
    """The model knows nothing of this text (it is untrained): the file still comes out smaller than zlib's."""
    data = Path(__file__).read_bytes()[:6000]
    blob = compress_bytes(model, data)
    assert len(blob) < len(zlib.compress(data, 9))


def test_the_mixer_learns_to_trust_a_model_that_knows_the_file():
    """A model that puts 90% on the right byte: the coder gets near its 0.47 bits per byte plus the mixer's
    learning, far below what context mixing alone makes of random bytes (8)."""
    data = random_bytes(20000, seed=7)
    rows = 1

    def oracle(data):
        pos = [0]

        def step(prev: np.ndarray) -> np.ndarray:
            counts = np.full((rows, 256), 25, np.uint32)  # 255 x 25 = 6,375 of 65,536: about 10% for the rest
            counts[0, data[pos[0]]] = (1 << 16) - 255 * 25
            pos[0] += 1
            return counts
        return step
    coded = ContextMixer().encode(data, rows, oracle(data))
    assert coded is not None and 8 * len(coded) / len(data) < 0.8
    assert ContextMixer().decode(coded, len(data), rows, oracle(data)) == data


def test_same_input_gives_identical_output_at_any_thread_count(model):
    data = TEXT[:1500] + random_bytes(500, seed=3)
    one = compress_bytes(model, data)
    torch.set_num_threads(2)
    two = compress_bytes(model, data)
    assert one == two and decompress_bytes(model, two) == data


def confident_and_wrong(model: ByteLM) -> ByteLM:
    """The model with its output scaled 100-fold: near-certain of one byte, which random data rarely is."""
    wrong = tiny_model()
    with torch.no_grad():
        wrong.head.weight.mul_(100)
    return wrong


def test_random_bytes_grow_at_most_by_the_stated_bound(model):
    """docs/compression.md: at most 330 bytes + 17 per block over the input, whatever the model says."""
    wrong = confident_and_wrong(model)
    for n in (1, 1000, 3 * SMALL_BLOCK + 7):
        data = random_bytes(n, seed=n)
        blob = compress_bytes(wrong, data, block_size=SMALL_BLOCK)
        assert len(blob) <= n + 330 + 17 * -(-n // SMALL_BLOCK)
        assert decompress_bytes(wrong, blob) == data


def test_api_takes_bytes_like_data_only(model):
    for bad in (10 ** 9, "text", None, [1, 2]):
        with pytest.raises(TypeError, match="data must be bytes-like"):
            compress_bytes(model, bad)
        with pytest.raises(TypeError, match="data must be bytes-like"):
            decompress_bytes(model, bad)
    blob = compress_bytes(None, bytearray(b"abc"))
    assert decompress_bytes(None, memoryview(blob)) == b"abc"


def _peak_python_memory(blocks: int, block: int) -> tuple[int, int]:
    """Peak bytes Python allocates to compress and decompress `blocks` blocks (less the output it keeps)."""
    chunks = (random_bytes(block, seed=i)[:block // 2] + bytes(block // 2) for i in range(blocks))
    out = io.BytesIO()
    tracemalloc.start()
    try:
        compress_stream(None, chunks, out.write, block_size=block)
        peak_c = tracemalloc.get_traced_memory()[1] - len(out.getvalue())
        tracemalloc.reset_peak()
        n = decompress_stream(None, io.BytesIO(out.getvalue()).read, lambda b: None)
        peak_d = tracemalloc.get_traced_memory()[1] - 2 * len(out.getvalue())
    finally:
        tracemalloc.stop()
    assert n == block * blocks
    return peak_c, peak_d


def test_memory_does_not_grow_with_the_input():
    """4 blocks or 16: the same peak, within two blocks (the coder's tables are a fixed 25 MB besides)."""
    block = 1 << 14
    small, large = _peak_python_memory(4, block), _peak_python_memory(16, block)
    assert large[0] - small[0] < 2 * block and large[1] - small[1] < 2 * block


# --- refusals -------------------------------------------------------------------------------------------


def test_refuses_another_model_and_a_file_without_one(model):
    blob = compress_bytes(model, TEXT[:500])
    with pytest.raises(ContainerError, match="another model"):
        decompress_bytes(tiny_model(seed=1), blob)
    with pytest.raises(ContainerError, match="compressed with a model"):
        decompress_bytes(None, blob)


def test_refuses_every_truncation(model):
    blob = compress_bytes(model, TEXT[:300])
    for n in range(len(blob)):
        with pytest.raises(ContainerError, match="truncated|not a bytelm"):
            decompress_bytes(model, blob[:n])


def test_refuses_other_versions_and_other_files(model):
    blob = bytearray(compress_bytes(model, b"abc"))
    blob[8:10] = struct.pack("<H", FORMAT_VERSION + 1)
    with pytest.raises(ContainerError, match=f"version {FORMAT_VERSION + 1}: this bytelm reads version 2"):
        decompress_bytes(model, bytes(blob))
    blob[8:10] = struct.pack("<H", 1)
    with pytest.raises(ContainerError, match="version 1, written by an earlier bytelm"):
        decompress_bytes(model, bytes(blob))
    for other in (b"", b"hello", b"\x1f\x8b\x08\x00" + bytes(40), TEXT):
        with pytest.raises(ContainerError, match="not a bytelm compressed file|truncated"):
            decompress_bytes(model, other)


def repack(blob: bytes, **changes) -> bytes:
    """`blob` with header fields changed and the header's CRC recomputed: a crafted, well-formed file."""
    import json
    header_len = struct.unpack_from("<I", blob, 10)[0]
    fields = json.loads(blob[14:14 + header_len])
    fields.update(changes)
    body = json.dumps(fields).encode()
    head = MAGIC + struct.pack("<HI", FORMAT_VERSION, len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head)) + blob[14 + header_len + 4:]


def test_refuses_crafted_headers_and_other_arithmetic(model):
    blob = compress_bytes(model, TEXT[:500])
    for changes, why in [({"block_size": 1 << 30}, "block_size"), ({"rows": 0}, "rows"),
                         ({"coder": "cm/999"}, "coder cm/999"), ({"step": "bytelm-detstep/999"}, "model step"),
                         ({"stride": 1 << 21}, "stride"), ({"model": None}, "do not agree"),
                         ({"extra": 1}, "fields"), ({"context": 999}, "does not fit this model")]:
        with pytest.raises(ContainerError, match=why):
            decompress_bytes(model, repack(blob, **changes))


def crafted_block(kind: int, raw_len: int, payload: bytes, raw_crc: int = 0) -> bytes:
    head = struct.pack("<BIII", kind, raw_len, len(payload), raw_crc)
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def test_a_claim_its_payload_cannot_hold_is_refused_before_any_work(model):
    """A 4 MB block claimed from 4 bytes of coded data (the decompression bomb of issue 32): refused at once."""
    blob = compress_bytes(model, b"")
    head = blob[:len(blob) - 57]  # the header; the end block is 17 + 40 bytes
    header = read_header(blob)
    for block in (crafted_block(container.CODED, header.block_size, b""),
                  crafted_block(container.CODED, header.block_size, bytes(4)),
                  crafted_block(container.CODED, 100, bytes(100)),
                  crafted_block(container.STORED, 100, bytes(50)),
                  crafted_block(7, 1, b"x")):
        t = time.perf_counter()
        with pytest.raises(ContainerError, match="damaged"):
            decompress_bytes(model, head + block * 1000)
        assert time.perf_counter() - t < 1.0


def test_max_output_stops_a_long_file_before_its_block_is_decoded():
    data = bytes(3 * SMALL_BLOCK)
    blob = compress_bytes(None, data, block_size=SMALL_BLOCK)
    with pytest.raises(ContainerError, match="limit of 10,000 bytes"):
        decompress_bytes(None, blob, max_output=10_000)
    assert decompress_bytes(None, blob, max_output=len(data)) == data
    assert decompress_bytes(None, blob, max_output=None) == data


def test_checksum_failure_and_trailing_data_are_refused():
    blob = compress_bytes(None, TEXT[:500])
    end = crafted_block(container.END, 0, struct.pack("<Q32s", 500, bytes(32)))
    with pytest.raises(ContainerError, match="SHA-256"):
        decompress_bytes(None, blob[:-57] + end)
    with pytest.raises(ContainerError, match="after the end"):
        decompress_bytes(None, blob + b"x")


FUZZ_DATA = TEXT[:150] + bytes(range(0, 256, 7))


@pytest.fixture(scope="module")
def fuzz_blob() -> bytes:
    return compress_bytes(None, FUZZ_DATA)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_damage_never_tracebacks_or_decodes_wrong(fuzz_blob, data):
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
        out = decompress_bytes(None, bytes(blob))
    except ContainerError as e:
        assert "\n" not in str(e)
        return
    assert out == FUZZ_DATA  # only an unchanged file may decode (a byte set to its own value)


def test_crafted_payloads_with_valid_crcs_are_refused():
    """Garbage that passes the CRCs reaches the coder: it must end in one ContainerError, never wrong bytes."""
    blob = compress_bytes(None, TEXT[:3000])
    read = io.BytesIO(blob).read
    header = container.read_header(read)
    head = blob[:len(blob) - len(read())]
    block = blocks_of(blob)[0]
    rng = np.random.default_rng(0)
    for i in range(30):
        body = rng.integers(0, 256, len(block.payload), dtype=np.uint8).tobytes()
        forged = crafted_block(container.CODED, block.raw_len, body, block.raw_crc)
        with pytest.raises(ContainerError, match="damaged|SHA-256"):
            decompress_bytes(None, head + forged + blob[-57:])
    assert header.model is None


# --- the command line -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("compress") / "tiny.pt"
    save_checkpoint(path, model, model.config)
    return path


def cli(*args, stdin=None, cwd=None, preexec_fn=None, stdout=subprocess.PIPE, env=None):
    return subprocess.run([sys.executable, "-m", "bytelm.cli", *map(str, args)], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=120, cwd=cwd, preexec_fn=preexec_fn,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(env or {})})


def one_error_line(r) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_refusals_are_one_line_and_leave_no_output(checkpoint, tmp_path):
    src = tmp_path / "a.txt"
    src.write_bytes(TEXT[:400])
    assert cli("compress", checkpoint, src, "-o", tmp_path / "a.blz").returncode == 0
    blob = (tmp_path / "a.blz").read_bytes()
    other = tmp_path / "other.pt"
    m = tiny_model(seed=2)
    save_checkpoint(other, m, m.config)
    (tmp_path / "bad.blz").write_bytes(blob[:-70] + bytes([blob[-70] ^ 4]) + blob[-69:])
    (tmp_path / "short.blz").write_bytes(blob[:len(blob) // 2])
    cases = [(("decompress", other, tmp_path / "a.blz"), "another model"),
             (("decompress", checkpoint, tmp_path / "bad.blz"), "damaged"),
             (("decompress", checkpoint, tmp_path / "short.blz"), "truncated"),
             (("decompress", checkpoint, tmp_path / "a.blz", "-o", tmp_path / "x", "--max-output", "100"), "limit"),
             (("decompress", checkpoint, src, "-o", tmp_path / "x"), "not a bytelm"),
             (("decompress", checkpoint, tmp_path / "missing.blz"), "cannot read"),
             (("decompress", checkpoint, src), "no .blz suffix")]
    for args, why in cases:
        assert why in one_error_line(cli(*args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.blz", "a.txt", "bad.blz", "other.pt", "short.blz"]


def test_cli_closed_stdout_is_one_line(checkpoint, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc")
    for command in ("compress", "decompress"):
        r = subprocess.run([sys.executable, "-m", "bytelm.cli", command, str(checkpoint), str(tmp_path / "a.txt"),
                            "-o", "-"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                           preexec_fn=lambda: os.close(1))
        assert "standard output is closed" in one_error_line(r)


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
    r = cli("compress", checkpoint, src, "-o", tmp_path / "b.blz", preexec_fn=_file_size_limit(100))
    assert "cannot write" in one_error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "a.txt.blz"]
    if Path("/dev/full").exists():
        with open("/dev/full", "wb") as full:
            r = cli("decompress", checkpoint, "-", stdin=(tmp_path / "a.txt.blz").read_bytes(), stdout=full)
        assert "No space left" in one_error_line(r)


def test_three_builds_of_the_coder_give_identical_files():
    """mix.c is integer arithmetic: -O0, the default -O2 and -O3 -march=native code the same bits, with the model
    input and without."""
    from bytelm.codec.mixer import COMMON_FLAGS
    data = TEXT[:3000] + random_bytes(2000, seed=9) + Path(__file__).read_bytes()[:9000]
    rows = 2

    def model_like(prev: np.ndarray) -> np.ndarray:  # counts from the previous bytes: changing, deterministic
        counts = np.full((rows, 256), 64, np.uint32)
        counts[np.arange(rows), prev] += (1 << 16) - 256 * 64
        return counts
    outputs = []
    for flags in (["-O0", *COMMON_FLAGS], None, ["-O3", "-march=native", *COMMON_FLAGS]):
        outputs.append((ContextMixer(flags=flags).encode(data, rows), ContextMixer(flags=flags).encode(data, rows,
                                                                                                     model_like)))
    assert outputs[0] == outputs[1] == outputs[2] and None not in outputs[0]
    assert ContextMixer(flags=["-O0", *COMMON_FLAGS]).decode(outputs[2][1], len(data), rows, model_like) == data


def test_a_block_the_model_does_not_help_is_coded_by_the_context_models_alone(model):
    """Random bytes repeated: the match model carries them and the model (confident and wrong, or untrained)
    helps nothing, so the block is coded without it (kind 3), as small as context mixing alone, and decodes
    without running the model."""
    data = random_bytes(3000, seed=3) * 3
    for m in (model, confident_and_wrong(model)):
        blob = compress_bytes(m, data)
        assert [b.kind for b in blocks_of(blob)] == [container.MIXED_ALONE, container.END]
        assert decompress_bytes(m, blob) == data
    blob = compress_bytes(model, data)
    assert [b.kind for b in blocks_of(blob)] == [container.MIXED_ALONE, container.END]
    alone = compress_bytes(None, data)
    assert len(blob) - len(alone) <= 100  # the headers differ (the model's fingerprint), the blocks do not
    assert decompress_bytes(model, blob) == data

"""bytelm.codec.score and `bytelm score`: per-byte surprisal, entropy and rank; sliding windows; entropy patches.

    .venv/bin/python -m pytest -q tests/test_score.py
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bytelm import ByteLM, ModelConfig, save_checkpoint
from bytelm.config import MODEL_PRESETS
from bytelm.errors import BytelmError
from bytelm.codec.score import entropy_patches, score_bytes


def random_model(seed: int = 0, **overrides) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(ModelConfig(**{**MODEL_PRESETS["tiny"], **overrides})).eval()


def runs_model() -> ByteLM:
    """A tiny model trained in a few seconds to predict that the next byte repeats the last one."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(**MODEL_PRESETS["tiny"]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    batch = torch.arange(256)[:, None].expand(256, 9)  # (B, T + 1): every byte value, repeated
    for _ in range(20):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> ByteLM:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread mostly waits on a machine busy with other work
    try:
        return runs_model()
    finally:
        torch.set_num_threads(before)


def reference_logp(model: ByteLM, inputs: list[int]) -> torch.Tensor:
    """log p of the byte after `inputs` (at most one context), by a plain forward pass."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([inputs]))
    return torch.log_softmax(logits[0, -1].double(), -1)


def test_scores_match_a_plain_forward_pass_within_one_context():
    model = random_model()
    data = bytes(range(40, 90))
    s = score_bytes(model, data, top_k=5)
    assert len(s) == len(data) == len(s.entropy) == len(s.rank) == len(s.top_bytes)
    for i in (0, 1, 17, len(data) - 1):
        logp = reference_logp(model, [0] + list(data[:i]))  # the first byte is predicted after the separator 0
        assert s.surprisal[i] == pytest.approx(-logp[data[i]].item() / math.log(2), rel=1e-4)
        assert s.entropy[i] == pytest.approx(-(logp.exp() * logp).sum().item() / math.log(2), rel=1e-4)
        assert s.rank[i] == 1 + int((logp > logp[data[i]]).sum())
        assert list(s.top_bytes[i]) == logp.topk(5).indices.tolist()
        np.testing.assert_allclose(s.top_probs[i], logp.topk(5).values.exp().numpy(), rtol=1e-4)


def test_stride_one_predicts_each_byte_from_a_full_context():
    model = random_model()
    data = bytes(np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8))
    s = score_bytes(model, data, stride=1)
    seq = [0] + list(data)
    for i in (64, 100, 199):
        logp = reference_logp(model, seq[i - 63:i + 1])
        assert s.surprisal[i] == pytest.approx(-logp[data[i]].item() / math.log(2), rel=1e-4)


def test_batch_size_does_not_change_scores():
    model = random_model()
    data = bytes(np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8))
    a = score_bytes(model, data, batch_size=1)
    b = score_bytes(model, data, batch_size=64)
    np.testing.assert_allclose(a.surprisal, b.surprisal, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(a.rank, b.rank)


def test_repeated_byte_scores_far_below_random_bytes(trained):
    repeated = score_bytes(trained, b"q" * 2000)
    random = score_bytes(trained, bytes(np.random.default_rng(3).integers(0, 256, 2000, dtype=np.uint8)))
    assert repeated.bits_per_byte < 0.5 < 6 < random.bits_per_byte
    assert np.median(repeated.rank) == 1


def test_empty_input_scores_zero_bits():
    s = score_bytes(random_model(), b"", top_k=3)
    assert len(s) == 0 and s.bits_per_byte == 0.0 and s.top_bytes.shape == (0, 3)


def test_bad_settings_are_one_line_errors():
    model = random_model()
    for kwargs in (dict(stride=0), dict(stride=65), dict(top_k=257), dict(batch_size=0)):
        with pytest.raises(BytelmError):
            score_bytes(model, b"abc", **kwargs)


def test_progress_callback_reaches_the_total():
    seen = []
    score_bytes(random_model(), bytes(300), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (300, 300) and all(b == 300 for _, b in seen)


def test_entropy_patches_global_relative_and_max_len():
    h = np.array([5.0, 1.0, 1.0, 4.0, 0.5, 0.5, 0.5, 0.5, 3.0])
    assert entropy_patches(h, threshold=2.0).tolist() == [0, 3, 8]
    assert entropy_patches(h, relative=1.0).tolist() == [0, 3, 8]
    assert entropy_patches(h, threshold=4.5, relative=1.0).tolist() == [0, 3, 8]
    assert entropy_patches(h, threshold=2.0, max_len=2).tolist() == [0, 2, 3, 5, 7, 8]
    assert entropy_patches(h).tolist() == [0, 3, 8]  # mean entropy (about 1.8) as the threshold
    assert entropy_patches(np.zeros(0)).tolist() == []


def cli(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bytelm.cli", *args], input=stdin, capture_output=True,
                          timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, trained):
    path = tmp_path_factory.mktemp("score") / "runs.pt"
    save_checkpoint(path, trained, trained.config)
    return path


def test_cli_json_reports_each_file_and_the_stdlib_compressors(checkpoint, tmp_path):
    (tmp_path / "same.bin").write_bytes(b"z" * 3000)
    (tmp_path / "noise.bin").write_bytes(bytes(np.random.default_rng(4).integers(0, 256, 3000, dtype=np.uint8)))
    r = cli("score", str(checkpoint), str(tmp_path / "same.bin"), str(tmp_path / "noise.bin"), "--json",
            "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    same, noise = out["files"]
    assert same["bytes"] == noise["bytes"] == 3000
    assert same["bits_per_byte"] < 0.5 < 6 < noise["bits_per_byte"]
    assert set(same["baselines"]) == {"zlib-9", "bz2-9", "lzma-9e"}
    assert out["total"]["bytes"] == 6000
    assert out["total"]["bits_per_byte"] == pytest.approx((same["bits_per_byte"] + noise["bits_per_byte"]) / 2,
                                                          rel=1e-4)


def test_cli_per_byte_jsonl_has_one_row_per_byte_averaging_to_the_summary(checkpoint, tmp_path):
    out_path = tmp_path / "bytes.jsonl"
    data = b"abcabcabc zzzzzzzzzzzzz hello hello"
    r = cli("score", str(checkpoint), "-", "--per-byte", str(out_path), "--top-k", "2", "--patches", "--json",
            stdin=data)
    assert r.returncode == 0, r.stderr.decode()
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(rows) == len(data)
    assert [row["byte"] for row in rows] == list(data)
    assert len(rows[0]["top"]) == 2
    summary = json.loads(r.stdout)["files"][0]
    assert np.mean([row["surprisal"] for row in rows]) == pytest.approx(summary["bits_per_byte"], rel=1e-4)
    assert summary["patches"] == sum(row["patch_start"] for row in rows)
    assert summary["mean_patch_len"] == pytest.approx(len(data) / summary["patches"])


def test_cli_per_byte_npz_holds_the_arrays(checkpoint, tmp_path):
    out_path = tmp_path / "bytes.npz"
    (tmp_path / "in.txt").write_bytes(b"to be or not to be " * 20)
    r = cli("score", str(checkpoint), str(tmp_path / "in.txt"), "--per-byte", str(out_path), "--patches")
    assert r.returncode == 0, r.stderr.decode()
    arrays = np.load(out_path)
    assert arrays["surprisal"].shape == arrays["entropy"].shape == arrays["rank"].shape == (380,)
    assert arrays["patch_starts"][0] == 0
    assert b"bits/byte" in r.stdout


def test_cli_refuses_missing_files_and_bad_flags_in_one_line(checkpoint, tmp_path):
    r = cli("score", str(checkpoint), str(tmp_path / "absent.txt"))
    assert r.returncode == 1 and r.stderr.decode().startswith("error: ") and b"Traceback" not in r.stderr
    r = cli("score", str(checkpoint), "-", "--stride", "100000", stdin=b"abc")
    assert r.returncode == 1 and b"stride" in r.stderr and b"Traceback" not in r.stderr
    r = cli("score", str(checkpoint), "-", "-", stdin=b"abc")
    assert r.returncode != 0 and b"Traceback" not in r.stderr


def test_cli_refuses_a_thread_count_past_the_cpus_and_a_closed_stdin(checkpoint):
    for command in ("score", "compress"):
        r = cli(command, str(checkpoint), "-", "--threads", "100000", stdin=b"abc")
        assert r.returncode == 1 and b"--threads must be between 0 and" in r.stderr, r.stderr
        assert b"Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "bytelm.cli", "score", str(checkpoint), "-"], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert r.returncode == 1 and b"standard input is closed" in r.stderr, r.stderr


def test_score_stream_gives_score_bytes_scores_in_any_chunking():
    from bytelm.codec.score import score_stream
    model = random_model()
    data = bytes(np.random.default_rng(5).integers(0, 256, 700, dtype=np.uint8))
    whole = score_bytes(model, data, stride=24, batch_size=3, top_k=2)
    for size in (1, 50, 64, 1000):
        pieces = list(score_stream(model, (data[i:i + size] for i in range(0, len(data), size)), stride=24,
                                   batch_size=3, top_k=2))
        assert b"".join(p for p, _ in pieces) == data
        np.testing.assert_array_equal(np.concatenate([s.surprisal for _, s in pieces]), whole.surprisal)
        np.testing.assert_array_equal(np.concatenate([s.top_bytes for _, s in pieces]), whole.top_bytes)


def test_api_takes_bytes_like_data_only():
    model = random_model()
    for bad in (10 ** 9, "text", None):
        with pytest.raises(TypeError, match="data must be bytes-like"):
            score_bytes(model, bad)
    assert len(score_bytes(model, memoryview(b"abcd"))) == 4


def test_a_batch_that_cannot_fit_in_memory_is_one_line(checkpoint):
    with pytest.raises(BytelmError, match="memory"):
        score_bytes(random_model(), b"abc", batch_size=10 ** 12)
    r = cli("score", str(checkpoint), "-", "--batch-size", "1000000000000", stdin=b"abc")
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"memory" in r.stderr, r.stderr


def test_cli_closed_stdout_is_one_line(checkpoint):
    r = subprocess.run([sys.executable, "-m", "bytelm.cli", "score", str(checkpoint), "-"], input=b"abc",
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120, preexec_fn=lambda: os.close(1))
    assert r.returncode == 1 and b"standard output is closed" in r.stderr, r.stderr


@pytest.mark.slow
def test_cli_endless_stdin_into_held_scores_is_refused_in_one_line(checkpoint, tmp_path):
    """.npz holds every byte's scores: fed /dev/zero, it stops at the memory limit with one line, no file."""
    with open("/dev/zero", "rb") as zero:
        r = subprocess.run([sys.executable, "-m", "bytelm.cli", "score", str(checkpoint), "-", "--per-byte",
                            str(tmp_path / "s.npz"), "--batch-size", "1", "--threads", "1"], stdin=zero,
                           capture_output=True, timeout=300, env={**os.environ, "BYTELM_MAX_MEMORY": "600K"})
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"per-byte scores held" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_per_byte_jsonl_streams_several_files(checkpoint, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello " * 30)
    (tmp_path / "b.txt").write_bytes(b"world " * 30)
    out_path = tmp_path / "s.jsonl"
    r = cli("score", str(checkpoint), str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--per-byte", str(out_path),
            "--patches", "--patch-threshold", "1.0", "--patch-max-len", "4", "--json")
    assert r.returncode == 0, r.stderr.decode()
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [row["file"] for row in rows] == [str(tmp_path / "a.txt")] * 180 + [str(tmp_path / "b.txt")] * 180
    starts = np.flatnonzero([row["patch_start"] for row in rows[:180]])
    entropy = np.array([row["entropy"] for row in rows[:180]])
    assert starts.tolist() == entropy_patches(entropy, threshold=1.0, max_len=4).tolist()
    out = json.loads(r.stdout)
    assert out["total"]["bytes"] == 360 and out["files"][0]["patches"] == len(starts)

"""bytelm.codec.model_step: the deterministic C step of compression (bytelm/codec/csrc/model_step.c).

    .venv/bin/python -m pytest -q tests/test_model_step.py
"""
from __future__ import annotations

import hashlib
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bytelm import ByteLM, ModelConfig
from bytelm.codec import model_step
from bytelm.codec.model_step import COMMON_FLAGS, COUNT_BITS, DeterministicStep
from bytelm.windows import sliding_windows
from bytelm.config import DOC_SEPARATOR
from bytelm.errors import BytelmError
from bytelm.infer import native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")

CONTEXT, STRIDE = 32, 12  # 200 steps slide the window 14 times


def random_model(seed: int = 0, **overrides) -> ByteLM:
    """A tiny model with value embeddings and weights large enough that its distributions are far from uniform
    (a freshly initialised one predicts nearly uniformly, which would hide errors in the softmax)."""
    torch.manual_seed(seed)
    # head size 42 and widths 84, 252, 336: every vector block and every scalar tail of the C loops runs
    cfg = dict(n_layer=2, n_head=2, n_embd=84, block_size=CONTEXT, value_embeds=True)
    m = ByteLM(ModelConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def model() -> ByteLM:
    return random_model()


def rows_data(rows: int, n: int, seed: int = 1) -> np.ndarray:
    """(rows, n) bytes: text-like runs in some rows and random bytes in others."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, n), dtype=np.uint8)
    text = np.frombuffer(b"To be, or not to be, that is the question. " * (n // 10 + 1), np.uint8)
    data[::2] = text[:n]
    return data


def run(step: DeterministicStep, data: np.ndarray) -> np.ndarray:
    """Counts (rows, n, 256) for each row's bytes, fed as the coder feeds them (the separator first)."""
    prev = np.full(step.rows, DOC_SEPARATOR, np.uint8)
    out = np.empty((step.rows, data.shape[1], 256), np.uint32)
    for t in range(data.shape[1]):
        out[:, t] = step.next(prev)
        prev = data[:, t]
    return out


def test_counts_are_positive_and_sum_to_the_total(model):
    counts = run(DeterministicStep(model, 3, CONTEXT, STRIDE, threads=1), rows_data(3, 60))
    assert counts.dtype == np.uint32 and counts.shape == (3, 60, 256)
    assert counts.min() >= 1
    assert (counts.sum(-1, dtype=np.int64) == 1 << COUNT_BITS).all()


BUILDS = {  # no SIMD past SSE2 and no optimisation; AVX2 with FMA available; the best this machine has
    "O0-sse2": ["-O0", "-mno-sse3", "-mno-ssse3", "-mno-sse4.1", "-mno-sse4.2", "-mno-avx", "-mno-fma",
                *COMMON_FLAGS],
    "O2-avx2-fma": ["-O2", "-mavx2", "-mfma", *COMMON_FLAGS],
    "O3-native": ["-O3", "-march=native", *COMMON_FLAGS],
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the x86-64 builds need an x86-64 CPU")
def test_three_builds_and_any_thread_count_give_identical_counts(model):
    """The promise that a file decodes on any machine: the counts of 200 steps of 5 rows (14 window slides) are
    bitwise the same built without SIMD at -O0, with AVX2 and FMA at -O2 and for this CPU at -O3, at 1 and 3
    threads."""
    from bytelm.device import cpu_flags
    if not {"avx2", "fma"} <= set(cpu_flags()):
        pytest.skip("this CPU has no AVX2 and FMA to run the AVX2 build")
    data = rows_data(5, 200)
    digests = {}
    for name, flags in BUILDS.items():
        for threads in (1, 3):
            counts = run(DeterministicStep(model, 5, CONTEXT, STRIDE, threads=threads, flags=flags), data)
            digests[name, threads] = hashlib.sha256(counts.tobytes()).hexdigest()
    assert len(set(digests.values())) == 1, digests


def test_a_rows_counts_depend_only_on_its_own_bytes(model):
    """Rows reordered, or stepped with other neighbours or alone, give each row the same counts."""
    data = rows_data(4, 80)
    together = run(DeterministicStep(model, 4, CONTEXT, STRIDE, threads=2), data)
    reordered = run(DeterministicStep(model, 4, CONTEXT, STRIDE, threads=1), data[::-1])
    alone = run(DeterministicStep(model, 1, CONTEXT, STRIDE, threads=1), data[2:3])
    assert np.array_equal(together, reordered[::-1])
    assert np.array_equal(together[2:3], alone)


def torch_probs(model: ByteLM, row: np.ndarray, context: int, stride: int) -> np.ndarray:
    """The torch model's probabilities (n, 256) for each byte of row, windows placed by bytelm.windows.sliding_windows."""
    n = len(row)
    inputs = torch.from_numpy(np.concatenate([[DOC_SEPARATOR], row[:-1]]).astype(np.int64))
    out = np.zeros((n, 256))
    with torch.no_grad():
        for start, first in zip(*sliding_windows(n, context, stride)):
            start, first = int(start), int(first)
            logits, _ = model(inputs[start:start + context][None])
            out[first:start + context] = torch.softmax(logits[0].double(), -1).numpy()[first - start:]
    return out


@pytest.mark.parametrize("stride", [STRIDE, CONTEXT])
def test_counts_are_the_torch_models_probabilities_with_scores_windows(model, stride):
    """Same model, same windows: each count is 1 + floor(p * (2^16 - 256)) of torch's probability p to within
    one count (the float rounding of two implementations), except the most likely byte's, which also takes
    what the floors left (at most 256). n is chosen so that score's last window starts a whole stride on."""
    n = CONTEXT + 9 * stride
    data = rows_data(2, n)
    counts = run(DeterministicStep(model, 2, CONTEXT, stride, threads=1), data).astype(np.int64)
    free = (1 << COUNT_BITS) - 256
    for r in range(2):
        p = torch_probs(model, data[r], CONTEXT, stride)
        expected = 1 + np.floor(p * free)
        off = np.abs(counts[r] - expected)
        top = p.argmax(-1)
        assert (counts[r].argmax(-1) == top).all()
        off[np.arange(n), top] = 0
        assert off.max() <= 1, off.max()
        assert (counts[r][np.arange(n), top] - expected[np.arange(n), top]).max() <= 256


def test_a_window_slide_re_encodes_the_kept_bytes(model):
    """After the first slide, the counts are those of a fresh step fed only the kept bytes (the window's
    start), not those of a longer context: the step forgets what score's window does not see."""
    data = rows_data(2, CONTEXT + STRIDE)
    sliding = run(DeterministicStep(model, 2, CONTEXT, STRIDE, threads=1), data)
    kept_from = STRIDE - 1  # window 1 reads inputs [STRIDE, ...): input STRIDE is data[STRIDE - 1]
    fresh = DeterministicStep(model, 2, CONTEXT, STRIDE, threads=1)
    for t in range(kept_from, CONTEXT + STRIDE - 1):
        counts = fresh.next(np.ascontiguousarray(data[:, t]))
    assert np.array_equal(counts, sliding[:, -1])


def test_reset_starts_every_row_over(model):
    step = DeterministicStep(model, 2, CONTEXT, STRIDE, threads=1)
    data = rows_data(2, 50)
    first = run(step, data)
    step.reset()
    assert step.position == 0
    assert np.array_equal(run(step, data), first)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rows=0), "rows must be"), (dict(context=CONTEXT + 1), "context must be"),
    (dict(stride=CONTEXT + 1), "stride must be"), (dict(threads=0), "threads must be"),
    (dict(rows=True), "rows must be")])
def test_bad_settings_are_refused_in_one_line(model, kwargs, message):
    with pytest.raises(BytelmError, match=message):
        DeterministicStep(model, **{"rows": 2, **kwargs})


def test_bad_input_is_refused_and_the_c_step_checks_sizes(model):
    step = DeterministicStep(model, 2, CONTEXT, STRIDE, threads=1)
    for bad in (np.zeros(3, np.uint8), np.zeros(2, np.int64), [0, 0]):
        with pytest.raises(BytelmError, match=r"takes a \(2,\) uint8 array"):
            step.next(bad)
    # the C entry itself refuses buffers that do not fit, before touching memory
    step._keys = step._keys[:-1]
    with pytest.raises(BytelmError, match="a buffer's size does not match"):
        step.next(np.zeros(2, np.uint8))
    step._model.w_fc_size -= 1
    with pytest.raises(BytelmError, match="a weight's size does not match"):
        step.next(np.zeros(2, np.uint8))


def test_no_compiler_is_one_clear_line(model, monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: None)
    with pytest.raises(BytelmError, match="compression needs a C compiler"):
        model_step.load_library(["-O1", *COMMON_FLAGS])  # flags no test built, so nothing is cached


DRIVER = Path(__file__).with_name("model_step_driver.c")


def driver_input(model: ByteLM, data: np.ndarray, stride: int) -> bytes:
    """What tests/model_step_driver.c reads: dimensions, weights in model_step.c's layouts, the rows' inputs."""
    cfg = model.config
    weights = model_step._weights(model)
    head = struct.pack("<10i2fd", cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.mlp_ratio * cfg.n_embd, 256, CONTEXT,
                       int(cfg.value_embeds), data.shape[0], data.shape[1], stride, cfg.norm_eps,
                       float(np.finfo(np.float32).eps), cfg.rope_base)
    inputs = np.concatenate([np.full((data.shape[0], 1), DOC_SEPARATOR, np.uint8), data[:, :-1]], 1)
    return head + b"".join(a.astype("<f4").tobytes() for a in weights.values() if a is not None) + inputs.tobytes()


@pytest.mark.parametrize("target", ["native", "arm64"])
def test_a_stand_alone_build_gives_the_same_counts(model, tmp_path, target):
    """The C step as a program of its own gives the counts the library gives: built for this machine, and, where
    Debian's cross compiler and qemu-user are installed, built for ARM64 (NEON, another libc's startup) and run
    under emulation."""
    flags = [f for f in COMMON_FLAGS if f not in ("-shared", "-fPIC")]
    if target == "native":
        cc, run_with = native.compiler(), []
    else:
        cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
        if not (cc and qemu):
            pytest.skip("no ARM64 cross compiler and qemu-user here (apt-get install gcc-aarch64-linux-gnu qemu-user)")
        run_with = [qemu, "-L", "/usr/aarch64-linux-gnu"]
    exe = tmp_path / f"driver-{target}"
    subprocess.run([cc, "-O2", *flags, str(DRIVER), "-o", str(exe), "-lm"], check=True, capture_output=True,
                   timeout=120)
    data = rows_data(3, 120)
    done = subprocess.run([*run_with, str(exe)], input=driver_input(model, data, STRIDE), capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    theirs = np.frombuffer(done.stdout, "<u4").reshape(120, 3, 256).transpose(1, 0, 2)
    assert np.array_equal(theirs, run(DeterministicStep(model, 3, CONTEXT, STRIDE, threads=1), data))


E2E = r'''
import hashlib, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_model_step import random_model
from bytelm.codec import mixer, model_step
from bytelm.codec.compress import compress_bytes, decompress_bytes
model_step.FLAGS = [*sys.argv[1].split(), *model_step.COMMON_FLAGS]
mixer.FLAGS = [*sys.argv[1].split(), *mixer.COMMON_FLAGS]
model = random_model(block_size=64)
noise = np.random.default_rng(0).integers(0, 256, 1000, np.uint8)
data = b"To be, or not to be, that is the question. " * 60 + bytes(noise)
blob = compress_bytes(model, data)
assert decompress_bytes(model, blob) == data
# the block as coded with the model (compress keeps it only where it is shorter than the mixer alone, which a
# random model never is): the model's counts reach the coder through it
rows = 4
with_model = mixer.ContextMixer().encode(data, rows, model_step.DeterministicStep(model, rows, 64, 48).next)
step = model_step.DeterministicStep(model, rows, 64, 48)
assert mixer.ContextMixer().decode(with_model, len(data), rows, step.next) == data
print(hashlib.sha256(blob).hexdigest(), hashlib.sha256(with_model).hexdigest())
'''


@pytest.mark.slow  # ~36 s on 2 shared cores: three fresh processes, one of them -O0
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the x86-64 builds need an x86-64 CPU")
def test_three_builds_write_the_same_compressed_file(tmp_path):
    """End to end: compress (the model step and the mixer, each built three ways, in fresh processes) writes the
    same bytes, and so does the mixer coding with the model's counts; each build decodes what it wrote."""
    from bytelm.device import cpu_flags
    if not {"avx2", "fma"} <= set(cpu_flags()):
        pytest.skip("this CPU has no AVX2 and FMA to run the AVX2 build")
    digests = set()
    for flags in (BUILDS["O0-sse2"][:7], ["-O2", "-mavx2", "-mfma"], ["-O3", "-march=native"]):
        done = subprocess.run([sys.executable, "-c", E2E, " ".join(flags), str(Path(__file__).parent)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.add(done.stdout.strip())
    assert len(digests) == 1, digests

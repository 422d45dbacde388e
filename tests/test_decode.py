"""The fast one-byte decode step (bytelm/infer/step.py, and its C kernel bytelm/infer/csrc/decode_step.c) against the
reference ByteLM.forward: the same logits and the same cache contents, step after step; the generator's
output unchanged by it; and a clear fallback to torch when the C step can't be built."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bytelm.config import ModelConfig
from bytelm.infer.step import FastDecoder
from bytelm.infer.generation import ByteLevelGenerator
from bytelm.model import ByteLM
from bytelm.infer.native import library, status

REPO = Path(__file__).resolve().parents[1]
HAS_COMPILER = any(shutil.which(c) for c in ("gcc", "cc", "clang"))


def perturbed_model(seed: int = 0, **shape) -> ByteLM:
    """A small model whose norm weights are not all ones, so folding them into the matrices is exercised."""
    torch.manual_seed(seed)
    model = ByteLM(ModelConfig(**{**dict(n_layer=3, n_head=4, n_embd=48, block_size=40), **shape})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def run_both(model: ByteLM, decoder: FastDecoder, prefill: int, steps: int, seed: int = 1):
    """Prefill both caches with the reference, then feed the same bytes one at a time to each path.
    Returns the largest logit difference and the two caches."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 256, (1, prefill + steps), generator=g)
    ref_cache, fast_cache = model.new_cache(), model.new_cache()
    worst = 0.0
    with torch.inference_mode():
        model(seq[:, :prefill], cache=ref_cache)
        model(seq[:, :prefill], cache=fast_cache)
        for t in range(prefill, prefill + steps):
            want = model(seq[:, t:t + 1], cache=ref_cache, last_only=True)[0].view(-1)
            got = decoder.step(seq[0, t], fast_cache)
            assert got.shape == (256,)
            worst = max(worst, (want - got).abs().max().item())
    return worst, ref_cache, fast_cache


@pytest.mark.parametrize("native", [False, True], ids=["torch", "C"])
def test_fast_step_matches_reference_to_the_last_position(native):
    model = perturbed_model()
    decoder = FastDecoder(model, native=native)
    if native and HAS_COMPILER:
        assert decoder.native, status()  # a machine with a compiler must get the C step
    worst, ref, fast = run_both(model, decoder, prefill=5, steps=35)  # fills the 40-byte context exactly
    assert worst < 1e-4
    assert ref.pos == fast.pos == 40
    torch.testing.assert_close(fast.k, ref.k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.v, ref.v, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="room"):
        decoder.step(torch.tensor(65), fast)  # the context is full: the caller must slide first


@pytest.mark.parametrize("native", [False, True], ids=["torch", "C"])
def test_fast_step_other_shapes(native):
    """Odd widths (rows not a multiple of 4, heads of size 2) and one layer, from the first position on."""
    model = perturbed_model(seed=3, n_layer=1, n_head=5, n_embd=10, block_size=12, mlp_ratio=3)
    worst, _, _ = run_both(model, FastDecoder(model, native=native), prefill=1, steps=11)
    assert worst < 1e-4


@pytest.mark.parametrize("native", [False, True], ids=["torch", "C"])
def test_fast_step_with_value_embeddings(native):
    """Each layer adds its row of the byte's value table to the values it caches (ModelConfig.value_embeds)."""
    model = perturbed_model(seed=5, value_embeds=True)
    decoder = FastDecoder(model, native=native)
    assert decoder.native == (native and HAS_COMPILER)
    worst, ref, fast = run_both(model, decoder, prefill=3, steps=30)
    assert worst < 1e-4
    torch.testing.assert_close(fast.v, ref.v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [dict(n_head=4, n_embd=96, block_size=45), dict(n_head=2, n_embd=80, block_size=21),
                                   dict(n_head=1, n_embd=16, block_size=19)], ids=["D24", "D40", "D16"])
def test_fast_step_head_sizes_of_the_vector_attention(shape):
    """Head sizes that are a multiple of 8 take the C step's AVX2 attention (eight positions' scores at a time,
    32 columns of the output per pass over the values): full and partial blocks of positions and of columns."""
    model = perturbed_model(seed=4, n_layer=2, **shape)
    worst, ref, fast = run_both(model, FastDecoder(model, native=True), prefill=1, steps=shape["block_size"] - 1)
    assert worst < 1e-4
    torch.testing.assert_close(fast.k, ref.k, atol=1e-5, rtol=1e-4)


HALF = HAS_COMPILER and library() is not None and bool(library().bytelm_half_supported())


@pytest.mark.skipif(not HALF, reason="this build of the C step has no half-precision weights (no F16C)")
@pytest.mark.parametrize("shape", [{}, dict(n_layer=1, n_head=5, n_embd=10, block_size=12, mlp_ratio=3)],
                         ids=["default", "odd"])
def test_half_weights_step_stays_close_to_the_reference(shape):
    """The default C step reads fp16 copies of the weights: logits within 1e-2 of the reference (fp16 keeps 11
    significant bits) at every position, the same most likely byte, and the cache close to the reference's."""
    model = perturbed_model(seed=5, **shape)
    decoder = FastDecoder(model, half=True)
    assert decoder.native and decoder.half
    steps = model.config.block_size - 2
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, 256, (1, steps + 2), generator=g)
    ref_cache, fast_cache = model.new_cache(), model.new_cache()
    with torch.inference_mode():
        model(seq[:, :2], cache=ref_cache)
        model(seq[:, :2], cache=fast_cache)
        for t in range(2, steps + 2):
            want = model(seq[:, t:t + 1], cache=ref_cache, last_only=True)[0].view(-1)
            got = decoder.step(seq[0, t], fast_cache)
            assert (want - got).abs().max().item() < 1e-2
            assert got.argmax() == want.argmax()
    torch.testing.assert_close(fast_cache.v, ref_cache.v, atol=1e-2, rtol=1e-2)
    gen = ByteLevelGenerator(model)  # the default generator uses it
    assert len(gen.generate_bytes(b"hi", max_new_bytes=30, stop_at_separator=False)) == 30
    assert gen.last_stats["step"] == "C, fp16 weights"


def prefilled_caches(model: ByteLM, decoder: FastDecoder, lengths: list[int], seed: int) -> list:
    """One cache per row, fed lengths[i] random bytes by the single step, so the rows sit at different positions."""
    g = torch.Generator().manual_seed(seed)
    caches = []
    for n in lengths:
        cache = model.new_cache()
        for b in torch.randint(0, 256, (n,), generator=g).tolist():
            decoder.step(b, cache)
        caches.append(cache)
    return caches


def copy_cache(cache):
    twin = type(cache).__new__(type(cache))
    twin.k, twin.v, twin.max_len, twin.pos = cache.k.clone(), cache.v.clone(), cache.max_len, cache.pos
    return twin


BATCH_SHAPES = {"D16": dict(n_layer=2, n_head=4, n_embd=64, block_size=24),
                "odd": dict(n_layer=1, n_head=5, n_embd=10, block_size=16, mlp_ratio=3)}


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
@pytest.mark.parametrize("value_embeds", [False, True], ids=["plain", "value-embeds"])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", BATCH_SHAPES.values(), ids=BATCH_SHAPES.keys())
def test_batched_step_gives_every_row_its_single_step_logits_bitwise(shape, half, value_embeds):
    """A generation's bytes must not depend on who else is served: each row of a batched step (rows at different
    positions, in any order, 1 to 9 of them, joining and leaving) gets exactly the logits and cache contents
    the single step gives it alone. "odd" has columns and weight rows that are not multiples of 8."""
    if half and not HALF:
        pytest.skip("this build of the C step has no half-precision weights (no F16C)")
    model = perturbed_model(seed=6, value_embeds=value_embeds, **shape)
    decoder = FastDecoder(model, half=half)
    assert decoder.native and decoder.half == half
    room = model.config.block_size - 4
    g = torch.Generator().manual_seed(7)
    for n in (1, 3, 8, 9):
        alone = prefilled_caches(model, decoder, [(5 * i + n) % room for i in range(n)], seed=n)
        batched = [copy_cache(c) for c in alone]
        for step in range(4):
            # a random order, and on the last step only some rows: rows join and leave between steps
            order = torch.randperm(n, generator=g).tolist()[:n if step < 3 else max(1, n // 2)]
            bytes_ = torch.randint(0, 256, (len(order),), generator=g).tolist()
            got = decoder.step_rows(bytes_, [batched[i] for i in order])
            assert got.shape == (len(order), 256)
            for row, (i, b) in enumerate(zip(order, bytes_)):
                want = decoder.step(b, alone[i])
                assert torch.equal(got[row], want), (n, step, i)
        for a, b in zip(alone, batched):
            assert a.pos == b.pos and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_batched_step_refuses_a_full_cache_and_mismatched_rows():
    model = perturbed_model(block_size=8)
    decoder = FastDecoder(model)
    full, fresh = prefilled_caches(model, decoder, [8, 0], seed=1)
    with pytest.raises(ValueError, match="room"):
        decoder.step_rows([65, 66], [fresh, full])
    assert fresh.pos == 0  # nothing was stepped
    with pytest.raises(ValueError, match="one byte per cache"):
        decoder.step_rows([65], [fresh, fresh])
    with pytest.raises(ValueError, match="the same cache twice"):
        decoder.step_rows([65, 66], [fresh, fresh])  # each row would overwrite the other's keys
    other = ByteLM(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=8)).new_cache()  # another model's
    with pytest.raises(ValueError, match="row 1: k_cache holds"):
        decoder.step_rows([65, 66], [fresh, other])  # refused by the C step's own checks
    assert fresh.pos == other.pos == 0


def test_batched_step_without_the_c_step_steps_rows_one_by_one():
    model = perturbed_model(block_size=8)
    decoder = FastDecoder(model, native=False)
    caches = prefilled_caches(model, decoder, [2, 5], seed=1)
    twins = [copy_cache(c) for c in caches]
    got = decoder.step_rows([1, 2], caches)
    torch.testing.assert_close(got, torch.stack([decoder.step(1, twins[0]), decoder.step(2, twins[1])]))
    assert [c.pos for c in caches] == [3, 6]


def test_generator_output_is_unchanged_by_the_exact_fast_step():
    """Greedy and sampled text, long enough to slide the window twice, is the same byte for byte."""
    model = perturbed_model(block_size=32)
    fast, ref = ByteLevelGenerator(model, decode_step="exact"), ByteLevelGenerator(model, decode_step="reference")
    for settings in (dict(temperature=0), dict(temperature=0.9, top_k=40, top_p=0.95, seed=7)):
        settings = dict(settings, max_new_bytes=80, stop_at_separator=False)
        assert fast.generate_bytes(b"Once upon a time", **settings) == \
            ref.generate_bytes(b"Once upon a time", **settings)
        assert fast.last_stats["slides"] >= 2
    assert ref.last_stats["step"] == "reference"
    assert fast.last_stats["step"] == ("C" if HAS_COMPILER else "torch")


def test_weights_changed_between_generations_are_seen():
    """The decoder copies the weights, so the generator builds it per generation, never stale."""
    model = perturbed_model(block_size=32)
    gen = ByteLevelGenerator(model)
    before = gen.generate_bytes(b"abc", temperature=0, max_new_bytes=20, stop_at_separator=False)
    with torch.no_grad():
        model.head.weight.mul_(-1)  # tied with the embedding: changes every prediction
    after = gen.generate_bytes(b"abc", temperature=0, max_new_bytes=20, stop_at_separator=False)
    fresh = ByteLevelGenerator(model)  # built after the change
    assert after == fresh.generate_bytes(b"abc", temperature=0, max_new_bytes=20, stop_at_separator=False)
    assert after != before


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_kernel_is_built_once_and_cached(tmp_path):
    assert library() is not None, status()
    code = ("from bytelm.infer.native import library, status; library(); print(status())")
    env = dict(os.environ, BYTELM_CACHE=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert first.stdout.startswith("compiled: "), first.stdout + first.stderr
    assert second.stdout.startswith("loaded from cache: "), second.stdout + second.stderr
    assert [p.name for p in (tmp_path / "native").iterdir() if p.name.startswith(".")] == []  # no temporaries


@pytest.mark.parametrize("env, expect", [
    (dict(BYTELM_NATIVE="0"), "off (BYTELM_NATIVE=0)"),
    (dict(CC="false"), "the C library is unavailable"),  # a "compiler" that fails
], ids=["disabled", "compiler-fails"])
def test_without_the_kernel_generation_falls_back_to_torch(tmp_path, env, expect):
    code = ("import torch\n"
            "from bytelm.config import ModelConfig\nfrom bytelm.model import ByteLM\n"
            "from bytelm.infer.generation import ByteLevelGenerator\nfrom bytelm.infer.native import status\n"
            "torch.manual_seed(0)\n"
            "g = ByteLevelGenerator(ByteLM(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)))\n"
            "out = g.generate_bytes(b'hi', temperature=0, max_new_bytes=30, stop_at_separator=False)\n"
            "print(len(out), g.last_stats['step'], status(), sep='|')\n")
    env = dict(os.environ, BYTELM_CACHE=str(tmp_path), **env)
    if "CC" in env and not shutil.which(env["CC"]):
        pytest.skip("no `false` program to stand in for a broken compiler")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    length, step, state = done.stdout.strip().split("|")
    assert (length, step) == ("30", "torch")
    assert state.startswith(expect)
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not HAS_COMPILER or not hasattr(os, "getuid"), reason="needs a C compiler and POSIX owners")
def test_a_cached_library_others_can_write_is_never_loaded(tmp_path):
    """Loading a library runs its code: one that another user could have replaced is refused, and generation
    still works through the torch step."""
    code = ("import torch\nfrom bytelm.infer.native import library, status\n"
            "print(library() is not None, status(), sep='|')\n")
    env = dict(os.environ, BYTELM_CACHE=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert first.stdout.startswith("True|compiled"), first.stdout + first.stderr
    (lib,) = (tmp_path / "native").glob("decode_step-*.so")
    lib.chmod(0o777)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    loaded, state = second.stdout.strip().split("|")
    assert loaded == "False" and "writable by other users" in state, second.stdout + second.stderr

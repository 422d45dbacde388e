"""The C library's cache and entry points (bytelm/infer/native.py, bytelm/infer/csrc/): wrong calls from Python are refused
with a clear ValueError before any memory is touched; a damaged cached library is rebuilt instead of crashing
every command; the cache's folders must be this user's; a failed build says so on stderr once; and commands
that generate nothing never load native code. Everything that could crash runs in a subprocess, with its own
cache folder."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bytelm.checkpoint import save_checkpoint
from bytelm.config import ModelConfig
from bytelm.model import ByteLM

REPO = Path(__file__).resolve().parents[1]
HAS_COMPILER = any(shutil.which(c) for c in ("gcc", "cc", "clang"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
POSIX_OWNERS = hasattr(os, "getuid")


def run(code: str, cache: Path, **env) -> subprocess.CompletedProcess:
    """Run Python `code` in a fresh process with its own native cache; returns the finished process."""
    full_env = {k: v for k, v in os.environ.items() if k != "BYTELM_NATIVE"}
    full_env.update(BYTELM_CACHE=str(cache), **env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def bytelm_cli(args: list[str], cache: Path, **env) -> subprocess.CompletedProcess:
    return run(f"import sys\nfrom bytelm.cli import main\nsys.exit(main({args!r}))", cache, **env)


def crashed(done: subprocess.CompletedProcess) -> bool:
    return done.returncode < 0  # killed by a signal: SIGSEGV, SIGBUS, SIGABRT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32))
    path = tmp_path_factory.mktemp("native_ckpt") / "tiny.pt"
    save_checkpoint(path, model, model.config)
    return path


@pytest.fixture(scope="module")
def template_cache(tmp_path_factory) -> Path:
    """A cache with the library built once (in a subprocess), for the tests to copy."""
    cache = tmp_path_factory.mktemp("native_template")
    done = run("from bytelm.infer import native\nassert native.library() is not None, native.status()", cache)
    assert done.returncode == 0, done.stderr
    return cache


def built_library(template: Path, cache: Path) -> Path:
    """A copy of the template's cache at `cache` (modes kept); returns the library's path there."""
    shutil.copytree(template, cache, dirs_exist_ok=True)
    (lib,) = (cache / "native").glob("decode_step-*.so")
    return lib


# -- wrong calls are refused, never a crash -------------------------------------------------------------------

WRONG_CALLS = r'''
import ctypes, torch
from bytelm.config import ModelConfig
from bytelm.infer.step import FastDecoder
from bytelm.model import ByteLM, KVCache
from bytelm.infer.native import DecodeRow, DecodeStep, library
from bytelm.infer.sampling import CSampler, SamplingSettings

torch.manual_seed(0)
model = ByteLM(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8)).eval()
other = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=8)

def attempt(name, fn):
    try:
        fn()
        print(name, "|accepted")
    except ValueError as e:
        print(name, "|ValueError:", e)

def step(pos=0, byte=65, cache=None, **fields):
    decoder = FastDecoder(model)
    assert decoder.native
    for k, v in fields.items():
        setattr(decoder._args, k, v)
    cache = cache or model.new_cache()
    cache.pos = pos
    return decoder.step(byte, cache)

def raw_step(pos, byte, cache, **fields):
    """The C entry point itself, past FastDecoder's own checks."""
    decoder = FastDecoder(model)
    args = decoder._args
    args.max_len = cache.k.size(3)
    args.set_buffers(k_cache=cache.k, v_cache=cache.v)
    for k, v in fields.items():
        setattr(args, k, v)
    if decoder._kernel(decoder._args_ref, pos, byte):
        raise ValueError(args.error.decode())

def raw_rows(caches, n=None, row1=None, null_rows=False, **fields):
    """bytelm_decode_rows itself, past FastDecoder.step_rows' own checks. row1: fields to set on row 1 (its
    logits: row 0's); fields: of the DecodeStep (its scratch: row 0's k_cache)."""
    decoder = FastDecoder(model)
    rows = (DecodeRow * max(len(caches), n or 0))()
    logits = torch.empty(len(rows), 256)
    for i, cache in enumerate(caches):
        r = rows[i]
        r.byte, r.pos, r.max_len = 65, cache.pos, cache.k.size(3)
        r.k_cache, r.k_cache_size, r.v_cache, r.v_cache_size = cache.k.data_ptr(), cache.k.numel(), \
            cache.v.data_ptr(), cache.v.numel()
        r.logits, r.logits_size = logits[i].data_ptr(), 256
    for k, v in (row1 or {}).items():
        setattr(rows[1], k, rows[0].logits if k == "logits" else v)
    _, scratch, _ = decoder._batch_buffers(len(rows), 8)
    args = decoder._args
    args.scratch, args.scratch_size = scratch.data_ptr(), scratch.numel()
    for k, v in fields.items():
        setattr(args, k, rows[0].k_cache if k == "scratch" else v)
    if decoder._rows_kernel(decoder._args_ref, None if null_rows else rows, len(caches) if n is None else n):
        raise ValueError(args.error.decode())

def two():
    return [model.new_cache(), model.new_cache()]


with torch.inference_mode():
    attempt("ok", lambda: step())
    attempt("rows-ok", lambda: raw_rows(two()))
    attempt("rows-zero", lambda: raw_rows(two(), n=0))
    attempt("rows-too-many", lambda: raw_rows(two(), n=library().bytelm_decode_max_rows() + 1))
    attempt("rows-null", lambda: raw_rows(two(), null_rows=True))
    attempt("rows-same-cache", lambda: raw_rows([model.new_cache()] * 2))
    attempt("rows-same-logits", lambda: raw_rows(two(), row1=dict(logits=None)))  # None: row 0's logits
    attempt("rows-pos-past-cache", lambda: raw_rows([model.new_cache(), KVCache(model.config, 1, max_len=4)],
                                                    row1=dict(pos=5)))
    attempt("rows-byte-256", lambda: raw_rows(two(), row1=dict(byte=256)))
    attempt("rows-max-len-lies", lambda: raw_rows([model.new_cache(), KVCache(model.config, 1, max_len=4)],
                                                  row1=dict(max_len=8)))
    attempt("rows-max-len-zero", lambda: raw_rows(two(), row1=dict(max_len=0)))
    attempt("rows-logits-short", lambda: raw_rows(two(), row1=dict(logits_size=255)))
    attempt("rows-scratch-short", lambda: raw_rows(two(), scratch_size=10))
    attempt("rows-scratch-on-a-cache", lambda: raw_rows(two(), scratch=None))  # None: row 0's k_cache
    attempt("step-rows-byte-huge", lambda: FastDecoder(model).step_rows([2 ** 32 + 65], [model.new_cache()]))
    attempt("step-rows-other-model", lambda: FastDecoder(model).step_rows([65, 65], [model.new_cache(),
                                                                                     KVCache(other, 1)]))
    attempt("c-pos-past-cache", lambda: raw_step(5, 65, KVCache(model.config, 1, max_len=4)))
    attempt("c-pos-negative", lambda: raw_step(-1, 65, model.new_cache()))
    attempt("c-byte-256", lambda: raw_step(0, 256, model.new_cache()))
    attempt("c-max-len-lies", lambda: raw_step(0, 65, KVCache(model.config, 1, max_len=4), max_len=8))
    attempt("pos-past-context", lambda: step(pos=8))
    attempt("pos-negative", lambda: step(pos=-1))
    attempt("pos-huge", lambda: step(pos=2 ** 32 + 1))
    attempt("byte-256", lambda: step(byte=256))
    attempt("byte-negative", lambda: step(byte=-1))
    attempt("byte-huge", lambda: step(byte=2 ** 32 + 65))
    attempt("cache-of-another-model", lambda: step(cache=KVCache(other, 1)))
    attempt("weights-short", lambda: step(w_qkv_size=16 * 16))
    attempt("embed-null", lambda: step(embed=None))
    attempt("layers-zero", lambda: step(n_layer=0))
    attempt("heads-inconsistent", lambda: step(H=3))
    attempt("half-flag-bad", lambda: step(half=2))
    attempt("scratch-short", lambda: step(scratch_size=10))
    attempt("rope-short", lambda: step(rope_len=4, pos=6))
    attempt("logits-short", lambda: step(logits_size=255))
    sampler = CSampler.create(SamplingSettings(temperature=1.0))
    attempt("sampler-ok", lambda: sampler(torch.randn(256), 0, 0, torch.Generator()))
    attempt("sampler-fp64", lambda: sampler(torch.randn(256, dtype=torch.float64), 0, 0, None))
    attempt("sampler-300-logits", lambda: sampler(torch.randn(300), 0, 0, None))
    attempt("sampler-recent-null", lambda: sampler(torch.randn(256), 0, 5, None))
    attempt("sampler-negative-temperature", lambda: CSampler.create(SamplingSettings(temperature=-1.0))(
        torch.randn(256), 0, 0, None))
    lib = library()
    print("raw-sample-u-1 |", lib.bytelm_sample(torch.randn(256).data_ptr(), 256, None, 0, 1.0, 1.0, 0, 1.0, 0.0, 1.0))
    print("raw-step-null |", lib.bytelm_decode_step(None, 0, 0))
    print("raw-rows-null |", lib.bytelm_decode_rows(None, None, 1))
    print("struct-size |", lib.bytelm_decode_step_size() == ctypes.sizeof(DecodeStep))
    print("row-struct-size |", lib.bytelm_decode_row_size() == ctypes.sizeof(DecodeRow))
'''


@needs_compiler
def test_wrong_shapes_positions_and_bytes_raise_a_clear_value_error(tmp_path):
    done = run(WRONG_CALLS, tmp_path)
    assert not crashed(done) and done.returncode == 0, done.stdout + done.stderr
    results = dict(line.split(" |", 1) for line in done.stdout.splitlines())
    assert results.pop("ok") == "accepted"
    assert results.pop("sampler-ok") == "accepted"
    assert results.pop("raw-sample-u-1").strip() == "-4"
    assert results.pop("raw-step-null").strip() == "1"
    assert results.pop("raw-rows-null").strip() == "1"
    assert results.pop("struct-size").strip() == "True"
    assert results.pop("row-struct-size").strip() == "True"
    assert results.pop("rows-ok") == "accepted"
    expected = {  # what each refusal must name
        "pos-past-context": "room", "pos-negative": "room", "pos-huge": "room",
        "byte-256": "byte 256", "byte-negative": "byte -1", "byte-huge": "byte 4294967361",
        "cache-of-another-model": "k_cache holds", "c-pos-past-cache": "position 5 is outside the cache (4",
        "c-pos-negative": "position -1", "c-byte-256": "byte 256 is outside 0..255",
        "c-max-len-lies": "k_cache holds 128 elements where the dimensions need 256",
        "weights-short": "w_qkv holds 256 elements", "embed-null": "embed is NULL",
        "layers-zero": "dimensions must be positive", "heads-inconsistent": "heads of even size",
        "half-flag-bad": "half-precision", "scratch-short": "scratch holds 10", "rope-short": "rope_cos holds",
        "logits-short": "logits holds 255", "sampler-fp64": "float32", "sampler-300-logits": "1 to 256",
        "sampler-recent-null": "recent bytes are missing", "sampler-negative-temperature": "out of range",
        # the batched step (bytelm_decode_rows): each refusal names the row
        "rows-zero": "the rows must be 1 to 256, not 0", "rows-too-many": "not 257", "rows-null": "(NULL)",
        "rows-same-cache": "_cache overlaps row 1's ",
        "rows-same-logits": "row 0's logits overlaps row 1's logits",
        "rows-pos-past-cache": "row 1: position 5 is outside the cache (4",
        "rows-byte-256": "row 1: byte 256 is outside 0..255",
        "rows-max-len-lies": "row 1: k_cache holds 128 elements where the dimensions need 256",
        "rows-max-len-zero": "row 1: max_len must be positive", "rows-logits-short": "row 1: logits holds 255",
        "rows-scratch-short": "scratch holds 10", "rows-scratch-on-a-cache": "the scratch overlaps row",
        "step-rows-byte-huge": "byte 4294967361", "step-rows-other-model": "row 1: k_cache holds",
    }
    for name, needle in expected.items():
        assert results[name].startswith("ValueError:") and needle in results[name], (name, results[name])


# -- a damaged cache (issue 25, class 2) ----------------------------------------------------------------------

@needs_compiler
def test_a_library_cut_short_is_rebuilt_and_no_command_crashes(tmp_path, checkpoint, template_cache):
    """A cached library truncated (a crash or a full disk while it was written) made every command, even
    `bytelm info`, die with SIGBUS. Now `info` never loads it, and a generation finds the damage by its
    checksum, says so in one line, rebuilds it and generates."""
    lib = built_library(template_cache, tmp_path)
    data = lib.read_bytes()
    lib.write_bytes(data[:len(data) // 3])
    info = bytelm_cli(["info", str(checkpoint)], tmp_path)
    assert not crashed(info) and info.returncode == 0, info.stderr
    assert lib.stat().st_size < len(data)  # `info` did not touch the library
    gen = bytelm_cli(["generate", str(checkpoint), "-p", "Hi", "-n", "12", "--temp", "0", "--ignore-eos", "-v"],
                     tmp_path)
    assert not crashed(gen) and gen.returncode == 0, gen.stderr
    assert "damaged" in gen.stderr and "rebuilding" in gen.stderr
    assert [line for line in gen.stderr.splitlines() if "damaged" in line] == [gen.stderr.splitlines()[0]]
    assert "decode step C" in gen.stderr  # the rebuilt library runs the generation
    rebuilt = lib.read_bytes()
    assert hashlib.sha256(rebuilt).hexdigest() == lib.with_name(lib.name + ".sha256").read_text().strip()
    again = run("from bytelm.infer import native\nnative.library()\nprint(native.status())", tmp_path)
    assert again.stdout.startswith("loaded from cache: "), again.stdout + again.stderr
    assert again.stderr == ""


@needs_compiler
@pytest.mark.parametrize("damage", ["flipped-byte", "no-record", "empty"])
def test_other_damage_is_rebuilt(tmp_path, damage, template_cache):
    lib = built_library(template_cache, tmp_path)
    record = lib.with_name(lib.name + ".sha256")
    if damage == "flipped-byte":
        data = bytearray(lib.read_bytes())
        data[len(data) // 2] ^= 0xFF
        lib.write_bytes(bytes(data))
    elif damage == "no-record":
        record.unlink()
    else:
        lib.write_bytes(b"")
    done = run("from bytelm.infer import native\nprint(native.library() is not None, native.status(), sep='|')", tmp_path)
    assert not crashed(done) and done.returncode == 0, done.stderr
    assert done.stdout.startswith("True|compiled: "), done.stdout + done.stderr
    assert hashlib.sha256(lib.read_bytes()).hexdigest() == record.read_text().strip()


@needs_compiler
def test_the_build_leaves_only_the_library_and_its_record(template_cache):
    (lib,) = (template_cache / "native").glob("decode_step-*.so")
    assert sorted(p.name for p in lib.parent.iterdir()) == [lib.name, lib.name + ".sha256"]
    if POSIX_OWNERS:
        assert lib.parent.stat().st_mode & 0o077 == 0  # the folder is this user's alone


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_import_and_info_load_no_native_code(tmp_path, checkpoint):
    """`import bytelm` and `bytelm info` neither build nor map the C library: they need none of it."""
    code = ("import bytelm\nfrom bytelm.cli import main\n"
            f"assert main(['info', {str(checkpoint)!r}]) == 0\n"
            "maps = open('/proc/self/maps').read()\n"
            "print('MAPPED' if 'decode_step-' in maps else 'NOT MAPPED')\n")
    done = run(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("NOT MAPPED")
    assert not (tmp_path / "native").exists()  # nothing was compiled


# -- who may have written the cache ---------------------------------------------------------------------------

@needs_compiler
@pytest.mark.skipif(not POSIX_OWNERS, reason="needs POSIX owners and modes")
def test_a_cache_under_a_folder_others_can_write_is_refused(tmp_path):
    """Another user who can write to a folder above the cache could swap the folders below it, so the library
    is not loaded from there (one line says why); a sticky folder such as /tmp is fine."""
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    code = "from bytelm.infer import native\nprint(native.library() is not None, native.status(), sep='|')"
    done = run(code, open_folder / "cache")
    assert done.returncode == 0, done.stderr
    loaded, state = done.stdout.strip().split("|")
    assert loaded == "False" and "writable by other users and not sticky" in state
    assert len(done.stderr.strip().splitlines()) == 1 and "writable by other users" in done.stderr
    open_folder.chmod(0o1777)
    done = run(code, open_folder / "cache")
    assert done.stdout.startswith("True|compiled: "), done.stdout + done.stderr


@needs_compiler
@pytest.mark.skipif(not POSIX_OWNERS or os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_cache_folder_of_another_user_is_refused(tmp_path, template_cache):
    lib = built_library(template_cache, tmp_path / "cache")
    os.chown(lib.parent.parent, 12345, 12345)  # the cache root now belongs to someone else
    done = run("from bytelm.infer import native\nprint(native.library() is not None, native.status(), sep='|')",
               tmp_path / "cache")
    assert done.stdout.startswith("False|") and "belongs to another user" in done.stdout, done.stdout + done.stderr


# -- a failed build is visible, once; no compiler and BYTELM_NATIVE=0 are quiet -------------------------------

GENERATE_TWICE = ("import torch\nfrom bytelm.config import ModelConfig\nfrom bytelm.model import ByteLM\n"
                  "from bytelm.infer.generation import ByteLevelGenerator\nfrom bytelm.infer import native\n"
                  "torch.manual_seed(0)\n"
                  "g = ByteLevelGenerator(ByteLM(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)))\n"
                  "for _ in range(2):\n"
                  "    out = g.generate_bytes(b'hi', temperature=0, max_new_bytes=20, stop_at_separator=False)\n"
                  "print(len(out), g.last_stats['step'], native.status(), sep='|')\n")


@pytest.mark.skipif(not POSIX_OWNERS, reason="needs a POSIX shell script as the compiler")
def test_a_failing_compiler_is_reported_once_on_stderr(tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'internal compiler error: out of cheese' >&2\nexit 1\n")
    broken.chmod(0o755)
    done = run(GENERATE_TWICE, tmp_path / "cache", CC=str(broken))
    assert done.returncode == 0, done.stderr
    length, step, state = done.stdout.strip().split("|")
    assert (length, step) == ("20", "torch")
    assert "out of cheese" in state
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bytelm: warning: the C library is unavailable"), done.stderr
    assert "out of cheese" in lines[0]


@pytest.mark.parametrize("setting", ["BYTELM_NATIVE=0", "no compiler"])
def test_no_compiler_or_native_off_is_quiet(tmp_path, setting):
    env = dict(BYTELM_NATIVE="0") if setting == "BYTELM_NATIVE=0" else dict(PATH=str(tmp_path), CC="")
    done = run(GENERATE_TWICE, tmp_path / "cache", **env)
    assert done.returncode == 0, done.stderr
    length, step, state = done.stdout.strip().split("|")
    assert (length, step) == ("20", "torch")
    assert state.startswith("off (BYTELM_NATIVE=0)" if env.get("BYTELM_NATIVE") else "no C compiler found")
    assert done.stderr == ""


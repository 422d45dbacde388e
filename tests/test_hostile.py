"""Hostile input on the generation side (issue 25): allocation bombs, weights the code did not expect, flags and
streams, terminal escapes. Each case gets one clear line and a non-zero exit, or works; never a traceback.

    pytest tests/test_hostile.py

Memory cases run the real command in a subprocess under an address-space limit (RLIMIT_AS) of what the
process has mapped plus a little, so an allocation the input did not justify fails the test instead of
passing on a machine that happens to have the memory. Terminal cases read the output through a real
pseudo-terminal.
"""
import os
import pty
import select
import signal
import subprocess
import sys
import time
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bytelm.checkpoint import FORMAT_VERSION, save_checkpoint
from bytelm.cli.generate import main as generate_main
from bytelm.cli.terminal import visible
from bytelm.config import ModelConfig
from bytelm.cli.run import run_cli
from bytelm.errors import BytelmError
from bytelm.infer.generation import DECODE_STEPS, ByteLevelGenerator, InferenceConfig
from bytelm.model import ByteLM
from bytelm.infer.native import library
from tiny import TINY, save_tiny_checkpoint, tiny_model

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30

# Runs a bytelm command with the address space capped at what is mapped after the imports plus argv[1] bytes.
LIMITED = """
import resource, sys
import torch
from bytelm.cli import main
with open('/proc/self/statm') as f:
    mapped = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


def bytelm(*args, extra: int | None = None, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    """`bytelm ARGS` in a fresh process (under the memory cap `extra` if given), output as bytes."""
    argv = ([sys.executable, "-c", LIMITED, str(extra)] if extra is not None
            else [sys.executable, "-m", "bytelm.cli"]) + [str(a) for a in args]
    popen.setdefault("capture_output", "stdout" not in popen and "stderr" not in popen)
    return subprocess.run(argv, cwd=REPO, timeout=timeout, **popen)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    err = r.stderr.decode(errors="replace")
    assert r.returncode not in (0, None), err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


# --- class 1: allocation bombs ----------------------------------------------------------------------------------

def expanded(path: Path, config: ModelConfig) -> Path:
    """A checkpoint of a few KB whose weights have every shape `config` needs, each a stride-0 view of one number."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ByteLM(config).state_dict().items()}
    torch.save({"format": "bytelm", "version": FORMAT_VERSION, "model_config": config.to_dict(),
                "model": {k: torch.zeros(1).expand(s) for k, s in shapes.items()}}, path)
    return path


def test_a_tiny_file_asking_for_huge_rotary_tables_allocates_nothing(tmp_path):
    """The rotary tables of this config are 3 x 4 GiB; they used to be built before the weights were checked."""
    path = expanded(tmp_path / "rope.pt", ModelConfig(n_layer=1, n_head=1, n_embd=16384, block_size=1 << 17))
    assert path.stat().st_size < 10_000
    r = bytelm("generate", path, "-p", "hi", "-n", "2", extra=GiB)
    assert_one_line_error(r, "bytes of data, but the config needs")


def test_rotary_tables_and_weights_past_the_limit_are_refused_by_name(tmp_path):
    config = ModelConfig(n_layer=1, n_head=1, n_embd=256, block_size=1 << 17)  # 201 MB of rotary tables
    path = tmp_path / "long.pt"
    save_checkpoint(path, ByteLM(config), config)
    r = bytelm("info", path, env={**os.environ, "BYTELM_MAX_MEMORY": "150M"})
    assert_one_line_error(r, "rotary tables (block_size 131072 x head_dim 256): 192.0 MiB", "BYTELM_MAX_MEMORY")


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory) -> Path:
    """6 MB on disk (fp16 weights); its full KV cache is 4 GiB: 2 x 64 layers x 131,072 positions x 64 x 4 bytes."""
    config = ModelConfig(n_layer=64, n_head=1, n_embd=64, block_size=1 << 17)
    path = tmp_path_factory.mktemp("long") / "long.pt"
    save_checkpoint(path, ByteLM(config).half(), config)
    return path


def test_a_kv_cache_that_cannot_fit_is_refused_before_allocating(long_context_checkpoint):
    r = bytelm("generate", long_context_checkpoint, "-p", "hi", "-n", 200_000, "--no-stop-at-separator",
               extra=3 * GiB // 2)
    assert_one_line_error(r, "KV cache (n_layer 64 x block_size 131072 x n_embd 64, keys and values): 4.0 GiB")


def test_a_short_generation_allocates_a_cache_for_what_it_uses(long_context_checkpoint):
    r = bytelm("generate", long_context_checkpoint, "-p", "hi", "-n", 5, "--temp", 0, "--no-stop-at-separator",
               extra=3 * GiB // 2)
    assert r.returncode == 0 and len(r.stdout) >= 5, r.stderr.decode()[-2000:]


def test_a_prompt_from_an_endless_device_is_refused_with_one_line(checkpoint):
    r = bytelm("generate", checkpoint, "-f", "/dev/zero", "-n", 2, extra=GiB, timeout=60)
    assert_one_line_error(r, "/dev/zero gave more than 64 MiB")


def test_a_huge_prompt_file_is_read_from_its_tail_only(checkpoint, tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:  # 3 GiB, sparse: no disk space, but reading it all needs 3 GiB of memory
        f.truncate(3 * GiB)
        f.seek(3 * GiB - 4)
        f.write(b"end.")
    r = bytelm("generate", checkpoint, "-f", path, "-n", 3, "--temp", 0, "--no-stop-at-separator", extra=GiB)
    assert r.returncode == 0 and len(r.stdout) >= 3, r.stderr.decode()[-2000:]
    assert b"the model sees the last 63" in r.stderr


def test_chat_refuses_an_endless_line_on_stdin(checkpoint):
    with open("/dev/zero", "rb") as zero:
        r = bytelm("chat", checkpoint, "-n", 2, extra=GiB, stdin=zero, capture_output=True, timeout=60)
    assert_one_line_error(r, "line 1 of standard input is longer than 64 MiB")


# --- class 3: weights the code did not expect -------------------------------------------------------------------

def save_with(path: Path, change) -> Path:
    model = tiny_model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    change(state)
    torch.save({"format": "bytelm", "version": FORMAT_VERSION, "model_config": TINY.to_dict(), "model": state}, path)
    return path


def _sparse(state):
    state["blocks.0.mlp.fc.weight"] = state["blocks.0.mlp.fc.weight"].to_sparse()


def _csr(state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
        state["blocks.1.attn.qkv.weight"] = state["blocks.1.attn.qkv.weight"].to_sparse_csr()


def _nan(state):
    state["blocks.0.mlp.fc.weight"][0, 0] = float("nan")


def _inf(state):
    state["norm_f.weight"][3] = float("-inf")


def _beyond_fp32(state):  # finite in float64, infinite once loaded into the fp32 model
    state["blocks.0.attn.proj.weight"] = state["blocks.0.attn.proj.weight"].double()
    state["blocks.0.attn.proj.weight"][5, 5] = 1e300


@pytest.mark.parametrize("change, message", [
    (_sparse, "blocks.0.mlp.fc.weight is stored as a sparse_coo tensor"),
    (_csr, "blocks.1.attn.qkv.weight is stored as a sparse_csr tensor"),
    (_nan, "blocks.0.mlp.fc.weight holds NaN or infinite values"),
    (_inf, "norm_f.weight holds NaN or infinite values"),
    (_beyond_fp32, "blocks.0.attn.proj.weight holds NaN or infinite values"),
], ids=["sparse-coo", "sparse-csr", "nan", "inf", "beyond-fp32"])
def test_weights_the_code_does_not_expect_are_refused_at_load_on_every_path(tmp_path, change, message):
    path = save_with(tmp_path / "odd.pt", change)
    for env in ({}, {"BYTELM_NATIVE": "0"}):  # the C step, and the torch step it falls back to
        r = bytelm("generate", path, "-p", "hi", "-n", 5, env={**os.environ, **env})
        assert_one_line_error(r, message)


def scaled(name_part: str, scale: float) -> ByteLM:
    model = tiny_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name_part in name:
                p.mul_(scale)
    return model


def outcome(model: ByteLM, step: str, **settings) -> bytes | str:
    gen = ByteLevelGenerator(model, InferenceConfig(max_new_bytes=60, stop_at_separator=False, **settings),
                             decode_step=step)
    try:
        return gen.generate_bytes("Hello")
    except BytelmError as e:
        return f"error: {e}"


@pytest.mark.parametrize("name_part, scale", [
    ("mlp.fc", 1e15),  # activations overflow inside RMSNorm: scores of zeros
    ("mlp.fc", 1e20),  # relu^2 overflows: the scores are not numbers
    ("blocks.1", -1e30),
    ("head", 1e37),  # finite, enormous scores
    ("embed", 1e30),
    ("attn.qkv", 1e5),
], ids=["fc-1e15", "fc-1e20", "block-minus-1e30", "head-1e37", "embed-1e30", "qkv-1e5"])
def test_torch_and_c_steps_agree_on_extreme_weights(name_part, scale):
    """Every fp32 step (the torch step, the C step, ByteLM.forward) gives the same bytes, or the same one-line
    error; the default fp16 step has the same outcome (its rounding may pick other bytes). The torch step's
    draw used to return byte 256 from NaN scores (an IndexError)."""
    model = scaled(name_part, scale)
    steps = DECODE_STEPS if library() is not None else ("torch", "reference")
    for sampling in (dict(temperature=0), dict(seed=1)):
        got = {step: outcome(model, step, **sampling) for step in steps}
        fp32 = {step: v for step, v in got.items() if step != "auto"}
        assert len(set(fp32.values())) == 1, got
        if "auto" in got:
            assert type(got["auto"]) is type(got["torch"]) and len(got["auto"]) == len(got["torch"]), got


def test_the_torch_step_without_the_c_library_stops_with_one_line_on_overflow(tmp_path):
    path = tmp_path / "huge.pt"
    model = scaled("mlp.fc", 1e20)
    save_checkpoint(path, model, TINY)
    r = bytelm("generate", path, "-p", "hi", "-n", 5, env={**os.environ, "BYTELM_NATIVE": "0"})
    assert_one_line_error(r, "next-byte scores are not finite numbers")


# --- class 6: flags and streams ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--threads", "0"], "--threads must be between 1 and"),
    (["--threads", "100000"], "--threads must be between 1 and"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--device", "xla"], "device 'xla' is not supported"),
    (["--device", "mps"], "no MPS"),
    (["--device", "cpu:1"], "one CPU device"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--device", "nonsense"], "unknown device"),
    (["--seed", "-5"], "seed must be a whole number from 0 to 2**64-1"),
    (["--seed", str(2 ** 64)], "seed must be a whole number from 0 to 2**64-1"),
])
def test_out_of_range_runtime_flags_are_one_line(checkpoint, capsys, flags, message):
    if "mps" in flags and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert run_cli(generate_main, [str(checkpoint), "-p", "hi", "-n", "2", *flags]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("seed", ["1e5", "nan", "lots"])
def test_a_seed_that_is_not_a_number_is_a_usage_error(checkpoint, capsys, seed):
    with pytest.raises(SystemExit) as e:
        run_cli(generate_main, [str(checkpoint), "--seed", seed])
    assert e.value.code == 2 and "seed must be a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "-p", "hi", "-n", "50"], ["info"], ["chat", "-n", "20"]],
                         ids=["generate", "info", "chat"])
def test_output_to_a_full_disk_is_one_line_and_exit_1(checkpoint, command):
    with open("/dev/full", "wb") as full:
        r = bytelm(command[0], checkpoint, *command[1:], input=b"hello\n", stdout=full, stderr=subprocess.PIPE)
    assert_one_line_error(r, "No space left on device")


def _close(fd: int):
    return lambda: os.close(fd)


@pytest.mark.parametrize("command, closed, message", [
    (["generate", "-p", "hi"], 1, "standard output is closed"),
    (["info"], 1, "standard output is closed"),
    (["chat"], 0, "standard input is closed"),
    (["generate", "-f", "-"], 0, "standard input is closed"),
], ids=["generate-stdout", "info-stdout", "chat-stdin", "generate-file-stdin"])
def test_a_closed_stdout_or_stdin_is_one_line(checkpoint, command, closed, message):
    r = bytelm(command[0], checkpoint, *command[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
               stderr=subprocess.PIPE, preexec_fn=_close(closed))
    assert_one_line_error(r, message)


def test_a_reader_that_leaves_early_ends_the_generation_quietly(checkpoint):
    p = subprocess.Popen([sys.executable, "-m", "bytelm.cli", "generate", str(checkpoint), "-n", "100000",
                          "--no-stop-at-separator"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(10)
    p.stdout.close()  # like `| head -c 10`
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == "", err


def test_interactive_chat_with_stdout_on_a_full_disk_is_one_line(checkpoint):
    pid, fd = pty.fork()  # stdin and stderr on the terminal, stdout to /dev/full
    if pid == 0:
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, 1)
            os.chdir(REPO)
            os.execv(sys.executable, [sys.executable, "inference.py", str(checkpoint)])
        finally:
            os._exit(127)
    out = read_terminal(fd, pid)
    assert "Traceback" not in out and "error: cannot write the output: No space left on device" in out, out


# --- class 8: terminal safety -----------------------------------------------------------------------------------

TITLE = b"\x1b]0;pwned\x07"  # the escape sequence that sets a terminal's title


@pytest.fixture(scope="module")
def escaping_checkpoint(tmp_path_factory) -> Path:
    """A model whose greedy continuation of any byte of TITLE is the next byte of TITLE, cyclically: every
    byte is embedded as its own one-hot vector, the blocks add nothing, and the head maps b to its successor."""
    config = ModelConfig(n_layer=1, n_head=2, n_embd=256, block_size=64, tie_embeddings=False)
    model = ByteLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight.copy_(torch.eye(256))
        for norm in (model.blocks[0].norm1, model.blocks[0].norm2, model.norm_f):
            norm.weight.fill_(1.0)
        for i, b in enumerate(TITLE):
            model.head.weight[TITLE[(i + 1) % len(TITLE)], b] = 10.0
    path = tmp_path_factory.mktemp("escape") / "escape.pt"
    train_state = {"step": 7, "metrics": {"val_bpb\x1b[2J": 1.5}, "data_info": "corpus " + TITLE.decode()}
    save_checkpoint(path, model, config, train_state=train_state)
    return path


def read_terminal(fd: int, pid: int, send: bytes = b"", after: bytes = b"", timeout: float = 120) -> str:
    """Everything the child writes to its terminal until it exits; `send` is typed once `after` has appeared."""
    data, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if send and after in data:
                os.write(fd, send)
                send = b""
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child has closed the terminal
                    break
                if not chunk:
                    break
                data += chunk
            elif os.waitpid(pid, os.WNOHANG)[0]:
                break
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"still running; output: {data[-600:]!r}")
    finally:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        os.close(fd)
    return data.decode("utf-8", "replace")


def on_terminal(*args: str) -> str:
    """`bytelm ARGS` with stdout and stderr on a pseudo-terminal: what a person would see."""
    master, slave = os.openpty()
    p = subprocess.Popen([sys.executable, "-m", "bytelm.cli", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=slave)
    os.close(slave)
    return read_terminal(master, p.pid)


GREEDY = ["-n", "20", "--temp", "0", "--no-stop-at-separator"]


def test_generated_escape_sequences_are_shown_visibly_on_a_terminal(escaping_checkpoint):
    seen = on_terminal("generate", str(escaping_checkpoint), "-p", "\x1b", *GREEDY)
    assert "\x1b" not in seen and "\x07" not in seen, repr(seen)
    assert "]0;pwned^G^[]0;pwned^G" in seen, repr(seen)


def test_a_pipe_gets_the_generated_bytes_exactly(escaping_checkpoint):
    r = bytelm("generate", escaping_checkpoint, "-p", "\x1b", *GREEDY)
    assert r.returncode == 0 and r.stdout == (TITLE[1:] + TITLE * 2)[:20], r.stderr


def test_info_shows_a_checkpoints_escapes_visibly_on_a_terminal(escaping_checkpoint):
    seen = on_terminal("info", str(escaping_checkpoint))
    assert "\x1b" not in seen and "corpus ^[]0;pwned^G" in seen and "val_bpb^[[2J" in seen, repr(seen)
    piped = bytelm("info", escaping_checkpoint)
    assert TITLE in piped.stdout  # a pipe gets the strings as they are


def test_the_interactive_prompt_shows_generated_escapes_visibly(escaping_checkpoint):
    pid, fd = pty.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(REPO)
            os.execve(sys.executable, [sys.executable, "inference.py", str(escaping_checkpoint), *GREEDY],
                      {**os.environ, "TERM": "dumb"})
        finally:
            os._exit(127)
    seen = read_terminal(fd, pid, send=b"p\n/quit\n", after=b"Ctrl-D or /quit leaves.")
    assert "wned^G^[]0;pwned^G" in seen and "\x1b]0;" not in seen, repr(seen)


def _is_control(c: str) -> bool:
    return unicodedata.category(c) == "Cc" and c not in "\n\t"


@settings(max_examples=2000, deadline=None)
@given(st.text())
def test_visible_text_keeps_no_control_character_but_newline_and_tab(text):
    shown = visible(text)
    assert not any(_is_control(c) for c in shown)
    if not any(_is_control(c) for c in text):
        assert shown == text  # text without controls is shown exactly

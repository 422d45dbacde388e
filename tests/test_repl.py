"""The interactive prompt: every command and its validation (in process), then the real thing under a
pseudo-terminal (streaming, Ctrl-C mid-generation, Ctrl-C and Ctrl-D at the prompt) and in a pipe."""
import io
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig
from bytelm.cli.chat import COMMANDS, Repl
from tiny import save_tiny_checkpoint, tiny_model

pty = pytest.importorskip("pty")
fcntl = pytest.importorskip("fcntl")
termios = pytest.importorskip("termios")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def make_repl(interactive=True, **settings):
    gen = ByteLevelGenerator(tiny_model(), InferenceConfig(**settings))
    out = io.StringIO()
    return Repl(gen, interactive, out=out, info=out, model_name="tiny.pt"), out


# --- commands, in process (fast) --------------------------------------------------------------------------

@pytest.mark.parametrize("command, field, value", [
    ("/temp 0.5", "temperature", 0.5),
    ("/temp 0", "temperature", 0.0),
    ("/topk 10", "top_k", 10),
    ("/topp 0.5", "top_p", 0.5),
    ("/minp 0.05", "min_p", 0.05),
    ("/rep 1.2", "repetition_penalty", 1.2),
    ("/replast 32", "repeat_last_n", 32),
    ("/length 99", "max_new_bytes", 99),
    ("/seed 7", "seed", 7),
    ("/seed random", "seed", None),
    ("/stop off", "stop_at_separator", False),
    ("/TEMP 1.5", "temperature", 1.5),  # command names are not case-sensitive
    ("/temperature 1.1", "temperature", 1.1),  # aliases
])
def test_each_setting_command_changes_its_setting(command, field, value):
    repl, out = make_repl(seed=3)
    assert repl.handle_command(command) is True
    assert getattr(repl.gen.config, field) == value
    assert f"{field} = " in out.getvalue()


@pytest.mark.parametrize("command, field, reason", [
    ("/temp 5", "temperature", "between 0.1 and 2.0"),
    ("/temp 0.05", "temperature", "between 0.1 and 2.0"),
    ("/temp hot", "temperature", "must be a number"),
    ("/topk 0", "top_k", "between 1 and 256"),
    ("/topk 300", "top_k", "between 1 and 256"),
    ("/topk 2.5", "top_k", "whole number"),
    ("/topp 0.05", "top_p", "between 0.1 and 1.0"),
    ("/topp 2", "top_p", "between 0.1 and 1.0"),
    ("/minp -1", "min_p", "between 0.0 and 1.0"),
    ("/rep 0.5", "repetition_penalty", "between 1.0 and 2.0"),
    ("/replast -7", "repeat_last_n", "at least -1"),
    ("/length 0", "max_new_bytes", "at least 1"),
    ("/length lots", "max_new_bytes", "whole number"),
    ("/seed -3", "seed", "seed"),
    ("/stop maybe", "stop_at_separator", "on or off"),
])
def test_a_bad_value_says_why_and_leaves_the_setting_unchanged(command, field, reason):
    repl, out = make_repl()
    before = repl.gen.config
    assert repl.handle_command(command) is True
    assert repl.gen.config == before
    assert "error:" in out.getvalue() and reason in out.getvalue() and "stays" in out.getvalue()


def test_help_config_reset_unknown_and_quit():
    repl, out = make_repl()
    repl.handle_command("/help")
    for name in COMMANDS:
        assert name in out.getvalue()
    repl.handle_command("/temp 1.5")
    repl.handle_command("/config")
    text = out.getvalue()
    assert "temperature" in text and "1.5" in text and "top_k" in text and "parameters" in text
    repl.handle_command("/reset")
    assert repl.gen.config == InferenceConfig()
    repl.handle_command("/frobnicate 3")
    assert "unknown command '/frobnicate'" in out.getvalue()
    repl.handle_command("/temp")  # no value: shows the current one
    assert "temperature = 0.8" in out.getvalue()
    assert repl.handle_command("/quit") is False and repl.handle_command("/exit") is False


def test_a_double_slash_sends_a_prompt_that_begins_with_a_slash():
    repl, out = make_repl(interactive=False, max_new_bytes=3, stop_at_separator=False, seed=1)
    assert repl.feed("//usr/bin") is True
    assert "unknown command" not in out.getvalue() and repl.gen.last_stats["prompt_bytes"] == len("/usr/bin")


# --- the real prompt under a pseudo-terminal ----------------------------------------------------------------

class Terminal:
    """Just enough of pexpect: a child process on a pseudo-terminal, read with timeouts so a hang fails."""

    def __init__(self, argv, timeout=30.0):
        env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.timeout = timeout
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: pty.fork made the terminal its controlling tty, so Ctrl-C means SIGINT
            try:
                # A shell starts background jobs with SIGINT ignored, and execve keeps that: a suite run as
                # `pytest &` then gave the program a Ctrl-C that did nothing. A person's terminal has the default.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.chdir(REPO)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        self.data = b""
        self.seen = 0  # expect() searches after this offset
        self.status = None

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.data += chunk
        return bool(chunk)

    def expect(self, needle: bytes, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            i = self.data.find(needle, self.seen)
            if i >= 0:
                before, self.seen = self.data[self.seen:i], i + len(needle)
                return before
            if time.monotonic() > deadline or not self._read(0.1):
                if self.status is None:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    self.status = status if pid else None
                alive = self.status is None
                raise AssertionError(
                    f"did not see {needle!r} ({'timed out' if alive else 'the program ended'}; "
                    f"{len(self.data) - self.seen} bytes since the last match); last output: {self.data[-600:]!r}")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                return os.waitstatus_to_exitcode(status)
            self._read(0.05)
        raise AssertionError(f"still running; last output: {self.data[-600:]!r}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


@pytest.fixture
def terminal(checkpoint):
    terms = []

    def spawn(*args):
        t = Terminal([sys.executable, "inference.py", str(checkpoint), *args])
        terms.append(t)
        return t

    yield spawn
    for t in terms:
        t.close()


def test_terminal_session_commands_streaming_and_ctrl_c_mid_generation(terminal):
    t = terminal("--seed", "1")
    t.expect(b"/help lists commands")
    t.expect(b"> ")
    t.send(b"/help\n")
    for name in (b"/temp X", b"/topk K", b"/topp P", b"/minp P", b"/rep X", b"/length N", b"/seed N", b"/quit"):
        t.expect(name)
    t.expect(b"> ")
    t.send(b"/temp 3\n")
    t.expect(b"temperature stays 0.8")
    t.send(b"/topk 0\n")
    t.expect(b"top_k stays 50")
    t.send(b"/topp 0.01\n")
    t.expect(b"top_p stays 0.9")
    t.send(b"/nonsense\n")
    t.expect(b"unknown command '/nonsense'")
    t.send(b"/temp 1.0\n")
    t.expect(b"temperature = 1.0")
    t.send(b"/length 30\n")
    t.expect(b"max_new_bytes = 30")
    t.send(b"/stop off\n")
    t.expect(b"stop_at_separator = off")
    t.send(b"/config\n")
    t.expect(b"max_new_bytes")
    t.expect(b"30")
    t.send(b"Hello there\n")
    t.expect(b"[30 bytes")
    t.expect(b"> ")
    # A long generation, interrupted: it stops, says so, and the prompt comes back.
    t.send(b"/length 1000000\n")
    t.expect(b"max_new_bytes = 1000000")
    t.expect(b"> ")
    t.send(b"Once upon a time\n")
    t.expect(b"Once upon a time")  # the terminal's echo of the line
    deadline = time.monotonic() + 20
    while len(t.data) - t.seen < 200 and time.monotonic() < deadline:  # output is streaming
        t._read(0.05)
    assert len(t.data) - t.seen >= 200, "no streamed output before Ctrl-C"
    t.send(b"\x03")
    t.expect(b"stopped (Ctrl-C)]")
    t.expect(b"> ")
    t.send(b"/quit\n")
    assert t.wait() == 0


@pytest.mark.parametrize("key", [b"\x04", b"\x03"], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_or_ctrl_c_at_the_prompt_exits_cleanly(terminal, key):
    t = terminal()
    t.expect(b"> ")
    # Python's readline loop can miss a SIGINT that lands between drawing the prompt and waiting for input
    # (a window of microseconds, but a loaded test machine can pause the child there); a person can't type
    # that fast, so give it a moment.
    time.sleep(0.5)
    t.send(key)
    assert t.wait() == 0
    assert b"Traceback" not in t.data


# --- pipes and errors --------------------------------------------------------------------------------------

def test_pipe_mode_prints_only_the_generations_one_per_line(checkpoint):
    script = b"/seed 4\nHello\n\n/nonsense\nWorld\n/quit\nnever generated\n"
    r = subprocess.run([sys.executable, "inference.py", str(checkpoint), "-n", "12", "--ignore-eos", "--temp", "1.0"],
                       cwd=REPO, input=script, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    gen = ByteLevelGenerator(str(checkpoint), InferenceConfig(max_new_bytes=12, temperature=1.0, seed=4,
                                                              stop_at_separator=False), device="cpu")
    expected = gen.generate("Hello") + "\n" + gen.generate("World") + "\n"
    assert r.stdout.decode("utf-8") == expected  # no banner, no prompt, no stats: just the generations
    assert b"seed = 4" in r.stderr and b"unknown command" in r.stderr


def test_missing_model_is_one_line_and_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "inference.py", str(tmp_path / "absent.pt")], cwd=REPO, input="",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: checkpoint not found") and r.stderr.count("\n") == 1

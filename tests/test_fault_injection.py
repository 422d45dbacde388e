"""Fault injection: SIGKILL at random moments, failing disks, two runs at one --out, NaN/Inf. Nothing trained is lost.

    pytest tests/test_fault_injection.py            # short forms (5 kills, injected ENOSPC/EIO, ...)
    pytest -m slow tests/test_fault_injection.py    # long forms (25 kills, a real full disk on tmpfs)
    python bench/reliability.py                     # the long forms, written to docs/reliability.md

The trial functions (kill_trial, ...) return plain dicts so bench/reliability.py can run them many times.
Every run is the "tiny" preset (2x2x32) on ~30 KB of text, one thread.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bytelm.checkpoint as ckpt_mod
import bytelm.train.loop as training
from bytelm.checkpoint import load_model, read_checkpoint
from bytelm.cli.train import main
from bytelm.cli.run import run_cli
from bytelm.errors import BytelmError
from bytelm.train.metrics import MetricsLog, read_metrics
from bytelm.model import ByteLM
from bytelm.train.run_files import RunPaths, lock_path, run_lock
from bytelm.train.loop import NonFiniteLoss, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old tree and "
         "every morning the farmer walks to the river to fetch water for his garden").split()


def write_corpus(path: Path) -> Path:
    """~30 KB of word salad in 40 JSON-lines documents (as tests/test_training.py)."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(150)) + "." for _ in range(40)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


def env_one_thread() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli_args(out: Path, corpus: Path | None, *extra: str, plot: bool = False) -> list[str]:
    """Flags of a tiny, quiet, one-thread run at `out` (a new run on `corpus`, or a resumed one without)."""
    data = ["--preset", "tiny", "--data", str(corpus)] if corpus else []
    return [*data, "--out", str(out), "--threads", "1", "--sample-bytes", "0", *([] if plot else ["--no-plot"]),
            "--cache-dir", str(out.parent / "cache"), "--compile", "off", *extra]  # compiling takes seconds


def temp_files(out: Path) -> list[Path]:
    """Checkpoint temp files (atomic_save's .NAME.XXXX.tmp) beside out."""
    return sorted(p for p in out.parent.glob(".*.tmp"))


def wait_for(predicate, proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.wait()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- training processes ------------------------------------------------------------------------------------
# A run is a real process either way: `python train.py ...` (Subprocess), or a child forked from a server
# that imported torch and bytelm once and has run no torch op, then runs the same entry point as train.py
# (ForkServer; saves the 3-8 s interpreter start per process, which dominates these tests on a busy machine).

class Subprocess:
    """`python train.py ARGS` with stderr captured."""

    def __init__(self, args: list[str], cwd: Path):
        self.proc = subprocess.Popen([PY, str(ROOT / "train.py"), *args], cwd=cwd, env=env_one_thread(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def poll(self):
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        """(exit code, stderr); a negative code is the signal that ended it."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, err


_SERVER = r"""
import json, os, sys, traceback
import bytelm.cli.train as train_cli
import torch._dynamo, tqdm  # imported by the optimizers' constructor and the loop: 2.5 s, once here
from bytelm.cli.run import run_cli
done = {}
for line in sys.stdin:
    cmd, arg = json.loads(line)
    if cmd == "run":
        argv, cwd, err_path, fsize = arg
        pid = os.fork()
        if pid == 0:  # the child: train.py's entry point, output to /dev/null and err_path
            code = 1
            try:
                if fsize:
                    import resource
                    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
                os.chdir(cwd)
                null = os.open(os.devnull, os.O_RDWR)
                err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(null, 0), os.dup2(null, 1), os.dup2(err, 2)
                code = run_cli(train_cli.main, argv)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    elif cmd in ("poll", "wait"):
        if arg not in done:
            pid, status = os.waitpid(arg, os.WNOHANG if cmd == "poll" else 0)
            if pid:
                done[arg] = os.waitstatus_to_exitcode(status)
        print(json.dumps(done.get(arg)), flush=True)
"""


class ForkServer:
    """One interpreter that has imported bytelm's training command; start() forks a training process from it."""

    def __init__(self):
        self.proc = subprocess.Popen([PY, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env_one_thread(), text=True)
        self.children: list[int] = []

    def ask(self, cmd: str, arg):
        self.proc.stdin.write(json.dumps([cmd, arg]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def start(self, args: list[str], cwd: Path, max_file_size: int = 0) -> "ForkedRun":
        """Fork a run of train.py's entry point with `args` in `cwd`; max_file_size sets RLIMIT_FSIZE."""
        err = cwd / f".stderr-{len(self.children)}.txt"
        pid = self.ask("run", [args, str(cwd), str(err), max_file_size])
        self.children.append(pid)
        return ForkedRun(self, pid, err)

    def close(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class ForkedRun:
    def __init__(self, server: ForkServer, pid: int, err: Path):
        self.server, self.pid, self.err = server, pid, err

    def poll(self):
        return self.server.ask("poll", self.pid)

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.send_signal(signal.SIGKILL)
                code = self.server.ask("wait", self.pid)
                break
            time.sleep(0.05)
        err = self.err.read_text()
        self.err.unlink()
        return code, err


@pytest.fixture(scope="module")
def fork_server():
    server = ForkServer()
    yield server
    server.close()


# --- 1. SIGKILL during training ----------------------------------------------------------------------------

def kill_trial(out: Path, corpus: Path, rng: random.Random, window: float = 1.0, server: ForkServer | None = None
               ) -> dict:
    """Start (or resume) a training process at `out`, SIGKILL it at a random moment once it has saved, then check
    that every checkpoint on disk loads and that `--resume` continues from the newest and completes.

    Runs chain: a trial resumes the run the previous trial left. The process is `python train.py`, or forked
    from `server`. Returns what happened; `lost` lists what was lost (the goal: nothing).
    """
    paths = RunPaths.for_out(out)
    fresh = not paths.last.exists()
    before = _identity(paths.last)
    args = cli_args(out, corpus if fresh else None, "--steps", "100000", "--save-every", "1", "--eval-every", "5")
    if not fresh:
        args.append("--resume")
    proc = server.start(args, out.parent) if server else Subprocess(args, out.parent)
    result = {"killed_at_s": None, "mid_save": False, "lost": [], "steps_of_work_lost": 0}
    try:
        # Wait until this process has saved at least once, then kill it at a random moment.
        # (Polls the file's identity, not its content: loading it every few ms would slow the run down.)
        wait_for(lambda: _identity(paths.last) not in (None, before), proc, 120, "the first save")
        delay = rng.uniform(0, window)
        time.sleep(delay)
        result["killed_at_s"] = round(delay, 3)
        proc.send_signal(signal.SIGKILL)
    finally:
        code, stderr = proc.wait(timeout=30)
    if code != -signal.SIGKILL:
        result["lost"].append(f"the run ended by itself (exit {code}) before the kill: {stderr[-300:]}")
    if "Traceback" in stderr:
        result["lost"].append(f"traceback before the kill: {stderr[-300:]}")
    temps = temp_files(out)
    result["mid_save"] = bool(temps)  # a temp file survives only a kill inside atomic_save
    # Every checkpoint on disk loads.
    saved = None
    for p in (paths.best, paths.last):
        if not p.exists():
            continue
        try:
            load_model(p)
            if p == paths.last:
                saved = read_checkpoint(p)["train_state"]["step"]
        except BytelmError as e:
            result["lost"].append(f"{p.name} does not load: {e}")
    if saved is None:
        result["lost"].append("no resume state after the kill")
        return result
    logged = max((r["step"] for r in read_metrics(paths.metrics) if "loss" in r), default=0)
    result["saved_step"], result["logged_step"] = saved, logged
    result["steps_of_work_lost"] = max(0, logged - saved)
    if logged - saved > 1:  # saves happen every step: at most the step being saved can be lost
        result["lost"].append(f"{logged - saved} steps of work lost (saved {saved}, logged {logged})")
    # --resume continues from the newest state and completes (in process: the CLI's code without the startup).
    try:
        rc = main(["--out", str(out), "--resume", "--steps", str(saved + 2), "--threads", "1"])
        resumed = read_checkpoint(paths.last)["train_state"]["step"]
        if rc != 0 or resumed != saved + 2:
            result["lost"].append(f"--resume ended with rc {rc} at step {resumed}, not {saved + 2}")
    except BytelmError as e:
        result["lost"].append(f"--resume failed: {e}")
    if temp_files(out):
        result["lost"].append(f"temp files still there after the resumed run: {temp_files(out)}")
    return result


def _identity(path: Path):
    """(inode, mtime) of a file, None if missing: atomic_save's rename gives every save a new inode."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _saved_step(path: Path) -> int:
    try:
        return read_checkpoint(path)["train_state"]["step"]
    except BytelmError:  # read while being replaced is fine (rename is atomic), but be safe
        return -1


def run_kill_trials(work: Path, corpus: Path, trials: int, seed: int = 0, window: float = 1.0,
                    server: ForkServer | None = None) -> list[dict]:
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    return [kill_trial(work / "m.pt", corpus, rng, window, server) for _ in range(trials)]


def _check_kill_results(results: list[dict]) -> None:
    lost = [r["lost"] for r in results if r["lost"]]
    assert not lost, lost


def test_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path, corpus_file, fork_server):
    _check_kill_results(run_kill_trials(tmp_path, corpus_file, trials=8, seed=1, server=fork_server))


def test_sigkill_of_a_real_train_py_process(tmp_path, corpus_file):
    _check_kill_results(run_kill_trials(tmp_path, corpus_file, trials=1, seed=3))


@pytest.mark.slow
def test_sigkill_25_times_never_loses_a_checkpoint(tmp_path, corpus_file):
    results = run_kill_trials(tmp_path, corpus_file, trials=25, seed=2)
    _check_kill_results(results)
    assert sum(r["mid_save"] for r in results) >= 1  # some kills really landed inside a checkpoint write


def test_a_new_run_removes_temp_files_left_by_a_killed_save(tmp_path, corpus_file):
    out = tmp_path / "m.pt"
    assert main(cli_args(out, corpus_file, "--steps", "3", "--eval-every", "3")) == 0
    stale = [tmp_path / ".m.last.pt.abc123_z.tmp", tmp_path / ".m.pt.xyz789qq.tmp"]  # as mkstemp names them
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    read_checkpoint(out), read_checkpoint(RunPaths.for_out(out).last)  # the temps confuse nothing
    others = [tmp_path / ".other.pt.abcdefgh.tmp", tmp_path / ".m.pt.v2.pt.abcdefgh.tmp"]  # other checkpoints'
    for p in others:
        p.write_bytes(b"not ours")
    assert main(["--out", str(out), "--resume", "--steps", "4", "--threads", "1"]) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


# --- 2. Disk full, write errors -----------------------------------------------------------------------------

def _failing_save(monkeypatch, fail_on_call: int, err: int, target: str = "last"):
    """Make the fail_on_call-th torch.save of `target` write half a checkpoint and then fail with errno err."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        is_last = "optimizers" in (obj.get("train_state") or {})
        if (target == "last") == is_last:
            calls["n"] += 1
            if calls["n"] == fail_on_call:
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(err, os.strerror(err))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("target", ["last", "best"])
def test_a_failing_write_mid_run_keeps_the_previous_checkpoint_and_says_one_line(tmp_path, corpus_file, capsys,
                                                                                 monkeypatch, err, target):
    out = tmp_path / "m.pt"
    paths = RunPaths.for_out(out)
    _failing_save(monkeypatch, fail_on_call=3, err=err, target=target)
    rc = run_cli(main, cli_args(out, corpus_file, "--steps", "30", "--save-every", "2", "--eval-every", "2"))
    captured = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("error: cannot write checkpoint") and os.strerror(err) in captured.err
    assert "unchanged" in captured.err
    # The previous file is intact: the save before the failing one (step 4 of saves at 2, 4, 6).
    kept = paths.last if target == "last" else paths.best
    assert read_checkpoint(kept)["train_state"]["step"] == 4
    load_model(kept)
    assert temp_files(out) == []
    monkeypatch.undo()
    assert main(["--out", str(out), "--resume", "--steps", "8", "--threads", "1"]) == 0  # and it resumes


def test_a_full_disk_while_logging_metrics_is_one_line_too(tmp_path, corpus_file, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    real_write = MetricsLog.write
    calls = {"n": 0}

    def write(self, record):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, record)

    monkeypatch.setattr(MetricsLog, "write", write)
    rc = run_cli(main, cli_args(out, corpus_file, "--steps", "30", "--save-every", "2", "--eval-every", "100"))
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "m.metrics.jsonl" in err and "No space left on device" in err
    load_model(RunPaths.for_out(out).last)


def file_size_limit_trial(tmp: Path, corpus: Path, server: ForkServer | None = None) -> dict:
    """A real kernel write error (EFBIG from RLIMIT_FSIZE) in a training process: train 4 steps, then resume
    under a file-size limit smaller than the resume checkpoint. Returns what happened."""
    out = tmp / "m.pt"
    paths = RunPaths.for_out(out)
    assert main(cli_args(out, corpus, "--steps", "4", "--eval-every", "2", "--save-every", "2")) == 0
    before = paths.last.read_bytes()
    limit = paths.last.stat().st_size // 2
    args = ["--out", str(out), "--resume", "--steps", "8", "--threads", "1"]
    if server:
        rc, stderr = server.start(args, tmp, max_file_size=limit).wait(timeout=120)
    else:
        def limit_file_size():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes get EFBIG

        r = subprocess.run([PY, str(ROOT / "train.py"), *args], cwd=tmp, env=env_one_thread(), capture_output=True,
                           text=True, timeout=120, preexec_fn=limit_file_size)
        rc, stderr = r.returncode, r.stderr
    return {"rc": rc, "stderr": stderr, "intact": paths.last.read_bytes() == before, "loads": _loads(paths.last),
            "temps": temp_files(out)}


def _loads(path: Path) -> bool:
    try:
        load_model(path)
        return True
    except BytelmError:
        return False


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
@pytest.mark.parametrize("process", ["forked", pytest.param("train_py", marks=pytest.mark.slow)])
def test_a_real_write_error_in_a_training_process_keeps_the_old_checkpoint(tmp_path, corpus_file, fork_server,
                                                                           process):
    r = file_size_limit_trial(tmp_path, corpus_file, fork_server if process == "forked" else None)
    assert r["rc"] == 1 and "Traceback" not in r["stderr"], r["stderr"]
    assert r["stderr"].count("\n") == 1 and "File too large" in r["stderr"] and "unchanged" in r["stderr"]
    assert r["intact"] and r["loads"] and r["temps"] == []


def full_disk_trial(tmp: Path, corpus: Path, rng: random.Random, size_kb: int = 4096) -> dict | None:
    """Train on a small tmpfs and, at a random moment after the first save, fill it up from outside (as another
    program would): the run must stop at its next write with one line, leaving loadable checkpoints.
    Returns None where mounting is not allowed (not root)."""
    mnt = tmp / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        return None
    try:
        out = mnt / "m.pt"
        paths = RunPaths.for_out(out)
        plot = rng.random() < 0.5  # the loss plot is one more file that can be the first write to fail
        proc = subprocess.Popen([PY, str(ROOT / "train.py"), *cli_args(out, corpus, "--steps", "100000",
                                                                       "--save-every", "1", "--eval-every", "5",
                                                                       plot=plot)],
                                cwd=tmp, env=env_one_thread(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            wait_for(lambda: paths.last.exists(), proc, 120, "the first save")
            time.sleep(rng.uniform(0, 3.0))
            with open(mnt / "filler", "wb") as f:  # fill every free byte
                try:
                    while True:
                        f.write(bytes(64 << 10))
                        f.flush()
                except OSError:
                    pass
            _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return {"rc": proc.returncode, "stderr": stderr, "plot": plot, "best_loads": _loads(paths.best),
                "last_loads": _loads(paths.last), "saved_step": _saved_step(paths.last), "temps": temp_files(out)}
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_really_full_disk_stops_training_with_one_line_and_loadable_checkpoints(tmp_path, corpus_file):
    r = full_disk_trial(tmp_path, corpus_file, random.Random(0))
    if r is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    assert r["rc"] == 1 and "Traceback" not in r["stderr"], r["stderr"]
    assert r["stderr"].count("\n") == 1 and "No space left on device" in r["stderr"], r["stderr"]
    assert r["best_loads"] and r["last_loads"] and r["temps"] == []


# --- 6. Two runs, one output --------------------------------------------------------------------------------

def test_the_run_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    out = tmp_path / "sub" / "m.pt"
    with run_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        with pytest.raises(BytelmError, match=f"another training run \\(PID {os.getpid()}\\) is writing"):
            with run_lock(out):
                pass
    assert not lock_path(out).exists()  # released and removed
    with run_lock(out):  # free again
        pass


def two_runs_trial(tmp: Path, corpus: Path, server: ForkServer | None = None) -> dict:
    """Start a training process, then a second run at the same --out (with --force, which would delete the
    first's files): a `train.py` process, or in this process when the first is forked from `server`. Then stop
    the first with Ctrl-C. Returns both outcomes."""
    out = tmp / "m.pt"
    paths = RunPaths.for_out(out)
    args = cli_args(out, corpus, "--steps", "100000", "--save-every", "5", "--eval-every", "5")
    first = server.start(args, tmp) if server else Subprocess(args, tmp)
    try:
        wait_for(lambda: paths.last.exists(), first, 120, "the first run's first save")
        second_args = cli_args(out, corpus, "--steps", "10", "--force")
        if server:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                second = (run_cli(main, second_args), err.getvalue())
        else:
            r = subprocess.run([PY, str(ROOT / "train.py"), *second_args], cwd=tmp, env=env_one_thread(),
                               capture_output=True, text=True, timeout=120)
            second = (r.returncode, r.stderr)
        first_alive = first.poll() is None
        first.send_signal(signal.SIGINT)
    finally:
        first_rc, first_err = first.wait(timeout=60)
    return {"pid": first.pid, "second_rc": second[0], "second_stderr": second[1],
            "first_alive_after_second": first_alive, "first_rc": first_rc, "first_stderr": first_err,
            "loads": _loads(paths.last) and _loads(paths.best),
            "metrics_steps": [r["step"] for r in read_metrics(paths.metrics) if "loss" in r]}


@pytest.mark.parametrize("second", ["in_process", pytest.param("train_py", marks=pytest.mark.slow)])
def test_a_second_run_at_the_same_out_is_refused_while_the_first_finishes(tmp_path, corpus_file, fork_server,
                                                                          second):
    r = two_runs_trial(tmp_path, corpus_file, fork_server if second == "in_process" else None)
    assert r["second_rc"] == 1 and r["second_stderr"].count("\n") == 1, r["second_stderr"]
    assert f"another training run (PID {r['pid']}) is writing" in r["second_stderr"]
    assert r["first_alive_after_second"]
    assert r["first_rc"] in (0, 130) and "Traceback" not in r["first_stderr"], r["first_stderr"]
    assert r["loads"]
    steps = r["metrics_steps"]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved or restarted log


# --- 7. Numerical faults -------------------------------------------------------------------------------------

def tiny(tmp_path, corpus_file, **overrides) -> TrainConfig:
    settings = dict(data=str(corpus_file), out=str(tmp_path / "m.pt"), threads=1, plot=False, sample_bytes=0,
                    cache_dir=str(tmp_path / "cache"))
    return TrainConfig.from_preset("tiny", **{**settings, **overrides})


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_an_infinite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, corpus_file, monkeypatch,
                                                                            bad):
    calls = {"n": 0}

    class Exploding(ByteLM):
        def forward(self, idx, targets=None, **kw):
            logits, loss = super().forward(idx, targets, **kw)
            if self.training and targets is not None:
                calls["n"] += 1
                if calls["n"] == 8:
                    loss = loss * bad
            return logits, loss

    monkeypatch.setattr(training, "ByteLM", Exploding)
    cfg = tiny(tmp_path, corpus_file, steps=20, eval_every=5, save_every=5)
    with pytest.raises(NonFiniteLoss, match=r"the loss is -?inf at step 8.*without saving"):
        train(cfg, progress=False)
    assert read_checkpoint(RunPaths.for_out(cfg.out).last)["train_state"]["step"] == 5


def test_weights_made_non_finite_by_an_optimizer_step_are_never_saved(tmp_path, corpus_file, monkeypatch):
    """The loss check sees a bad update one step late; the save right after the update must not write it."""
    real_build = training.build_optimizers

    def build(model, **kw):
        opts = real_build(model, **kw)
        first, calls = opts[0], {"n": 0}
        real_step = first.step

        def step(*a, **k):
            out = real_step(*a, **k)
            calls["n"] += 1
            if calls["n"] == 10:  # step 10 is a save step: its update turns a weight into inf
                with torch.no_grad():
                    first.param_groups[0]["params"][0].view(-1)[0] = float("inf")
            return out

        first.step = step
        return opts

    monkeypatch.setattr(training, "build_optimizers", build)
    cfg = tiny(tmp_path, corpus_file, steps=20, eval_every=5, save_every=5)
    with pytest.raises(NonFiniteLoss, match="model weights are not finite.*step 10.*without saving"):
        train(cfg, progress=False)
    paths = RunPaths.for_out(cfg.out)
    for p in (paths.last, paths.best):
        assert read_checkpoint(p)["train_state"]["step"] == 5
        model, _ = load_model(p)
        assert all(torch.isfinite(t).all() for t in model.parameters())


def test_a_real_divergence_through_the_cli_is_one_line_and_keeps_finite_weights(tmp_path, corpus_file, capsys):
    out = tmp_path / "m.pt"
    rc = run_cli(main, cli_args(out, corpus_file, "--steps", "50", "--save-every", "1", "--eval-every", "1",
                                "--warmup", "0", "--muon-lr", "1e30", "--adam-lr", "1e30", "--grad-clip", "0"))
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: training diverged") and "lower learning rates" in err
    for p in (out, RunPaths.for_out(out).last):
        if p.exists():
            model, _ = load_model(p)
            assert all(torch.isfinite(t).all() for t in model.parameters())

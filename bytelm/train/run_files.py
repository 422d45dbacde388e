"""A training run's files beside --out: their names, the lock that keeps a second run away, and the rules
for a new run at an --out that was used before.

    paths = RunPaths.for_out("byte_llm_model.pt")   # .best, .last, .metrics, .plot
    with run_lock(paths.best):                      # refuses a second run at the same --out, naming its PID
        refuse_to_overwrite(paths, force=False)     # an earlier run's files are never lost without --force
        remove_run_files(paths)                     # with --force: only files bytelm recognises as its own

The files (docs/training.md):
    byte_llm_model.pt               the model with the best validation bits per byte so far
    byte_llm_model.last.pt          the latest full state (optimizer, data position, RNG) for --resume
    byte_llm_model.metrics.jsonl    one JSON line per step and per evaluation
    byte_llm_model.loss.png         train and validation curves
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bytelm.errors import BytelmError
from bytelm.train.metrics import PLOT_TITLE, MetricsLog

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None


@dataclass
class RunPaths:
    best: Path
    last: Path
    metrics: Path
    plot: Path

    @classmethod
    def for_out(cls, out: str | os.PathLike) -> "RunPaths":
        """byte_llm_model.pt -> byte_llm_model.{last.pt, metrics.jsonl, loss.png}, all in the same folder."""
        out = Path(out)
        stem = out.stem if out.suffix == ".pt" else out.name
        return cls(out, out.with_name(f"{stem}.last.pt"), out.with_name(f"{stem}.metrics.jsonl"),
                   out.with_name(f"{stem}.loss.png"))

    def as_dict(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}


# --- an earlier run's files ----------------------------------------------------------------------------------

def _is_bytelm_checkpoint(path: Path) -> bool:
    """A torch zip whose pickle begins with bytelm's format marker (checkpoint.FORMAT_NAME). Reads only the
    pickle's first bytes: a checkpoint damaged elsewhere is still recognised."""
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [e for e in zf.infolist() if e.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                return False
            with zf.open(pickles[0]) as f:
                return b"bytelm" in f.read(256)
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, NotImplementedError):
        return False


def _is_metrics_log(path: Path) -> bool:
    """Empty, or JSON objects with a whole-number "step" (at most a torn last line: a crash mid-write)."""
    try:
        with open(path, "rb") as f:
            lines = f.read(1 << 16).splitlines()[:20]
    except OSError:
        return False
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            parsed.append(None)
    good = [r for r in parsed if isinstance(r, dict) and isinstance(r.get("step"), int)]
    return len(good) >= len(parsed) - 1 and (bool(good) or not parsed)


def _is_loss_plot(path: Path) -> bool:
    """A PNG whose text chunks carry the title bytelm.train.metrics.plot_losses writes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and PLOT_TITLE.encode() in head


def _earlier_files(paths: RunPaths) -> list[Path]:
    return [p for p in (paths.best, paths.last, paths.metrics, paths.plot) if os.path.lexists(p)]


def refuse_to_overwrite(paths: RunPaths, force: bool) -> None:
    """A new run at `paths` starts only where no earlier run's file would be lost: without --force, any of the
    four files refuses it; with --force, any of them that bytelm does not recognise as its own (--out itself,
    named by the user, is overwritten whatever it holds)."""
    if paths.best.is_dir():
        raise BytelmError(f"--out {paths.best} is a folder; give a file path such as {paths.best / 'model.pt'}")
    earlier = _earlier_files(paths)
    if earlier and not force:
        raise BytelmError(f"{earlier[0]} already exists (an earlier run's file): add --resume to continue that "
                          "run, --force to start over and remove its files, or choose another --out")
    checks = ((paths.last, _is_bytelm_checkpoint, "a bytelm checkpoint"),
              (paths.metrics, _is_metrics_log, "a bytelm metrics log"),
              (paths.plot, _is_loss_plot, "a bytelm loss plot"))
    for path, recognised, what in checks:
        if os.path.lexists(path) and (path.is_symlink() or not path.is_file() or not recognised(path)):
            raise BytelmError(f"{path} is not {what}, so --force leaves it alone; move it away or choose "
                              "another --out")


def remove_run_files(paths: RunPaths) -> None:
    """Delete an earlier run's files (refuse_to_overwrite has checked them), so a new run starts clean."""
    for p in (paths.best, paths.last, paths.metrics, paths.plot):
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            raise BytelmError(f"cannot remove {p} of the earlier run: {e.strerror or e}") from None


# --- writing them ------------------------------------------------------------------------------------------

def run_file_error(path, e: OSError) -> BytelmError:
    return BytelmError(f"cannot write {path}: {e.strerror or e}; training stopped, and the checkpoints already "
                       "saved are unchanged")


class RunLog(MetricsLog):
    """The metrics log, whose write errors (a full disk, a failing device) stop the run with one clear line
    instead of a traceback: with the disk full, this small append is often the first write to fail."""

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            raise run_file_error(self.path, e) from None

    def write(self, record: dict) -> None:
        self._guard(super().write, record)

    def truncate_after(self, step: int) -> None:
        self._guard(super().truncate_after, step)


# --- the lock ----------------------------------------------------------------------------------------------

def lock_path(out: str | os.PathLike) -> Path:
    """The hidden file a run locks while it writes `out` and its run files: .byte_llm_model.pt.lock."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


def _open_locked(path: Path, out) -> int | None:
    """An fd holding the exclusive lock on `path`, or None where this filesystem cannot lock."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise BytelmError(f"cannot write beside --out {out} ({path}: {e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (PID {pid})" if pid.isdigit() else ""
            raise BytelmError(f"another training run{who} is writing {out}; wait for it to finish or stop it, "
                              f"or choose another --out") from None
        except OSError:  # ENOLCK and friends: this filesystem cannot lock; run unlocked
            os.close(fd)
            return None
        # A run that just finished deletes the file after we opened it: then our lock is on a file nobody
        # else can see, so open the new one and lock again.
        try:
            st, mine = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise BytelmError(f"cannot lock {path}: it keeps being replaced")


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, enabled: bool = True):
    """Hold an exclusive lock on `out` for the whole run, so a second run at the same --out (which with --force
    would delete the first one's files, and would otherwise interleave its checkpoints) is refused at once
    with the first one's PID. flock is released by the kernel when a process dies, even by SIGKILL, so a
    crashed run never leaves a stale lock. Where flock is missing or unsupported (Windows, some network
    filesystems) runs are not locked.
    """
    if not enabled or fcntl is None:
        yield
        return
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BytelmError(f"cannot create the folder of --out {out}: {e.strerror or e}") from None
    fd = _open_locked(path, out)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)  # while still locked, so anyone who opened it sees it gone and starts again
        except OSError:
            pass
        os.close(fd)

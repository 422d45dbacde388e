"""Files bytelm writes: one atomic writer, and the cache folders.

    atomic_write(path, lambda f: f.write(data))    # readers see the old file or the new one, never a part
    cache_root()                                    # $BYTELM_CACHE, else $XDG_CACHE_HOME/bytelm, else ~/.cache/bytelm
    private_dir(folder)                             # created for this user alone, or refused

Every file bytelm publishes (checkpoints, metrics, plots, compressed files, the native library) goes through
atomic_write: a temporary file in the same folder, flushed and fsynced, then renamed over the target, and the
folder fsynced. A crash, a full disk or an exception at any point leaves the previous file (or none) and no
temporary file.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some filesystems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    """The mode a plain open() would give a new file: 0666 less the umask (mkstemp creates 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], mode: int | None = None) -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, then rename it over `path`.

    Raises whatever write() or the filesystem raises (OSError for a full disk); the temporary file is removed
    first, and `path` is untouched. `mode` defaults to what open() would create.

    A target that exists and is not a regular file (/dev/null, /dev/full, a named pipe, a terminal) is written
    in place: there is no file to keep whole, and renaming over it would replace the device with a file.
    """
    path = Path(path)
    try:
        special = not stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        special = False
    if special:
        with open(path, "wb") as f:
            write(f)
        return
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _default_mode() if mode is None else mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """cache_dir, else $BYTELM_CACHE, else $XDG_CACHE_HOME/bytelm, else ~/.cache/bytelm."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("BYTELM_CACHE"):
        return Path(os.environ["BYTELM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bytelm"


def unsafe_reason(path: Path) -> str | None:
    """Why `path` must not be trusted (another user owns it or can write to it), or None. Code is loaded from
    the cache (the native library, torch.compile's output), so a folder another local user controls could
    plant it."""
    if not hasattr(os, "getuid"):
        return None  # no POSIX ownership to check (Windows)
    st = path.lstat()
    if st.st_uid != os.getuid():
        return f"{path} belongs to another user"
    if st.st_mode & 0o022:
        return f"{path} is writable by other users"
    return None


def private_dir(folder: Path) -> Path:
    """Create `folder` (and parents) for this user alone, tightening it if it is ours and too open. Raises
    PermissionError naming the folder if it, or a folder between it and the cache root, belongs to someone else."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if hasattr(os, "getuid") and st.st_uid == os.getuid() and st.st_mode & 0o022:
        os.chmod(folder, 0o700)
    why = unsafe_reason(folder)
    if why:
        raise PermissionError(why)
    return folder

"""The optional C library: the decode step (bytelm/csrc/decode_step.c), the sampler (bytelm/csrc/sample.c) and
the training attention kernel (bytelm/csrc/attention.c), compiled on first use, cached, loaded with ctypes.

    lib = decode_kernel()     # a ctypes.CDLL, or None (no C compiler, BYTELM_NATIVE=0, or the build failed)
    why = kernel_status()     # one line: "compiled ...", "loaded from cache ...", or why there is none

Why C and ctypes rather than a torch C++ extension: the step needs no torch headers, so it builds in well
under a second with the system compiler, and nothing is needed at install time. Everything degrades to
the pure-torch step in bytelm/decode.py (and attention to torch's scaled_dot_product_attention) when there is
no compiler.

The library is built with -march=native for the machine it runs on; the cache key includes the sources and
headers, the compiler's name and flags and the CPU's feature flags, so a cache folder shared between machines
stays correct.
It is written to a temporary name and renamed, so concurrent first uses never load a half-written file, and a
cached library is loaded only if this user owns it and no one else can write to it or its folder (loading
a library runs its code, so a shared cache folder must not let another user plant one).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("decode_step.c", "sample.c", "attention.c")]
HEADERS = [Path(__file__).with_name("csrc") / "attend.h"]
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
# OpenMP threads for the training attention kernel (see bytelm/csrc/attention.c: the library then shares torch's
# OpenMP runtime); a compiler that can't link OpenMP gets the second form, and the kernel runs on one thread.
_OPENMP_FLAGS = (["-fopenmp"], ["-fopenmp-simd"])

_lib: ctypes.CDLL | None = None
_status = "not loaded yet"
_tried = False


def _cpu_key() -> str:
    """The CPU feature flags (Linux), so a library built for one CPU is never loaded on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    from .files import cache_root  # the same folder as the data cache ($BYTELM_CACHE, ~/.cache/bytelm)
    return cache_root() / "native"


def _private_dir(folder: Path) -> None:
    """Create `folder` for this user alone (or tighten it if it is ours): _safe_to_load requires it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if hasattr(os, "getuid") and st.st_uid == os.getuid() and st.st_mode & 0o022:
        os.chmod(folder, 0o700)


def _compile(compiler: str, out: Path) -> None:
    _private_dir(out.parent)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        for i, openmp in enumerate(_OPENMP_FLAGS):
            try:
                subprocess.run([compiler, *_FLAGS, *openmp, *map(str, SOURCES), "-o", tmp, "-lm"], check=True,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
                break
            except subprocess.CalledProcessError:
                if i == len(_OPENMP_FLAGS) - 1:
                    raise
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _safe_to_load(path: Path) -> str | None:
    """Why a cached library must not be loaded (loading it runs its code), or None if it may be: it must be a
    regular file owned by this user and writable by no one else, in a folder no one else can write to."""
    if not hasattr(os, "getuid"):
        return None  # no POSIX ownership to check (Windows)
    for target in (path, path.parent):
        st = target.lstat()
        if st.st_uid != os.getuid():
            return f"{target} belongs to another user"
        if st.st_mode & 0o022:
            return f"{target} is writable by other users"
    return None if path.is_file() and not path.is_symlink() else f"{path} is not a regular file"


def decode_kernel() -> ctypes.CDLL | None:
    """The loaded library, building it once per machine; None where it can't be had (see kernel_status)."""
    global _lib, _status, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("BYTELM_NATIVE", "1") == "0":
        _status = "off (BYTELM_NATIVE=0)"
        return None
    compiler = next((c for c in (os.environ.get("CC"), "gcc", "cc", "clang") if c and shutil.which(c)), None)
    if compiler is None:
        _status = "no C compiler found (gcc, cc or clang): using the torch decode step"
        return None
    try:
        source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
        key = hashlib.sha256(source + compiler.encode() + repr((_FLAGS, _OPENMP_FLAGS)).encode()
                             + _cpu_key().encode()).hexdigest()[:16]
        path = _cache_dir() / f"decode_step-{key}.so"
        fresh = not path.exists()
        if fresh:
            _compile(compiler, path)
        unsafe = _safe_to_load(path)
        if unsafe:
            _status = f"C decode step not loaded: {unsafe}: using the torch decode step"
            return None
        lib = ctypes.CDLL(str(path))
        fn = lib.bytelm_decode_step
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int] * 9 + [ctypes.c_float] * 2 + [ctypes.c_void_p] * 13
        lib.bytelm_half_supported.restype = ctypes.c_int
        lib.bytelm_half_supported.argtypes = []
        fn = lib.bytelm_sample
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_float,
                       ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_double]
        tensor, stride = ctypes.c_void_p, ctypes.c_long
        lib.bytelm_attention_supported.restype = ctypes.c_int
        lib.bytelm_attention_supported.argtypes = []
        for name, n_out in (("bytelm_attention_forward", 2), ("bytelm_attention_backward", 6)):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int] + [tensor, stride] * 3 + [tensor] * n_out
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", b"") or b""
        first = detail.decode(errors="replace").strip().splitlines()[:1]
        _status = f"C decode step unavailable ({type(e).__name__}{': ' + first[0] if first else ''}): " \
                  "using the torch decode step"
        return None
    _lib = lib
    _status = f"{'compiled' if fresh else 'loaded from cache'}: {path}"
    return _lib


def kernel_status() -> str:
    """One line saying whether the C step is in use, and if not, why."""
    return _status

"""The optional C library: the decode step (bytelm/infer/csrc/decode_step.c: one row, or a batch of rows reading the
weights once) and the sampler (bytelm/infer/csrc/sample.c), compiled on first use, cached, checked, and loaded with
ctypes.

    lib = library()     # the loaded ctypes.CDLL, or None (BYTELM_NATIVE=0, no C compiler, a failed build, ...)
    status()            # one line: "compiled: PATH", "loaded from cache: PATH", or why there is none
    describe()          # the same as a dict, for `bytelm env`

Nothing is built or loaded before library() is first called (FastDecoder and CSampler call it), so
`import bytelm` and commands that generate nothing never map native code.

Why C and ctypes rather than a torch C++ extension: the code needs no torch headers, so it builds in well under
a second with the system compiler, and nothing is needed at install time. Everything degrades to the pure-torch
step in bytelm/infer/step.py and bytelm.infer.sampling.sample_next when the library can't be had; a failure other than
BYTELM_NATIVE=0 or a missing compiler is reported in one line on stderr, once per process.

The cache (cache_root()/native):
  * The library is built with -march=native; its name carries a key of the sources and headers, the compiler's
    name and flags and the CPU's feature flags, so a cache folder shared between machines stays correct.
  * Its sha256 is recorded beside it (NAME.sha256). Both are written through bytelm.files.atomic_write
    (fsynced, then renamed), and a library is loaded only if it matches its record: one cut short by a crash or
    a full disk would otherwise make the dynamic loader fault with SIGBUS in every process, forever. A damaged
    library is rebuilt.
  * Loading a library runs its code, so the library, its record, its folder and the cache root must belong to
    this user and be writable by no one else, and every folder above them must belong to this user or root and,
    if others can write to it, be sticky like /tmp (else another user could swap the folders below).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("decode_step.c", "sample.c")]
HEADERS = [Path(__file__).with_name("csrc") / name for name in ("attend.h", "matvec.h")]
# -fopenmp-simd: the `omp simd` loops vectorise without linking an OpenMP runtime.
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11", "-fopenmp-simd"]
_COMPILERS = ("gcc", "cc", "clang")


class DecodeStep(ctypes.Structure):
    """bytelm_decode_step's model and buffers (the DecodeStep struct of bytelm/infer/csrc/decode_step.c, field for
    field). Each buffer `name` goes with `name_size`, its length in elements, which the C step checks against
    the dimensions before touching memory; `error` holds why a call was refused."""
    _fields_ = ([(name, ctypes.c_int32) for name in ("n_layer", "C", "H", "F", "V", "max_len", "rope_len", "half")]
                + [("eps", ctypes.c_float), ("qk_eps", ctypes.c_float)]
                + [field for name in ("embed", "w_qkv", "w_proj", "w_fc", "w_out", "head", "rope_cos", "rope_sin",
                                      "value_embed", "k_cache", "v_cache", "scratch", "logits")
                   for field in ((name, ctypes.c_void_p), (name + "_size", ctypes.c_int64))]
                + [("error", ctypes.c_char * 200)])

    def set_buffers(self, **tensors) -> None:
        """Point each named buffer at a tensor's memory (or NULL for None) and record its length. The caller
        keeps the tensors alive while the struct is in use."""
        for name, t in tensors.items():
            setattr(self, name, None if t is None else t.data_ptr())
            setattr(self, name + "_size", 0 if t is None else t.numel())


class DecodeRow(ctypes.Structure):
    """One row of bytelm_decode_rows (the DecodeRow struct of bytelm/infer/csrc/decode_step.c): the byte to feed, its
    position, and the row's own KV cache (max_len positions) and logits, each with its length in elements."""
    _fields_ = ([(name, ctypes.c_int32) for name in ("byte", "pos", "max_len")]
                + [field for name in ("k_cache", "v_cache", "logits")
                   for field in ((name, ctypes.c_void_p), (name + "_size", ctypes.c_int64))])


# bytelm_sample's refusals (bytelm/infer/csrc/sample.c), by return code
SAMPLE_ERRORS = {-1: "the logits must be 1 to 256 values", -2: "the recent bytes are missing or their count is < 0",
                 -3: "a sampling setting is out of range (temperature < 0, penalty <= 0, min_p > 1, or NaN)",
                 -4: "the uniform draw must be in [0, 1)", -5: "a logit is NaN or infinite"}

_lib: ctypes.CDLL | None = None
_tried = False
_state = {"state": "not loaded yet", "path": None, "detail": ""}


def compiler() -> str | None:
    """The C compiler to build with ($CC, else the first of gcc, cc, clang on the PATH), or None."""
    return next((c for c in (os.environ.get("CC"), *_COMPILERS) if c and shutil.which(c)), None)


def _cache_key(compiler: str, files: list[Path], flags: list[str]) -> str:
    """The sources, headers, compiler, flags and CPU features, hashed: one library per combination."""
    from bytelm.device import cpu_flags, cpu_model

    h = hashlib.sha256()
    for path in files:
        h.update(path.read_bytes())
    h.update(repr((compiler, flags, cpu_model(), sorted(cpu_flags()))).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where the library is cached: the `native` folder of bytelm's cache (bytelm.files.cache_root)."""
    from bytelm.files import cache_root
    return cache_root() / "native"


def _untrusted_folders(folder: Path) -> str | None:
    """Why `folder` (an existing folder of the cache) can't be trusted to hold code, or None (see the module
    docstring); no POSIX owners to check on Windows."""
    from bytelm.files import cache_root, unsafe_reason

    if not hasattr(os, "getuid"):
        return None
    folder, root = folder.resolve(), cache_root().resolve()
    for f in (folder, *folder.parents):
        if f == root or root in f.parents:  # bytelm's own folders: this user's, closed to others
            why = unsafe_reason(f)
        else:  # the folders above: this user's or root's, and sticky if others may write
            st = f.stat()
            why = (f"{f} belongs to another user" if st.st_uid not in (0, os.getuid())
                   else f"{f} is writable by other users and not sticky"
                   if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX else None)
        if why:
            return why
    return None


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _damage(path: Path) -> str | None:
    """Why the cached library at `path` must be rebuilt (no record, or contents that don't match it), or None."""
    from bytelm.files import unsafe_reason

    record = _record(path)
    if not record.exists():
        return "no checksum recorded"
    for f in (path, record):
        why = unsafe_reason(f) or (None if stat.S_ISREG(f.lstat().st_mode) else f"{f} is not a regular file")
        if why:
            raise PermissionError(why)  # refused, not rebuilt: someone else may have put it there
    recorded = record.read_text(errors="replace").strip()
    if hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        return "its checksum does not match (cut short or damaged)"
    return None


def _build(compiler: str, path: Path, sources: list[Path], flags: list[str]) -> None:
    """Compile the sources into `path`, with its checksum recorded, both fsynced and renamed into place."""
    from bytelm.files import atomic_write

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".build", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, *map(str, sources), "-o", tmp, "-lm"], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        data = Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)
    atomic_write(_record(path), lambda f: f.write(hashlib.sha256(data).hexdigest().encode() + b"\n"), mode=0o600)
    atomic_write(path, lambda f: f.write(data), mode=0o700)


def _bind(lib: ctypes.CDLL) -> None:
    """Declare the entry points' signatures, and check that DecodeStep and DecodeRow match the C structs."""
    lib.bytelm_decode_step_size.restype = ctypes.c_size_t
    lib.bytelm_decode_step_size.argtypes = []
    if lib.bytelm_decode_step_size() != ctypes.sizeof(DecodeStep):
        raise ImportError(f"DecodeStep is {ctypes.sizeof(DecodeStep)} bytes in Python but "
                          f"{lib.bytelm_decode_step_size()} in C: bytelm/infer/native.py and decode_step.c disagree")
    lib.bytelm_decode_row_size.restype = ctypes.c_size_t
    lib.bytelm_decode_row_size.argtypes = []
    if lib.bytelm_decode_row_size() != ctypes.sizeof(DecodeRow):
        raise ImportError(f"DecodeRow is {ctypes.sizeof(DecodeRow)} bytes in Python but "
                          f"{lib.bytelm_decode_row_size()} in C: bytelm/infer/native.py and decode_step.c disagree")
    lib.bytelm_decode_step.restype = ctypes.c_int
    lib.bytelm_decode_step.argtypes = [ctypes.POINTER(DecodeStep), ctypes.c_int, ctypes.c_int]
    lib.bytelm_decode_rows.restype = ctypes.c_int
    lib.bytelm_decode_rows.argtypes = [ctypes.POINTER(DecodeStep), ctypes.POINTER(DecodeRow), ctypes.c_int]
    lib.bytelm_decode_max_rows.restype = ctypes.c_int
    lib.bytelm_decode_max_rows.argtypes = []
    lib.bytelm_half_supported.restype = ctypes.c_int
    lib.bytelm_half_supported.argtypes = []
    lib.bytelm_sample.restype = ctypes.c_int
    lib.bytelm_sample.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                                  ctypes.c_float, ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_double]


def _unavailable(state: str, detail: str, warn: bool) -> None:
    _state.update(state=state, path=None, detail=detail)
    if warn:
        print(f"bytelm: warning: {detail}", file=sys.stderr)


def load_cached(compiler: str, name: str, sources: list[Path], headers: list[Path],
                flags: list[str]) -> tuple[ctypes.CDLL, Path, bool]:
    """Verify (rebuilding if damaged or missing) and load the cached library `name` built from `sources` with
    `flags`; returns (library, its path, whether it was compiled now). Raises on any failure. Other C libraries
    of the package are built and loaded through here too (build_library)."""
    from bytelm.files import private_dir

    folder = private_dir(cache_dir())
    why = _untrusted_folders(folder)
    if why:
        raise PermissionError(why)
    path = folder / f"{name}-{_cache_key(compiler, sources + headers, flags)}.so"
    damage = _damage(path) if path.exists() else "not built yet"
    if damage:
        if path.exists():
            print(f"bytelm: the cached C library {path} was damaged ({damage}); rebuilding it", file=sys.stderr)
        _build(compiler, path, sources, flags)
        if _damage(path):  # only a file changed under us gets here
            raise OSError(f"{path} changed while it was being built")
    return ctypes.CDLL(str(path)), path, bool(damage)


_built: dict[tuple[str, tuple[str, ...]], ctypes.CDLL] = {}


def build_library(name: str, source: Path, flags: list[str], what: str) -> ctypes.CDLL:
    """Another C library of the package (the compression step, the coder), built from one `source` with `flags`
    once per process and cached like the decode step's; BytelmError (one line) where no compiler or no build
    can be had. `what` names it in those lines, e.g. "the context-mixing coder"."""
    from bytelm.errors import BytelmError

    key = (name, tuple(flags))
    if key in _built:
        return _built[key]
    cc = compiler()
    if cc is None:
        raise BytelmError(f"compression needs a C compiler ({', '.join(_COMPILERS)}) to build {what}, and none was "
                          "found: install one (e.g. apt-get install gcc)")
    try:
        lib = load_cached(cc, name, [source], [], list(flags))[0]
    # RuntimeError: no home folder for the cache; SubprocessError: the compiler failed or hung
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()
        raise BytelmError(f"could not build or load {what} with {cc}: {detail[0] if detail else e}") from None
    _built[key] = lib
    return lib


def _load(compiler: str) -> ctypes.CDLL:
    lib, path, compiled = load_cached(compiler, "decode_step", SOURCES, HEADERS, _FLAGS)
    _bind(lib)
    _state.update(state="compiled" if compiled else "loaded from cache", path=str(path), detail="")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, built once per machine; None where it can't be had (status() says why)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("BYTELM_NATIVE", "1") == "0":
        _unavailable("off", "off (BYTELM_NATIVE=0)", warn=False)
        return None
    cc = compiler()
    if cc is None:
        _unavailable("no compiler", f"no C compiler found ({', '.join(_COMPILERS)})", warn=False)
        return None
    try:
        _lib = _load(cc)
    # RuntimeError: Path.home() with no home folder to put the cache in
    except (OSError, subprocess.SubprocessError, AttributeError, ImportError, RuntimeError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip()
        reason = detail.splitlines()[0] if detail else str(e)
        _unavailable("unavailable", f"the C library is unavailable ({type(e).__name__}: {reason}); "
                                    "using the slower torch decode step (BYTELM_NATIVE=0 silences this)", warn=True)
    return _lib


def status() -> str:
    """One line: whether the C library is in use, and if not, why."""
    s = _state
    return f"{s['state']}: {s['path']}" if s["path"] else s["detail"] or s["state"]


def describe() -> dict:
    """What `bytelm env` shows: the state ("compiled", "loaded from cache", "off", "no compiler",
    "unavailable", "not loaded yet"), the library's path, the reason when there is none, the compiler, the
    cache folder."""
    return {**_state, "compiler": compiler(), "cache": str(cache_dir())}

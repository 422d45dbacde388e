"""Device and precision choice: CUDA when present, else CPU; bf16 only where it is actually fast.

Why not always bf16 on CPU: without AVX512-BF16 or AMX the CPU has no bf16 dot-product instructions, and
PyTorch's bf16 matmul falls back to a slow path: a 2048x2048 product ran 360x slower than in fp32 on an AVX2-only
EPYC (dev/LOG.md). On CPUs with avx512_bf16 the same product runs about 4x faster than fp32, so there bf16 is
the default.

The CPU's model name and feature flags are read here, once (cpu_model, cpu_flags), for every part that needs
them: the dtype choice, the native library's cache key, `bytelm env` and the benchmarks.

Threads: `set_threads(n)` sets torch's CPU threads for every command and returns (count, why): --threads N
where given, else OMP_NUM_THREADS (torchrun sets it), else every core this process may run on, less the cores
that other processes are keeping busy right now (`busy_cores`: a 0.2 s sample of /proc/stat). Not the load
average: it is a lagging one-minute mean, about 1 for a minute after any command ends, so it made an idle
2-core machine train on one thread (issue 33).

Memory: `require_memory(parts, device)` is the one memory gate: every check (the model, its rotary tables, KV
caches, the decode step's weights, a training step, data batches) asks it, before allocating, and it refuses
in one line, naming what asks for it and in binary units (bytelm.memory.format_bytes), an allocation that a
config, a checkpoint or a flag asks for and that cannot fit. The limit is the
CPU's (bytelm.memory.memory_limit: physical memory, `ulimit -v`, the cgroup's limit) or the GPU's free memory,
or BYTELM_MAX_MEMORY (bytes, or a number with K, M, G or T) where that is set.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import time

import torch

from bytelm.errors import BytelmError
from bytelm.memory import format_bytes, memory_limit


def pick_device(name: str | None = None) -> torch.device:
    """'cuda', 'cpu', 'cuda:1', 'mps' where present, or None for CUDA when available, else CPU. Anything else
    (meta, xla, a GPU that is not here) is a BytelmError: torch would accept the name and fail later."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise BytelmError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BytelmError(f"device {name!r} asked for, but no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BytelmError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise BytelmError(f"device {name!r} asked for, but this machine has no MPS (Apple GPU); use --device cpu")
    elif dev.type != "cpu":
        raise BytelmError(f"device {name!r} is not supported: use cpu, cuda or cuda:N"
                          + (" (meta tensors hold no data to compute with)" if dev.type == "meta" else ""))
    elif dev.index not in (None, 0):
        raise BytelmError(f"device {name!r}: there is one CPU device, cpu (use --threads for more cores)")
    return dev


_FAST_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo (Linux: "flags" on x86, "Features" on
    ARM); elsewhere the platform's processor name and no flags."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                elif not line.strip() and model and flags:
                    break  # the end of the first CPU's block
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 7B13'."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (e.g. 'avx2', 'avx512_bf16'); empty off Linux."""
    return _cpuinfo()[1]


def cpu_has_fast_bf16() -> bool:
    """True if this CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & _FAST_BF16_FLAGS)


def dtype_choice(device: torch.device) -> tuple[str, str]:
    """(dtype, why): the autocast precision training picks for `device` ('bf16' or 'fp32') and the reason."""
    env = os.environ.get("BYTELM_DTYPE")
    if env in ("bf16", "fp32"):
        return env, f"BYTELM_DTYPE={env}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "this GPU supports bf16"
        return "fp32", "this GPU has no bf16 support"
    if cpu_has_fast_bf16():
        found = " and ".join(sorted(cpu_flags() & _FAST_BF16_FLAGS))
        return "bf16", f"this CPU has native bf16 dot products ({found})"
    return "fp32", "this CPU has no native bf16 dot products (avx512_bf16 or amx_bf16), where bf16 is far slower"


def default_dtype(device: torch.device) -> str:
    """The fastest autocast precision for `device`: 'bf16' or 'fp32'. BYTELM_DTYPE overrides."""
    return dtype_choice(device)[0]


def autocast(device: torch.device, dtype: str):
    """Autocast context for 'bf16'; a no-op context for 'fp32'. Master weights stay fp32 either way."""
    if dtype not in ("bf16", "fp32"):
        raise BytelmError(f"unknown dtype {dtype!r}: use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# torch's own default (one thread per physical core), read before any command changes it: on a CPU with SMT
# the affinity mask counts both hardware threads of a core, and a second OpenMP thread per core only waits.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, a container's cpuset), at most one per
    physical core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, _TORCH_DEFAULT_THREADS))


def _cpu_times() -> tuple[int, int, int] | None:
    """(busy jiffies, all jiffies, CPUs) of the whole machine from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(v) for v in lines[0].split()[1:]]  # user nice system idle iowait irq softirq steal ...
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8]), cpus


def busy_cores(seconds: float = 0.2) -> float | None:
    """Cores that other processes kept busy over the next `seconds` (this process sleeps meanwhile), measured
    from /proc/stat; None where it cannot be read. Steal time counts as busy: the hypervisor gave it away."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * after[2]


def thread_choice(requested: int = 0) -> tuple[int, str]:
    """(threads, why) for torch on the CPU: `requested` (--threads) if not 0, else OMP_NUM_THREADS where set,
    else every usable core less those other processes keep busy now.

    Why leave busy cores out: OpenMP threads wait for each other at every parallel region, so one thread that
    shares its core with another busy process stalls them all (on the 2-core EPYC with one other job running,
    the default model's step took 2-14 s on 2 threads and a steady 0.95 s on 1; dev/LOG.md)."""
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    cores = usable_cores()
    every = "every core this process may run on; --threads N sets another count"
    busy = busy_cores() if cores > 1 else None
    if busy is None or busy < 0.5:
        return cores, every
    free = max(1, cores - int(busy + 0.5))
    if free == cores:
        return cores, every
    return free, (f"other processes kept {busy:.1f} of the {cores} cores busy just now, and a thread on a busy "
                  "core stalls the others; --threads N sets another count")


def set_threads(n: int, zero_is_automatic: bool = False) -> tuple[int, str]:
    """Set torch's CPU threads from a command line's --threads and return (count, why): 1 to this machine's
    CPUs (a huge count crashed torch's thread pool), or 0 for thread_choice()'s automatic count where the
    command allows it."""
    cpus = os.cpu_count() or 1
    low = 0 if zero_is_automatic else 1
    if not (isinstance(n, int) and low <= n <= cpus):
        auto = "; 0 picks the free cores" if zero_is_automatic else ""
        raise BytelmError(f"--threads must be between {low} and {cpus} (this machine's CPUs{auto}), got {n}")
    n, why = thread_choice(n)
    torch.set_num_threads(n)
    return n, why


def _parse_size(text: str) -> int:
    """'8G', '512M', '1.5GiB', '1000000' -> bytes (K, M, G, T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise BytelmError(f"BYTELM_MAX_MEMORY must be a size such as 8G, 512M or 1000000, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def memory_available(device: torch.device | str = "cpu") -> tuple[int | None, str]:
    """(bytes that may be allocated on `device`, what sets that), or (None, ...) where no limit is known:
    BYTELM_MAX_MEMORY where set, else free CUDA memory, or the CPU's limit (bytelm.memory.memory_limit)."""
    env = os.environ.get("BYTELM_MAX_MEMORY")
    if env:
        return _parse_size(env), "BYTELM_MAX_MEMORY"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    if device.type != "cpu":
        return None, "unknown"
    return memory_limit()


def require_memory(parts: list[tuple[str, int]], device: torch.device | str = "cpu", *, what: str = "this",
                   share: float = 1.0, fix: str = "", error: type[BytelmError] = BytelmError) -> None:
    """The one memory gate: raise `error` in one line, naming the largest parts, unless allocations `parts`
    [(what it is and the fields that size it, bytes), ...] fit in `share` of what `device` allows
    (memory_available: BYTELM_MAX_MEMORY, else the GPU's free memory or the CPU's limit, cgroups included).
    Call it before allocating: one clear line, instead of an allocator's traceback or the kernel's OOM killer.
    `what` names the whole ("one training step"); `fix` says what to change ("lower batch_size")."""
    need = sum(n for _, n in parts)
    limit, source = memory_available(device)
    if limit is None or need <= limit * share:
        return
    detail = "; ".join(f"{part}: {format_bytes(n)}" for part, n in sorted(parts, key=lambda p: -p[1]) if n)
    detail = "" if [p for p, _ in parts] == [what] else f" ({detail})"  # a lone part named as the whole
    room = f"the {format_bytes(limit)}" if share == 1 else f"{share:.0%} of the {format_bytes(limit)}"
    raise error(f"{what} needs {format_bytes(need)} of {torch.device(device).type} memory{detail}, "
                f"over {room} allowed by {source}"
                + ("" if source == "BYTELM_MAX_MEMORY" else " (BYTELM_MAX_MEMORY sets another limit)")
                + (f"; {fix}" if fix else ""))

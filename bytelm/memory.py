"""How much memory this process may use, read from the machine and its limits, so sizes a flag or a file asks
for can be refused with one clear line before anything is allocated.

    from bytelm.memory import memory_limit, format_bytes
    limit, source = memory_limit()        # e.g. (25_000_000_000, "physical memory"), or (None, ...) if unknown
    format_bytes(3 << 30)                 # '3.0 GiB'

The limit is the smallest of physical memory, what the RLIMIT_AS / RLIMIT_DATA soft limits (`ulimit -v` /
`-d`) leave free, and the cgroup's memory limit (containers, systemd units): past any of them an allocation
fails or the kernel kills the process.
"""
from __future__ import annotations

import os
from pathlib import Path

_CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def _physical() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX, or the name is unknown here
        return None


def _mapped() -> dict[str, int]:
    """What this process has mapped already, per limit it counts against (Linux; else nothing)."""
    try:
        fields = [int(x) for x in Path("/proc/self/statm").read_text().split()]
        page = os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return {}
    return {"RLIMIT_AS": fields[0] * page, "RLIMIT_DATA": fields[5] * page}  # total size; data + stack


def _rlimits() -> list[tuple[int, str]]:
    """(bytes still free under the limit, its name) for each soft limit that is set."""
    try:
        import resource
    except ImportError:
        return []
    out, mapped = [], _mapped()
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        if hasattr(resource, name):
            soft, _ = resource.getrlimit(getattr(resource, name))
            if soft != resource.RLIM_INFINITY and soft > 0:
                out.append((max(0, soft - mapped.get(name, 0)), f"{name}, less what is mapped already"))
    return out


def _cgroup() -> int | None:
    for path in _CGROUP_FILES:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's "no limit" (a huge number)
            return int(text)
    return None


def memory_limit() -> tuple[int | None, str]:
    """(bytes, what sets the limit), the smallest of those in the module docstring; (None, "unknown")."""
    found = [(n, "physical memory") for n in (_physical(),) if n]
    found += _rlimits()
    found += [(n, "cgroup memory limit") for n in (_cgroup(),) if n]
    return min(found) if found else (None, "unknown")


def format_bytes(n: int) -> str:
    """n bytes with a binary unit: '512 B', '1.5 MiB', '3.0 GiB', '16.0 TiB'."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"

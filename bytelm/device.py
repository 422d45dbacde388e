"""Device and precision choice: CUDA when present, else CPU; bf16 only where it is actually fast.

Why not always bf16 on CPU: without AVX512-BF16 or AMX the CPU has no bf16 dot-product instructions, and
PyTorch's bf16 matmul falls back to a slow path: a 2048x2048 product ran 360x slower than in fp32 on an AVX2-only
EPYC (dev/LOG.md). On CPUs with avx512_bf16 the same product runs about 4x faster than fp32, so there bf16 is
the default.

The CPU's model name and feature flags are read here, once (cpu_model, cpu_flags), for every part that needs
them: the dtype choice, the native library's cache key, `bytelm env` and the benchmarks.
"""
from __future__ import annotations

import functools
import os
import platform

import torch

from .errors import BytelmError


def pick_device(name: str | None = None) -> torch.device:
    """'cuda', 'cpu', 'cuda:1', or None for CUDA when available, else CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BytelmError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BytelmError(f"device {name!r} asked for, but no CUDA GPU is available here; use --device cpu")
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

"""Device and precision choice: CUDA when present, else CPU; bf16 only where it is actually fast.

Why not always bf16 on CPU: without AVX512-BF16 or AMX the CPU has no bf16 dot-product instructions, and
PyTorch's bf16 matmul falls back to a slow path. Measured on a 2-core AMD EPYC with AVX2 only (2026-11-28,
/tmp/mm.py: 2048x2048 matmul): fp32 123 GFLOP/s, bf16 0.34 GFLOP/s, i.e. 360x slower. On CPUs with
avx512_bf16 the same product runs about 4x faster than fp32, so there bf16 is the default.
"""
from __future__ import annotations

import functools
import os

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


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True if this CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def default_dtype(device: torch.device) -> str:
    """The fastest autocast precision for `device`: 'bf16' or 'fp32'. BYTELM_DTYPE overrides."""
    env = os.environ.get("BYTELM_DTYPE")
    if env in ("bf16", "fp32"):
        return env
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, dtype: str):
    """Autocast context for 'bf16'; a no-op context for 'fp32'. Master weights stay fp32 either way."""
    if dtype not in ("bf16", "fp32"):
        raise BytelmError(f"unknown dtype {dtype!r}: use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

"""`bytelm env`: what a bug report needs, in one place (the convention of `python -m torch.utils.collect_env`).

    bytelm env           # one aligned line per item: versions, device and dtype (and why), C library, cache
    bytelm env --json    # the same as JSON, for scripts

Like a first generation, it builds the C library if the cache has none (or loads it), since whether that works
is one of the things it reports.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from bytelm.cli.terminal import text_stdout

# CPU features bytelm's speed depends on: the C decode step's vector code (AVX2 and FMA; F16C for fp16 weights)
# and the dtype choice (native bf16 dot products); on ARM, their counterparts.
RELEVANT_CPU_FLAGS = {"x86": ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16"),
                      "arm": ("asimd", "asimdhp", "sve", "bf16")}
# Environment variables that change what bytelm does.
SETTINGS = ("BYTELM_CACHE", "BYTELM_NATIVE", "BYTELM_DTYPE", "CC", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
            "XDG_CACHE_HOME")


def _compiler_version(compiler: str | None) -> str | None:
    """The first line of `compiler --version`, or None."""
    if not compiler or not shutil.which(compiler):
        return None
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def collect() -> dict:
    """Everything `bytelm env` prints, as plain data."""
    import numpy
    import torch

    import bytelm
    from bytelm.infer import native
    from bytelm.device import cpu_flags, cpu_model, dtype_choice, pick_device, thread_choice
    from bytelm.files import cache_root

    device = pick_device(None)
    dtype, dtype_reason = dtype_choice(device)
    lib = native.library()
    library = native.describe()
    library["compiler_version"] = _compiler_version(library["compiler"])
    library["fp16_weights"] = bool(lib.bytelm_half_supported()) if lib is not None else None
    flags = cpu_flags()
    threads, threads_reason = thread_choice()
    return {
        "bytelm": bytelm.__version__,
        "bytelm_path": str(Path(bytelm.__file__).resolve().parent),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "numpy": numpy.__version__,
        "device": str(device),
        "dtype": dtype,
        "dtype_reason": dtype_reason,
        "torch_threads": threads,
        "threads_reason": threads_reason,
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_flags": {name: name in flags for name in RELEVANT_CPU_FLAGS["x86" if "sse2" in flags else "arm"]}
        if flags else None,
        "native": library,
        "cache": str(cache_root()),
        "settings": {name: os.environ[name] for name in SETTINGS if name in os.environ},
    }


def _native_line(lib: dict) -> str:
    line = f"{lib['state']}: {lib['path']}" if lib["path"] else lib["detail"] or lib["state"]
    extras = [lib["compiler_version"] or lib["compiler"] or ""]
    if lib["fp16_weights"] is not None:
        extras.append(f"fp16 weights {'yes' if lib['fp16_weights'] else 'no (no F16C)'}")
    extras = [e for e in extras if e]
    return line + (f" ({'; '.join(extras)})" if extras else "")


def render(info: dict) -> str:
    """The aligned text form of collect()'s dict."""
    if info["gpus"]:
        device = f"{info['device']} ({', '.join(info['gpus'])})"
    else:
        device = f"{info['device']} (no CUDA GPU available)" if info["device"] == "cpu" else info["device"]
    flags = info["cpu_flags"]
    cpu = info["cpu"] + ("; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) if flags
                         else "; feature flags unknown (no /proc/cpuinfo)")
    rows = [
        ("bytelm", f"{info['bytelm']} ({info['bytelm_path']})"),
        ("python", f"{info['python']} ({info['python_executable']})"),
        ("platform", info["platform"]),
        ("torch", f"{info['torch']} (CPU capability {info['torch_cpu_capability']}; "
                  f"CUDA {info['cuda'] or 'none'})"),
        ("numpy", info["numpy"]),
        ("device", device),
        ("dtype", f"{info['dtype']} for training: {info['dtype_reason']}"),
        ("threads", f"{info['torch_threads']} for train, score and compress now ({info['threads_reason']}); "
                    f"{info['cores']} cores"),
        ("cpu", cpu),
        ("C library", _native_line(info["native"])),
        ("cache", info["cache"]),
        ("settings", " ".join(f"{k}={v}" for k, v in info["settings"].items()) or "none"),
    ]
    return "\n".join(f"{name:<10} {value}" for name, value in rows)


def main(argv: Sequence[str] | None = None, prog: str = "bytelm env") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="print versions, device, dtype, C library and cache "
                                                            "for a bug report")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    out = text_stdout()  # a closed stdout (`>&-`) is one line, as for every command that prints
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

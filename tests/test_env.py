"""`bytelm env` (bytelm/cli/env.py): the lines a bug report needs, as text and as JSON, and what they say
when the C library is built, loaded from the cache, or switched off."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAS_COMPILER = any(shutil.which(c) for c in ("gcc", "cc", "clang"))


def bytelm_env(cache: Path, *args: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("BYTELM_NATIVE", "BYTELM_DTYPE")}
    full_env.update(BYTELM_CACHE=str(cache), **env)
    return subprocess.run([sys.executable, "-m", "bytelm.cli", "env", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=300)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the C library line would say so instead")
def test_env_prints_versions_device_dtype_library_and_cache(tmp_path):
    first = bytelm_env(tmp_path)
    assert first.returncode == 0, first.stderr
    lines = dict(line.split(None, 1) if not line.startswith("C library") else ("C library", line[10:].strip())
                 for line in first.stdout.splitlines())
    for label in ("bytelm", "python", "platform", "torch", "numpy", "device", "dtype", "threads", "cpu",
                  "C library", "cache", "settings"):
        assert lines.get(label), (label, first.stdout)
    import numpy
    import torch

    import bytelm
    from bytelm.device import default_dtype, pick_device
    assert lines["bytelm"].startswith(bytelm.__version__)
    assert lines["torch"].startswith(torch.__version__) and lines["numpy"] == numpy.__version__
    assert lines["dtype"].startswith(f"{default_dtype(pick_device(None))} for training: ")  # and why
    assert lines["threads"].endswith(f"{os.cpu_count()} cores")
    assert lines["C library"].startswith(f"compiled: {tmp_path / 'native'}/decode_step-")
    assert lines["cache"] == str(tmp_path)
    assert f"BYTELM_CACHE={tmp_path}" in lines["settings"]
    second = bytelm_env(tmp_path)
    assert "C library  loaded from cache: " in second.stdout


def test_env_json_says_why_there_is_no_c_library_and_which_dtype(tmp_path):
    done = bytelm_env(tmp_path, "--json", BYTELM_NATIVE="0", BYTELM_DTYPE="fp32")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["native"]["state"] == "off" and info["native"]["path"] is None
    assert info["native"]["detail"] == "off (BYTELM_NATIVE=0)"
    assert (info["dtype"], info["dtype_reason"]) == ("fp32", "BYTELM_DTYPE=fp32")
    assert info["settings"]["BYTELM_NATIVE"] == "0" and info["cache"] == str(tmp_path)
    assert info["python"] and info["torch"] and info["numpy"] and info["device"] in ("cpu", "cuda")
    assert isinstance(info["torch_threads"], int) and info["torch_threads"] >= 1
    assert not (tmp_path / "native").exists()  # switched off: nothing was built


def test_env_with_a_closed_stdout_is_one_line_and_exit_1(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bytelm.cli", "env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=REPO, env={**os.environ, "BYTELM_CACHE": str(tmp_path)}, timeout=120,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1, r.stderr
    assert b"standard output is closed" in r.stderr

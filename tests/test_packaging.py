"""A wheel built from the repository, installed outside it, imports, and builds and loads the C library: every
file the native build reads is shipped (bytelm/infer/csrc/*.h was not, and every non-editable install silently lost
the C decode step and sampler)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAS_COMPILER = any(shutil.which(c) for c in ("gcc", "cc", "clang"))


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of what setuptools reads (pyproject.toml, README.md, bytelm/), so the build's
    own folders (build/, *.egg-info) never land in the checkout. Offline: no build isolation, no index."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "bytelm", src / "bytelm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("bytelm-*.whl")
    return wheel


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the installed package would use the torch step")
def test_installed_wheel_builds_and_loads_the_c_library(tmp_path):
    wheel = build_wheel(tmp_path)
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    from bytelm.infer.native import HEADERS, SOURCES
    for path in SOURCES + HEADERS:  # every file the build reads, shipped
        assert (site / "bytelm" / "infer" / "csrc" / path.name).is_file(), path.name
    from bytelm.codec.model_step import SOURCE
    assert (site / "bytelm" / "codec" / "csrc" / SOURCE.name).is_file()  # the compression step's
    from bytelm.export.hf import CODE_FILES
    for name in CODE_FILES:  # the code `bytelm export --format hf` copies into its folder
        assert (site / "bytelm" / "export" / "hf_code" / name).is_file(), name

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("BYTELM_NATIVE", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), BYTELM_CACHE=str(tmp_path / "cache"))
    code = ("import json, bytelm\nfrom bytelm.cli.env import collect\n"
            "print(json.dumps(dict(file=bytelm.__file__, **collect())))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    installed = Path(info["file"]).resolve()
    assert installed.is_relative_to(site.resolve()) and not installed.is_relative_to(REPO), installed
    assert info["native"]["state"] == "compiled", info["native"]
    assert Path(info["native"]["path"]).is_relative_to(tmp_path / "cache")
    assert done.stderr == ""  # no warning: the build worked

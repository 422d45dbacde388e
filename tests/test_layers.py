"""The package's layers (pyproject.toml [tool.importlinter]): checked with import-linter's own command, so the
next change that imports upward fails here, and shown to fail on a deliberate upward import.

Layers: core <- data <- train; core <- infer <- codec <- serve <- cli; nothing in the package imports cli/.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter (the dev extra) is not installed")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `root`, with that copy first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo", str(root / "pyproject.toml")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_every_import_points_down_the_layers():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "BROKEN" not in r.stdout, r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check is not vacuous: core's config importing the command lines is refused, naming the import."""
    shutil.copytree(ROOT / "bytelm", tmp_path / "bytelm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    config = tmp_path / "bytelm" / "config.py"
    config.write_text(config.read_text() + "\nimport bytelm.cli  # noqa: E402,F401 - deliberately upward\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    assert "BROKEN" in r.stdout and "bytelm.config -> bytelm.cli" in r.stdout, r.stdout

"""The README's commands are the ones CI runs, so the README cannot drift from what is tested."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci_lines = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    *setup, command = ci_lines
    # Before it, .ci/run may only prepare the machine: system packages the tests need (the browser test's
    # chromium) and environment variables.
    assert all(l.startswith(("export ", "apt-get ")) for l in setup), setup
    assert command in readme_commands(), "the README's test command and .ci/run differ"


def test_readme_pins_torch_in_both_install_commands():
    installs = [c for c in readme_commands() if "pip install" in c and c.startswith("python3 -m venv")]
    assert len(installs) >= 2
    assert all("torch==2.13.0" in c for c in installs)

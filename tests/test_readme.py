"""The README's commands are the ones CI runs, so the README cannot drift from what is tested."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci_lines = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert len(ci_lines) == 1
    assert ci_lines[0] in readme_commands(), "the README's test command and .ci/run differ"


def test_readme_pins_torch_in_both_install_commands():
    installs = [c for c in readme_commands() if "pip install" in c and c.startswith("python3 -m venv")]
    assert len(installs) >= 2
    assert all("torch==2.13.0" in c for c in installs)

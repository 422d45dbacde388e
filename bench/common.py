"""Shared helpers for the bench/ scripts: machine description, matmul peak, peak RSS, the results table.

Every script ends with one call:

    report(title, table, notes, write=not args.no_write, summary=(figure, peer))

which prints the section and, with `write`, REPLACES the script's own section of docs/benchmarks.md (keyed by
the script's file name, so a rerun leaves only the latest table) and its row of the summary table at the top.
Older results live in dev/LOG.md and in git, not in the reference page.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

SUMMARY_START, SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"
SUMMARY_HEADER = ("| benchmark | bytelm | peer, same run | machine | date | command |\n"
                  "|---|---|---|---|---|---|")
DOC_HEADER = ("# Benchmarks\n\n"
              "Each section is written by the bench/ script named in it (`bench/common.py`, `report`): a rerun\n"
              "replaces that section and its summary row. Earlier runs are in dev/LOG.md and in git.\n\n"
              f"## Summary\n\n{SUMMARY_START}\n{SUMMARY_HEADER}\n{SUMMARY_END}\n")
# Settings that change what a benchmark measures; printed in front of the command so it can be rerun as it ran.
COMMAND_ENV = ("OMP_NUM_THREADS", "BYTELM_NATIVE", "BYTELM_DTYPE", "CUDA_VISIBLE_DEVICES")


def cpu_summary() -> str:
    """'AMD EPYC, 2 cores, AVX-512, native bf16': what decides the speed of a CPU benchmark here."""
    from bytelm.device import cpu_flags, cpu_has_fast_bf16, cpu_model  # the one CPU-feature reader

    flags = cpu_flags()
    if "avx512f" in flags:
        isa = "AVX-512"
    elif "avx2" in flags:
        isa = "AVX2"
    elif flags:
        isa = "no AVX2"
    else:
        isa = "vector flags unknown"
    bf16 = "native bf16" if cpu_has_fast_bf16() else "no native bf16"
    return f"{cpu_model() or 'cpu'}, {os.cpu_count()} cores, {isa}, {bf16}"


def machine() -> str:
    """One line: CPU (and GPU), torch, threads, Python, and the load at the end of the run."""
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_summary()}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"Python {platform.python_version()}; load average {load:.2f} at the end (the machine may be shared)")


def command_line() -> str:
    """The command that ran this script, from the repository root, with the settings in COMMAND_ENV."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in COMMAND_ENV if k in os.environ]
    args = [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    return " ".join([*env, "python", *(shlex.quote(a) for a in args)])


def git_revision() -> str:
    """'abc1234' or 'abc1234 + uncommitted changes'; '' outside a git checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if rev.returncode:
        return ""
    return rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def matmul_peak_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Best observed GFLOP/s of an n x n matmul in `dtype` on this machine, now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _replace_section(doc: str, key: str, section: str) -> str:
    """doc with the block between `key`'s markers replaced by `section` (appended at the end if absent)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{section.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc, count=1)
    return doc.rstrip("\n") + f"\n\n{block}\n"


def _replace_summary_row(doc: str, script: str, row: str) -> str:
    """doc with the summary row whose command runs bench/`script` replaced by `row` (added if absent)."""
    if SUMMARY_START not in doc or SUMMARY_END not in doc:
        head, sep, rest = doc.partition("\n## ")
        doc = f"{head.rstrip()}\n\n## Summary\n\n{SUMMARY_START}\n{SUMMARY_HEADER}\n{SUMMARY_END}\n" + (
            f"\n## {rest}" if sep else "")
    before, _, after = doc.partition(SUMMARY_START)
    table, _, after = after.partition(SUMMARY_END)
    rows = [line for line in table.strip().splitlines() if line.strip()]
    if len(rows) >= 2 and re.fullmatch(r"\|[\s:|-]+\|", rows[1].strip()):
        rows = rows[2:]  # the header, rewritten below
    mine = [i for i, line in enumerate(rows) if f"bench/{script} " in line.replace("`", " ")]
    if mine:
        rows[mine[0]] = row  # in place, so the summary keeps its order
        rows = [line for i, line in enumerate(rows) if i not in mine[1:]]
    else:
        rows.append(row)
    return f"{before}{SUMMARY_START}\n{SUMMARY_HEADER}\n" + "\n".join(rows) + f"\n{SUMMARY_END}{after}"


def _write_doc(update) -> None:
    """Apply update(text) -> text to docs/benchmarks.md atomically, one writer at a time."""
    from bytelm.files import atomic_write
    BENCH_DOC.parent.mkdir(exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): two benchmarks finishing at once could lose one's section
        fcntl = None
    fd = os.open(BENCH_DOC.parent, os.O_RDONLY)
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX)
        text = BENCH_DOC.read_text() if BENCH_DOC.exists() else DOC_HEADER
        new = update(text)
        atomic_write(BENCH_DOC, lambda f: f.write(new.encode()))
    finally:
        os.close(fd)


def report(title: str, table: str, notes: str = "", write: bool = True,
           summary: tuple[str, str] | None = None) -> None:
    """Print a benchmark's section; with `write`, make it the script's section of docs/benchmarks.md.

    title:   the section's heading, e.g. "Generation speed".
    table:   Markdown table(s) from markdown_table(), the peer's rows beside bytelm's, measured in this run.
    notes:   what the table needs to be read (model, settings, medians of what); optional.
    write:   False prints only (the scripts' --no-write).
    summary: (bytelm's headline figure, the peer's figure from the same run), e.g.
             ("1,924 B/s", "HF generate() 127 B/s"): replaces this script's row of the summary table.
             None leaves the row as it is.

    The section is keyed by the script's file name (bench/NAME.py -> markers `<!-- NAME:start/end -->`): the
    latest run replaces the previous one wherever it sits in the page, and a script's first run appends it.
    The section carries the date, the machine (CPU model, cores, AVX2/AVX-512, native bf16 or not; torch,
    threads), the git revision and the exact command, as typed from the repository root.
    """
    script = Path(sys.argv[0]).name
    command = command_line()
    now = datetime.datetime.now(datetime.timezone.utc)
    revision = git_revision()
    section = (f"## {title}\n\n{now:%Y-%m-%d %H:%M} UTC; {machine()}"
               + (f"; bytelm at {revision}" if revision else "")
               + f"\n\n`{command}`\n\n{table.strip()}\n" + (f"\n{notes.strip()}\n" if notes.strip() else ""))
    print("\n" + section)
    if not write:
        return
    row = None
    if summary is not None:
        figure, peer = (str(s).replace("|", "/").replace("\n", " ") for s in summary)
        anchor = re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
        row = f"| [{title}](#{anchor}) | {figure} | {peer} | {cpu_summary()} | {now:%Y-%m-%d} | `{command}` |"

    def update(text: str) -> str:
        text = _replace_section(text, Path(script).stem, section)
        return _replace_summary_row(text, script, row) if row else text
    _write_doc(update)

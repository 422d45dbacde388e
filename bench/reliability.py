"""Reliability: the long forms of the fault-injection, hostile-input and fuzz tests, counted into one table.

    python bench/reliability.py                  # ~6-8 min on 2 CPU cores; rewrites the results in docs/reliability.md
    python bench/reliability.py --quick          # a few trials of each, 20,000 files (~1.5 min), prints only
    python bench/reliability.py --kills 40 --files 200000

Every row runs the code the tests run (tests/test_fault_injection.py, test_reliability.py, test_fuzz.py), many
more times: what was tried, how many times, what happened, and what was lost (the goal is always nothing).
The results replace the part of docs/reliability.md between its `results` markers; the prose around them
explains each behaviour.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import pytest  # noqa: E402
import torch  # noqa: E402

import test_fault_injection as tfi  # noqa: E402
import test_fuzz as tfz  # noqa: E402
import test_reliability as trl  # noqa: E402
from common import machine, markdown_table  # noqa: E402
from bytelm.config import ModelConfig  # noqa: E402
from bytelm.model import ByteLM  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


class Capsys:
    """Enough of pytest's capsys for the tests run here: stdout and stderr captured while the test runs."""

    def __init__(self):
        self.out, self.err = io.StringIO(), io.StringIO()

    def readouterr(self):
        r = types.SimpleNamespace(out=self.out.getvalue(), err=self.err.getvalue())
        for s in (self.out, self.err):
            s.seek(0)
            s.truncate()
        return r


def run_test(fn, work: Path, **kwargs) -> str | None:
    """Run one test function of tests/ with fresh tmp_path, monkeypatch and capsys; None if it passed, else why."""
    tmp = Path(tempfile.mkdtemp(dir=work))
    cap = Capsys()
    params = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    fixtures = {"tmp_path": tmp, "capsys": cap, "corpus_file": CORPUS}
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(cap.out), \
                contextlib.redirect_stderr(cap.err):
            fn(**{p: kwargs[p] if p in kwargs else mp if p == "monkeypatch" else fixtures[p] for p in params})
        return None
    except pytest.skip.Exception as e:
        return f"skipped: {e}"
    except BaseException as e:  # noqa: BLE001 - everything a test can raise is a result here
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def repeat(fn, work: Path, times: int, param_sets: list[dict] | None = None) -> tuple[int, list[str]]:
    """Run a test `times` times over each of param_sets; returns (runs, failures)."""
    failures, runs = [], 0
    for _ in range(times):
        for kw in param_sets or [{}]:
            runs += 1
            why = run_test(fn, work, **kw)
            if why and not why.startswith("skipped"):
                failures.append(why)
    return runs, failures


def lost(failures: list[str]) -> str:
    return "nothing" if not failures else f"**{len(failures)} failed**: {failures[0]}"


def timed(rows: list, what: str):
    """A context that prints `what` and appends the seconds it took to the last row added inside it."""
    class T:
        def __enter__(self):
            self.t = time.perf_counter()
            print(f"... {what}", flush=True)

        def __exit__(self, *exc):
            if exc[0] is None:
                rows[-1].append(f"{time.perf_counter() - self.t:.0f} s")
    return T()


# ---------------------------------------------------------------------------------------------------------

def kills(work: Path, n: int, rows: list) -> None:
    with timed(rows, f"{n} SIGKILLs"):
        results = tfi.run_kill_trials(work / "kill", CORPUS, trials=n, seed=20240601)
        bad = [r["lost"] for r in results if r["lost"]]
        mid = sum(r["mid_save"] for r in results)
        worst = max(r["steps_of_work_lost"] for r in results)
        rows.append([f"SIGKILL of `train.py` at a random moment (0-1 s after a save; saves every step, best model "
                     f"every 5); then every checkpoint on disk loaded and `--resume` run to completion",
                     n, f"{mid} kills landed inside a checkpoint write (temp file left, then cleaned by the next "
                        f"run); at most {worst} step of work lost (the one being saved)",
                     lost([str(b) for b in bad])])


def write_errors(work: Path, n: int, rows: list) -> None:
    with timed(rows, "injected write errors"):
        params = [dict(err=e, target=t) for e in (28, 5) for t in ("last", "best")]
        runs, failures = repeat(tfi.test_a_failing_write_mid_run_keeps_the_previous_checkpoint_and_says_one_line,
                                work, n, params)
        rows.append(["ENOSPC or EIO injected inside `torch.save` (half a file written) mid-run, through the CLI, "
                     "for the resume file and the best model", runs,
                     "exit 1, one `error:` line; the previous file byte-for-byte intact; no temp file; `--resume` "
                     "works", lost(failures)])
    with timed(rows, "metrics ENOSPC"):
        runs, failures = repeat(tfi.test_a_full_disk_while_logging_metrics_is_one_line_too, work, n)
        rows.append(["ENOSPC injected into the metrics log (with a full disk, often the first write to fail)",
                     runs, "exit 1, one line naming the file; checkpoints load", lost(failures)])
    with timed(rows, "EFBIG"):
        runs, failures = repeat(tfi.test_a_real_write_error_in_a_training_process_keeps_the_old_checkpoint,
                                work, n, [dict(process="train_py", fork_server=None)])
        rows.append(["Real kernel write error (EFBIG: RLIMIT_FSIZE below the resume file's size) in a `--resume`d "
                     "training process", runs, "exit 1, one line; old resume file byte-identical and loads",
                     lost(failures)])


def full_disk(work: Path, n: int, rows: list) -> None:
    with timed(rows, "full disk"):
        rng = random.Random(7)
        outcomes, failures = [], []
        for i in range(n):
            d = work / f"disk{i}"
            d.mkdir()
            r = tfi.full_disk_trial(d, CORPUS, rng)
            if r is None:
                rows.append(["Real full disk (tmpfs)", 0, "skipped: mounting a tmpfs needs root", "-"])
                return
            first = r["stderr"].split(":")[1].strip().split()[0] if r["stderr"].count(":") > 1 else "?"
            outcomes.append("checkpoint" if "checkpoint" in r["stderr"] else
                            "plot" if "loss.png" in r["stderr"] else "metrics" if "metrics" in r["stderr"] else first)
            ok = (r["rc"] == 1 and r["stderr"].count("\n") == 1 and "Traceback" not in r["stderr"]
                  and "No space left" in r["stderr"] and r["best_loads"] and r["last_loads"] and not r["temps"])
            if not ok:
                failures.append(json.dumps({k: str(v)[:200] for k, v in r.items()}))
        counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
        rows.append(["Real full disk: training on a 4 MB tmpfs that another program fills at a random moment",
                     n, "exit 1, one line each; first write to fail: "
                        + ", ".join(f"{k} {v}x" for k, v in counts.items()) + "; both checkpoints load",
                     lost(failures)])


def two_runs(work: Path, n: int, rows: list) -> None:
    with timed(rows, "two runs"):
        runs, failures = repeat(tfi.test_a_second_run_at_the_same_out_is_refused_while_the_first_finishes, work, n,
                                [dict(second="train_py", fork_server=None)])  # both real train.py processes
        rows.append(["A second `train.py --force` at the same `--out` while the first runs", runs,
                     "refused at once: exit 1, `another training run (PID n) is writing ...`; the first finishes, "
                     "its log has one writer and its checkpoints load", lost(failures)])


def numerics(work: Path, rows: list) -> None:
    with timed(rows, "NaN/Inf"):
        cases = [(tfi.test_an_infinite_loss_stops_training_and_keeps_the_last_good_checkpoint, [
                     dict(bad=float("inf")), dict(bad=float("-inf"))]),
                 (tfi.test_weights_made_non_finite_by_an_optimizer_step_are_never_saved, None),
                 (tfi.test_a_real_divergence_through_the_cli_is_one_line_and_keeps_finite_weights, None)]
        import test_training  # the existing NaN test
        cases.append((test_training.test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint,
                      None))
        runs, failures = 0, []
        for fn, params in cases:
            r, f = repeat(fn, work, 1, params)
            runs, failures = runs + r, failures + f
        rows.append(["NaN loss, +Inf and -Inf loss, an optimizer step that makes a weight inf (caught before the "
                     "save right after it), a real divergence (learning rates 1e30)", runs,
                     "stopped with `training diverged: ...` naming the step, the last good files and lower "
                     "learning rates; saved weights all finite", lost(failures)])


def hostile(work: Path, rows: list) -> None:
    """Each hostile file loaded in a fresh process: bytelm's load_model, and plain torch.load for comparison."""
    with timed(rows, "hostile files"):
        d = work / "hostile"
        d.mkdir()
        entries = trl.plain_tensor_zip(d / "bomb.pt")
        name = next(k for k in entries if k.endswith("data/0"))
        entries[name.replace("data/0", "data.pkl")] = trl._tensor_pickle_with((1 << 30) // 4, (1 << 30) // 4)
        trl.write_zip(d / "bomb.pt", entries, big={name: 1 << 30})
        big = ModelConfig(n_layer=4, n_head=16, n_embd=4096, block_size=64)
        trl.expanded_checkpoint(d / "expand.pt", big)
        with torch.device("meta"):
            would = sum(p.numel() for p in ByteLM(big).parameters()) * 4
        entries = trl.plain_tensor_zip(d / "liar.pt")
        entries[next(k for k in entries if k.endswith("data.pkl"))] = trl._tensor_pickle_with(10**10, 10)
        trl.write_zip(d / "liar.pt", entries)
        script = ("import resource, sys, time, torch\nfrom bytelm.checkpoint import load_model\n"
                  "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nt = time.perf_counter()\n"
                  "try:\n    (load_model if sys.argv[2] == 'bytelm' else lambda p: torch.load(p, weights_only=True))"
                  "(sys.argv[1])\n    r = 'loaded'\nexcept Exception as e:\n    r = 'refused: ' + str(e)[:150]\n"
                  "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024, "
                  "round(time.perf_counter() - t, 2), r)\n")
        for label, path, note in [
                ("zip bomb: 1 GiB of zeros deflated into the tensor entry", d / "bomb.pt", ""),
                ("stride-0 weights: every shape a 4x16x4096 model needs, over one float each", d / "expand.pt",
                 f"without the check, load_model allocated the model: {would / 2**30:.1f} GiB"),
                ("a storage declaring 40 GB over 40 bytes of data", d / "liar.pt", "")]:
            out = {}
            for who in ("torch.load", "bytelm"):
                r = subprocess.run([sys.executable, "-c", script, path.name, who], capture_output=True, text=True,
                                   timeout=300, cwd=d, env={**os.environ, "PYTHONPATH": str(ROOT)})
                mb, sec, result = r.stdout.split(" ", 2) if r.returncode == 0 else ("?", "?", r.stderr[-200:])
                out[who] = (mb, sec, result.strip())
            ok = out["bytelm"][2].startswith("refused") and out["bytelm"][0] != "?" and int(out["bytelm"][0]) < 100
            rows.append([f"{label} ({path.stat().st_size:,}-byte file)", 1,
                         f"bytelm: {out['bytelm'][2]} (+{out['bytelm'][0]} MB peak RSS, {out['bytelm'][1]} s); "
                         f"plain `torch.load(weights_only=True)`: {out['torch.load'][2].split(':')[0]} "
                         f"(+{out['torch.load'][0]} MB)" + (f"; {note}" if note else ""),
                         "nothing" if ok else "**not refused**"])
        payloads = list(trl._payloads("x"))
        runs, failures = repeat(trl.test_code_in_any_pickle_form_is_refused_and_never_runs, work, 1,
                                [dict(name=n) for n in payloads])
        rows.append([f"Pickle payloads ({', '.join(payloads)}), raw and as a torch zip's data.pkl", runs,
                     "all refused; the payload's marker file never created", lost(failures)])
        marks = [m for m in getattr(trl.test_absurd_configs_are_refused_naming_the_field, "pytestmark", [])
                 if m.name == "parametrize"]
        cases = [dict(change=c, field=f) for c, f in marks[0].args[1]]
        runs, failures = repeat(trl.test_absurd_configs_are_refused_naming_the_field, work, 1, cases)
        extra = repeat(trl.test_a_config_that_is_not_a_mapping_of_names_is_refused, work, 1,
                       [dict(model_config=m) for m in ([1, 2], "n_layer=2", None, {1: 2})])
        rows.append(["Absurd configs (" + ", ".join(", ".join(f"{k}={v!r}" for k, v in c["change"].items())
                                                    for c in cases) + "; or not a mapping)",
                     runs + extra[0], "each refused naming the field, before any allocation",
                     lost(failures + extra[1])])


def damaged(work: Path, n: int, rows: list) -> None:
    with timed(rows, f"{n} damaged checkpoints"):
        d = work / "damaged"
        d.mkdir()
        c = tfz.run_damaged_checkpoints(d, trials=n, seed=99)
        rows.append(["Damaged checkpoints: random bit flips (anywhere, in the pickle, in the zip directory), "
                     "truncation, zeroed runs, spliced chunks", n,
                     f"{c['refused']:,} refused with one line; {c['loaded']:,} loaded with the original weights "
                     f"(damage in bytes nothing reads); {c['silent']} loaded different weights; {c['crash']} other "
                     "exceptions", lost(c["examples"])])


def fuzz(work: Path, n: int, pipes: int, rows: list) -> None:
    counts = {}

    def counting(check):
        @functools.wraps(check)
        def f(*a, **k):
            counts[check.__name__] = counts.get(check.__name__, 0) + 1
            return check(*a, **k)
        return f

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for label, check, strategies, happened in [
                ("Interactive prompt: sequences of 1-12 random lines (commands with random values, Unicode, "
                 "control characters, invalid UTF-8, lone surrogates, empty lines, `//` escapes)",
                 tfz.check_line_sequence, tfz.LINE_SEQUENCES,
                 "no exception, no traceback; every setting always in its range, and only the command's own "
                 "setting changed (or all, for /reset); every other line sent as a prompt unchanged"),
                ("Interactive prompt: one random prompt line, generated for real (terminal and pipe modes)",
                 tfz.check_prompt_line, tfz.PROMPT_LINES, "no exception; printed text always valid UTF-8"),
                ("`generate`/`generate_bytes`: any bytes or str prompt (to 5x the context, invalid UTF-8, lone "
                 "surrogates, NULs) with random valid settings", tfz.check_generate, tfz.GENERATE_ARGS,
                 "always text (valid UTF-8) or bytes of at most the asked length; the model sees at most the "
                 "last block_size - 1 prompt bytes")]:
            with timed(rows, check.__name__):
                why = None
                try:
                    tfz.fuzz(counting(check), strategies, n)()
                except BaseException as e:  # noqa: BLE001
                    notes = " ".join(getattr(e, "__notes__", []))  # hypothesis's falsifying example
                    why = [f"{type(e).__name__}: {str(e)[:200]} {notes[:300]}"]
                rows.append([label, counts.get(check.__name__, 0), happened, lost(why or [])])
    finally:
        torch.set_num_threads(threads)
    with timed(rows, "pipe mode"):
        d = work / "pipe"
        d.mkdir()
        ckpt = d / "tiny.pt"
        torch.manual_seed(0)
        from bytelm.checkpoint import save_checkpoint
        save_checkpoint(ckpt, ByteLM(tfz.TINY), tfz.TINY)
        failures = []
        for seed in range(pipes):
            r = tfz.pipe_trial(ckpt, tfz.pipe_garbage(seed, 30_000))
            try:
                r.stdout.decode("utf-8")
            except UnicodeDecodeError:
                failures.append(f"seed {seed}: stdout not UTF-8")
            if r.returncode != 0 or b"Traceback (most recent call last)" in r.stderr:
                failures.append(f"seed {seed}: rc {r.returncode} {r.stderr[-200:]!r}")
        rows.append(["`inference.py MODEL < garbage`: 30 KB of random bytes plus hostile command lines and a 100 KB "
                     "line, per run", pipes, "exit 0, no traceback, stdout valid UTF-8", lost(failures)])


def bad_input(work: Path, files: int, rows: list) -> None:
    with timed(rows, "bad training input"):
        tests = [(trl.test_binary_and_invalid_utf8_data_train_fine_because_bytes_are_bytes,
                  [dict(kind=k) for k in ("binary", "invalid_utf8", "nul_bytes", "mixed_folder")]),
                 (trl.test_zero_byte_files_are_skipped_and_only_zero_byte_files_are_a_clear_error, None),
                 (trl.test_devices_fifos_and_dangling_links_never_hang_or_trace, None),
                 (trl.test_a_file_that_vanishes_or_fails_while_being_read_is_one_line, None)]
        runs, failures = 0, []
        for fn, params in tests:
            r, f = repeat(fn, work, 1, params)
            runs, failures = runs + r, failures + f
        rows.append(["Bad training input: random binary, invalid UTF-8, NUL-filled, mixed folder (train fine); "
                     "only zero-byte files, `/dev/zero`, a FIFO, a dangling link, a file deleted or failing with "
                     "EIO while read (one line each)", runs, "as documented above", lost(failures)])
    with timed(rows, f"{files:,} tiny files"):
        t = time.perf_counter()
        # On tmpfs when there is memory to spare (~5 KB of RAM per file): this times bytelm, not the disk, and
        # makes a million files in ~20 s instead of minutes.
        shm = Path("/dev/shm")
        spare = _available_mb() > 8 * files / 1000
        root = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and spare else work)) / "many"
        r = trl.many_files_trial(root, files)
        make_s = time.perf_counter() - t - r["seconds"]
        ok = r["documents"] == files
        rows.append([f"A folder of {files:,} tiny files (~15 bytes each, 1,000 per subfolder"
                     f"{', on tmpfs' if str(root).startswith('/dev/shm') else ''})", 1,
                     f"loaded: {r['documents']:,} documents, {r['bytes']:,} bytes in {r['seconds']:.0f} s, peak RSS "
                     f"+{r['rss_growth_mb']:.0f} MB ({r['rss_growth_mb'] * 1024 / files:.2f} KB per file); "
                     f"making the files took {make_s:.0f} s", "nothing" if ok else "**documents missing**"])
        shutil.rmtree(root.parent, ignore_errors=True)


def _available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few trials of each; print, do not write the doc")
    parser.add_argument("--kills", type=int, default=25, help="SIGKILL trials (default 25)")
    parser.add_argument("--files", type=int, default=1_000_000, help="tiny files in the big-folder trial")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.files, args.no_write = 3, 20_000, True
    repeats = 1 if args.quick else 3
    torch.set_num_threads(1)
    global CORPUS
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bytelm-reliability-") as tmp:
        work = Path(tmp)
        CORPUS = tfi.write_corpus(work / "data" / "corpus.jsonl")
        rows: list[list] = []
        kills(work, args.kills, rows)
        write_errors(work, repeats, rows)
        full_disk(work, 2 if args.quick else 6, rows)
        two_runs(work, repeats, rows)
        numerics(work, rows)
        hostile(work, rows)
        damaged(work, 300 if args.quick else 5000, rows)
        fuzz(work, 100 if args.quick else 2000, 1 if args.quick else 5, rows)
        bad_input(work, args.files, rows)
    for r in rows:  # every row: what, times, what happened, lost, seconds
        while len(r) < 5:
            r.append("")
    table = markdown_table(["what was tried", "times", "what happened", "lost", "time"], rows)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"{START}\n{stamp}; {machine()}; {time.perf_counter() - t0:.0f} s in all\n\n`{command}`\n\n{table}\n{END}")
    print(block)
    if not args.no_write:
        text = DOC.read_text()
        i, j = text.index(START), text.index(END) + len(END)
        DOC.write_text(text[:i] + block + text[j:])
        print(f"written to {DOC.relative_to(ROOT)}")
    return 0


CORPUS: Path


if __name__ == "__main__":
    sys.exit(main())

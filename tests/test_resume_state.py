"""Damaged or hand-edited resume states (<out>.last.pt): one clear line or a correct resume, never a traceback.

    pytest tests/test_resume_state.py               # named damages, then ~60 random ones (hypothesis)
    pytest -m slow tests/test_resume_state.py       # 500 random ones

Every run is the "tiny" preset on ~30 KB of text, one thread, no compile, no sample, no plot.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bytelm.checkpoint import atomic_save, read_checkpoint
from bytelm.cli.train import main
from bytelm.cli.run import run_cli
from bytelm.train.run_files import RunPaths

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old tree and "
         "every morning the farmer walks to the river to fetch water for his garden").split()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A folder holding a 4-step tiny run (m.pt, m.last.pt, m.metrics.jsonl) and its corpus."""
    folder = tmp_path_factory.mktemp("base")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(150)) + "." for _ in range(40)]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    assert main(["--preset", "tiny", *flags(folder), "--steps", "4", "--eval-every", "2", "--save-every", "2"]) == 0
    return folder


def flags(folder: Path) -> list[str]:
    """Everything that would otherwise come from the saved settings and could be slow or leave files about."""
    return ["--data", str(folder / "corpus.jsonl"), "--out", str(folder / "m.pt"), "--threads", "1",
            "--cache-dir", str(folder / "cache"), "--compile", "off", "--sample-bytes", "0", "--no-plot",
            "--device", "cpu"]


def copy_run(base: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "m.pt", "m.last.pt", "m.metrics.jsonl"):
        shutil.copy(base / name, dest / name)
    if (base / "cache").exists() and not (dest / "cache").exists():
        shutil.copytree(base / "cache", dest / "cache")
    return dest


def resume(folder: Path, steps: int = 6) -> tuple[int, str]:
    """`train.py --resume` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = run_cli(main, [*flags(folder), "--resume", "--steps", str(steps)])
    return rc, err.getvalue()


def assert_one_clear_line(rc: int, err: str) -> None:
    assert rc == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def damaged(base: Path, dest: Path, change) -> Path:
    folder = copy_run(base, dest)
    ckpt = torch.load(folder / "m.last.pt", weights_only=True)
    change(ckpt)
    atomic_save(ckpt, folder / "m.last.pt")
    return folder


def _set(path: tuple, value):
    def change(ckpt):
        node = ckpt
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


DAMAGES = {
    "train state not a dict": (_set(("train_state",), [1, 2, 3]), "training state is a list"),
    "train state a string": (_set(("train_state",), "step=4"), "training state is a str"),
    "string step": (_set(("train_state", "step"), "4"), "its step is '4'"),
    "negative step": (_set(("train_state", "step"), -3), "its step is -3"),
    "huge step": (_set(("train_state", "step"), 10**30), "its step is"),
    "bool step": (_set(("train_state", "step"), True), "its step is True"),
    "rng of the wrong size": (_set(("train_state", "rng", "torch"), torch.zeros(16, dtype=torch.uint8)),
                              "random state is torch.uint8 of shape (16,)"),
    "rng of garbage": (_set(("train_state", "rng", "torch"), torch.full((5056,), 255, dtype=torch.uint8)),
                       "random state is damaged"),
    "rng not a mapping": (_set(("train_state", "rng"), 7), "random state is a int, not a mapping"),
    "metrics a list": (_set(("train_state", "metrics"), [1.0, 2.0]), "its metrics are a list, not a mapping"),
    "metric a string": (_set(("train_state", "metrics", "best_val_bpb"), "good"), "metric best_val_bpb"),
    "absurd sampler position": (_set(("train_state", "sampler", "batches"), 10**18), "data position"),
    "sampler not a dict": (_set(("train_state", "sampler"), None), "data position is missing"),
    "optimizers not a list": (_set(("train_state", "optimizers"), {}), "optimizer state is a dict"),
    "one optimizer": (lambda c: c["train_state"]["optimizers"].pop(), "the two optimizers"),
    "absurd batch size": (_set(("train_state", "config", "batch_size"), 10**12), "batch-size"),
    "batch size a string": (_set(("train_state", "config", "batch_size"), "16"), "batch_size must be"),
    "config a list": (_set(("train_state", "config"), [16]), "training settings are a list"),
    "unknown setting": (_set(("train_state", "config", "evil"), 1), "unknown training settings"),
    "elapsed nan": (_set(("train_state", "elapsed"), float("nan")), "elapsed time"),
    "world size 0": (_set(("train_state", "world_size"), 0), "world_size"),
}


def _other_parameters(ckpt):
    """The AdamW state swapped into Muon's place: an optimizer state for other parameters."""
    opts = ckpt["train_state"]["optimizers"]
    opts[0], opts[1] = opts[1], opts[0]


def _wrong_shape_moment(ckpt):
    muon = ckpt["train_state"]["optimizers"][0]["state"]
    first = next(iter(muon))
    muon[first]["momentum_buffer"] = torch.zeros(3, 3)


def _stride_zero_moment(ckpt):
    adam = ckpt["train_state"]["optimizers"][1]["state"]
    first = next(iter(adam))
    shape = adam[first]["exp_avg"].shape
    adam[first]["exp_avg"] = torch.zeros(1).expand(shape)


def _negative_adam_step(ckpt):
    adam = ckpt["train_state"]["optimizers"][1]["state"]
    adam[next(iter(adam))]["step"] = torch.tensor(-1.0)


def _fractional_adam_step(ckpt):
    adam = ckpt["train_state"]["optimizers"][1]["state"]
    adam[next(iter(adam))]["step"] = torch.tensor(2.5)


def _negative_second_moment(ckpt):
    adam = ckpt["train_state"]["optimizers"][1]["state"]
    first = next(iter(adam))
    adam[first]["exp_avg_sq"] = -adam[first]["exp_avg_sq"] - 1.0


def _param_index_out_of_range(ckpt):
    ckpt["train_state"]["optimizers"][1]["param_groups"][0]["params"][0] = 999


DAMAGES.update({
    "optimizer state for other parameters": (_other_parameters, "for other parameters"),
    "momentum of the wrong shape": (_wrong_shape_moment, "has shape (3, 3)"),
    "moment that does not hold its data": (_stride_zero_moment, "does not hold its own data"),
    "parameter index out of range": (_param_index_out_of_range, "for other parameters"),
    "negative optimizer step": (_negative_adam_step, "not a whole number of steps"),
    "fractional optimizer step": (_fractional_adam_step, "not a whole number of steps"),
    "negative second moment": (_negative_second_moment, "negative values"),
})


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_resume_state_is_one_clear_line_naming_what(base_run, tmp_path, name):
    change, expected = DAMAGES[name]
    folder = damaged(base_run, tmp_path / "run", change)
    before = (folder / "m.last.pt").read_bytes()
    rc, err = resume(folder)
    assert_one_clear_line(rc, err)
    assert expected in err, err
    assert (folder / "m.last.pt").read_bytes() == before  # nothing of the refused state was overwritten


def test_an_intact_resume_state_still_resumes(base_run, tmp_path):
    folder = copy_run(base_run, tmp_path / "run")
    assert resume(folder) == (0, "")
    assert read_checkpoint(folder / "m.last.pt")["train_state"]["step"] == 6


@pytest.mark.parametrize("train_state", [[1, 2], "text", 7, None])
def test_info_describes_a_checkpoint_whose_train_state_is_not_a_dict(base_run, tmp_path, train_state):
    path = tmp_path / "odd.pt"
    ckpt = torch.load(base_run / "m.last.pt", weights_only=True)
    ckpt["train_state"] = train_state
    atomic_save(ckpt, path)
    for extra in ([], ["--json"]):
        r = subprocess.run([sys.executable, "-m", "bytelm.cli", "info", str(path), *extra], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "parameters" in r.stdout


# --- random damage (hypothesis) --------------------------------------------------------------------------------

def _paths(node, prefix=()):
    """Every place in a nested dict/list a mutation can replace (tensors are leaves)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


REPLACEMENTS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.just([]), st.just({}), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["step", "state", "params", "seed", "batches"]), st.integers(-2, 10), max_size=3),
    st.sampled_from(["delete"]),
    st.builds(lambda shape, kind: torch.zeros(shape, dtype=kind),
              st.lists(st.integers(0, 5), max_size=3).map(tuple),
              st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.float16])),
    st.sampled_from([torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(-1.0)]),
)


def _mutate(ckpt: dict, picks: list) -> None:
    paths = [p for p in _paths(ckpt["train_state"], ("train_state",))]
    for index, value in picks:
        path = paths[index % len(paths)]
        node = ckpt
        try:
            for key in path[:-1]:
                if not isinstance(node, (dict, list)):
                    raise TypeError
                node = node[key]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the way there
        if isinstance(value, str) and value == "delete":
            if isinstance(node, dict):
                node.pop(path[-1], None)
            elif isinstance(node, list) and path[-1] < len(node):
                del node[path[-1]]
        elif isinstance(node, (dict, list)) and (isinstance(node, dict) or path[-1] < len(node)):
            node[path[-1]] = value


def random_damage_trial(base: Path, folder: Path, base_ckpt: dict, picks: list) -> None:
    copy_run(base, folder)
    ckpt = copy.deepcopy(base_ckpt)
    _mutate(ckpt, picks)
    atomic_save(ckpt, folder / "m.last.pt")
    rc, err = resume(folder)
    if rc == 0:  # the damage missed everything that matters: the run went on to step 6
        assert read_checkpoint(folder / "m.last.pt")["train_state"]["step"] == 6
    else:
        assert_one_clear_line(rc, err)


def _fuzz(base_run: Path, tmp: Path, examples: int) -> None:
    base_ckpt = torch.load(base_run / "m.last.pt", weights_only=True)
    counter = iter(range(10**9))

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(st.tuples(st.integers(0, 10**6), REPLACEMENTS), min_size=1, max_size=3))
    def check(picks):
        folder = tmp / f"trial{next(counter)}"
        try:
            random_damage_trial(base_run, folder, base_ckpt, picks)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()


def test_randomly_damaged_resume_states_resume_or_are_one_clear_line(base_run, tmp_path):
    _fuzz(base_run, tmp_path, examples=60)


@pytest.mark.slow
def test_500_randomly_damaged_resume_states(base_run, tmp_path):
    _fuzz(base_run, tmp_path, examples=500)

"""Checkpoints: round trip, atomic writes, and clear refusals of broken or hostile files."""
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch

import bytelm.checkpoint as ckpt_mod
from bytelm.checkpoint import FORMAT_VERSION, load_model, read_checkpoint, save_checkpoint
from bytelm.config import ModelConfig
from bytelm.errors import CheckpointError
from bytelm.model import ByteLM

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)


def make_model(seed=0):
    torch.manual_seed(seed)
    return ByteLM(TINY)


def test_round_trip_restores_identical_weights_config_and_state(tmp_path):
    model = make_model()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, TINY, train_state={"step": 7, "metrics": {"val_bpb": 2.5}})
    loaded, ckpt = load_model(path)
    assert loaded.config == TINY
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert ckpt["train_state"]["step"] == 7 and ckpt["version"] == FORMAT_VERSION
    assert loaded.head.weight is loaded.embed.weight  # tying survives the round trip


def test_saved_file_gets_the_usual_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "m.pt", make_model(), TINY)
    finally:
        os.umask(old)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o644


def test_compiled_or_ddp_prefixes_are_stripped(tmp_path):
    model = make_model()

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    save_checkpoint(tmp_path / "w.pt", Wrapper(model), TINY)
    names = read_checkpoint(tmp_path / "w.pt")["model"].keys()
    assert all(not n.startswith("module.") for n in names)
    load_model(tmp_path / "w.pt")


def test_a_write_interrupted_midway_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model(0), TINY, {"step": 1})
    before = path.read_bytes()

    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        f.write(b"partial garbage")  # some bytes reach the temp file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_model(1), TINY, {"step": 2})
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert path.read_bytes() == before
    assert read_checkpoint(path)["train_state"]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_a_failing_disk_gives_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model(0), TINY)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*unchanged"):
        save_checkpoint(path, make_model(1), TINY)
    assert path.read_bytes() == before


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model(), TINY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_random_bytes_file(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a"):
        load_model(path)


def test_any_random_bytes_file_is_one_clear_error(tmp_path):
    """Garbage read as a legacy pickle meets the weights-only unpickler, which can fail with IndexError or
    KeyError (about 7% of random 4 KiB files did before these were caught): always CheckpointError."""
    path = tmp_path / "m.pt"
    rng = random.Random(0)
    for _ in range(300):
        path.write_bytes(rng.randbytes(rng.choice([64, 4096])))
        with pytest.raises(CheckpointError, match="not a"):
            load_model(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch", "raw_pickle"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    evil = {"format": "bytelm", "version": 1, "model_config": {}, "model": {}, "x": _Payload(marker)}
    if container == "torch":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_other_torch_files_and_newer_versions_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a bytelm checkpoint"):
        load_model(other)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "bytelm", "version": FORMAT_VERSION + 1, "model_config": {}, "model": {}}, newer)
    with pytest.raises(CheckpointError, match="format version .*upgrade"):
        load_model(newer)


def test_wrong_shapes_and_absurd_configs_are_refused(tmp_path):
    state = make_model().state_dict()
    bad_shape = tmp_path / "shape.pt"
    big = {"format": "bytelm", "version": 1, "model_config": {**TINY.to_dict(), "n_embd": 64}, "model": state}
    torch.save(big, bad_shape)
    with pytest.raises(CheckpointError, match="shape"):
        load_model(bad_shape)
    absurd = tmp_path / "absurd.pt"
    torch.save({**big, "model_config": {**TINY.to_dict(), "block_size": 10**9}}, absurd)
    with pytest.raises(CheckpointError, match="block_size"):
        load_model(absurd)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for target in (tmp_path / "missing.pt", bad):
        r = subprocess.run([sys.executable, "-m", "bytelm.cli", "info", str(target)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_cli_info_describes_a_checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model(), TINY, {"step": 42, "metrics": {"best_val_bpb": 2.25}})
    r = subprocess.run([sys.executable, "-m", "bytelm.cli", "info", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "step         42" in r.stdout and "2.2500" in r.stdout
    assert f"{make_model().num_params():,}" in r.stdout

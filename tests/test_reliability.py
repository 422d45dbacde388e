"""Hostile and broken checkpoints, bad training input: each refused (or handled) with one clear line, nothing run,
no giant allocation. Complements tests/test_checkpoint.py (pickle payload, truncation, random bytes, newer
version, wrong shapes, block_size 10**9, ENOSPC at fsync) and tests/test_data.py (empty folder, unreadable
file, bad JSON lines), which are not repeated here.

    pytest tests/test_reliability.py               # short forms
    pytest -m slow tests/test_reliability.py       # long forms (a folder of 200,000 tiny files)
    python bench/reliability.py                    # the long forms, written to docs/reliability.md
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import bytelm.checkpoint as ckpt_mod
import bytelm.data.documents as documents_mod
import bytelm.data.sources as sources_mod
from bytelm.checkpoint import FORMAT_VERSION, load_model, read_checkpoint, save_checkpoint
from bytelm.config import ModelConfig
from bytelm.cli.run import run_cli
from bytelm.errors import CheckpointError
from bytelm.model import ByteLM
from bytelm.cli.train import main
from bytelm.train.run_files import RunPaths
from bytelm.train.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)


def tiny_checkpoint(path: Path, **train_state) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, ByteLM(TINY), TINY, train_state or None)
    return path


def zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i.filename) for i in zf.infolist()}


def write_zip(path: Path, entries: dict[str, bytes], deflate: set[str] = frozenset(), big: dict | None = None) -> Path:
    """A torch-style zip with `entries`; names in `deflate` compressed; big = {name: (declared bytes)} written as
    that many zeros through a deflate stream (a zip bomb: ~1 KB on disk per MB declared)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, content in entries.items():
            if big and name in big:
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as w:
                    chunk = bytes(8 << 20)
                    for _ in range(big[name] // len(chunk)):
                        w.write(chunk)
                continue
            zf.writestr(name, content, zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
    return path


def _tensor_pickle_with(numel: int, shape: int) -> bytes:
    """data.pkl of torch.save({"a": torch.zeros(10)}) with the storage's declared element count and the tensor's
    shape replaced (pickle LONG1 ints), so a file can claim sizes its bytes do not hold."""
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(10)}, buf)
    buf.seek(0)
    pkl = zipfile.ZipFile(buf).read("archive/data.pkl")
    long = lambda n: b"\x8a\x08" + n.to_bytes(8, "little", signed=True)  # noqa: E731
    assert pkl.count(b"K\ntq\x07Q") == 1 and pkl.count(b"K\x00K\n\x85") == 1
    pkl = pkl.replace(b"K\ntq\x07Q", long(numel) + b"tq\x07Q")  # the storage's numel (10)
    return pkl.replace(b"K\x00K\n\x85", b"K\x00" + long(shape) + b"\x85")  # offset 0, size (10,)


def plain_tensor_zip(path: Path) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(10)}, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as zf:
        return {i.filename.replace("archive/", f"{path.stem}/"): zf.read(i.filename) for i in zf.infolist()}


# --- 3. Hostile and broken checkpoints ---------------------------------------------------------------------

def test_a_zip_bomb_is_refused_before_torch_inflates_anything(tmp_path, monkeypatch):
    """64 MB of zeros deflated to ~64 KB, declared as a tensor: torch.load would allocate all 64 MB (and 1 GB
    from a 1 MB file: docs/reliability.md). The zip directory is checked first; torch.load is never called."""
    entries = plain_tensor_zip(tmp_path / "bomb.pt")
    name = next(k for k in entries if k.endswith("data/0"))
    entries[name.replace("data/0", "data.pkl")] = _tensor_pickle_with(numel=(64 << 20) // 4, shape=(64 << 20) // 4)
    bomb = write_zip(tmp_path / "bomb.pt", entries, big={name: 64 << 20})
    assert bomb.stat().st_size < 1 << 20

    def never(*a, **k):
        raise AssertionError("torch.load was called on a zip bomb")

    monkeypatch.setattr(ckpt_mod.torch, "load", never)
    with pytest.raises(CheckpointError, match=r"declare 67,10\d,\d{3} bytes in a [\d,]+-byte file.*zip bomb"):
        load_model(bomb)


def test_a_compressed_or_oversized_zip_entry_is_refused(tmp_path):
    good = tiny_checkpoint(tmp_path / "good.pt")
    entries = zip_entries(good)
    pkl = next(k for k in entries if k.endswith("data.pkl"))
    with pytest.raises(CheckpointError, match="1 compressed"):
        read_checkpoint(write_zip(tmp_path / "deflated.pt", entries, deflate={pkl}))
    # A stored entry whose headers claim 2 GB in a small file.
    forged = bytearray(good.read_bytes())
    name = next(k for k in entries if k.endswith("data/0")).encode()
    patched = 0
    for sig, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):  # local, central records
        i = forged.find(sig)
        while i >= 0:
            if forged[i + name_at:i + name_at + len(name)] == name:
                forged[i + size_at:i + size_at + 4] = (2**31 - 1).to_bytes(4, "little")  # uncompressed size
                patched += 1
            i = forged.find(sig, i + 4)
    assert patched == 2
    (tmp_path / "forged.pt").write_bytes(bytes(forged))
    with pytest.raises(CheckpointError, match="declare 2,14"):
        read_checkpoint(tmp_path / "forged.pt")


@pytest.mark.parametrize("numel, shape, reason", [
    (10**10, 10, "record size"),  # the storage declares 40 GB, the file holds 40 bytes
    (10, 10**10, "resize storage"),  # the tensor claims 10**10 elements of a 10-element storage
])
def test_declared_sizes_larger_than_the_data_are_refused(tmp_path, numel, shape, reason):
    entries = plain_tensor_zip(tmp_path / "liar.pt")
    pkl = next(k for k in entries if k.endswith("data.pkl"))
    entries[pkl] = _tensor_pickle_with(numel, shape)
    with pytest.raises(CheckpointError, match=f"truncated or corrupt.*{reason}"):
        read_checkpoint(write_zip(tmp_path / "liar.pt", entries))


def expanded_checkpoint(path: Path, config: ModelConfig, **extra) -> Path:
    """A checkpoint whose weights have exactly the shapes `config` needs, each a stride-0 view of one float:
    a few KB that pass every shape check and describe a model of any size."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ByteLM(config).state_dict().items()}
    state = {k: torch.zeros(1).expand(s) for k, s in shapes.items()}
    torch.save({"format": "bytelm", "version": FORMAT_VERSION, "model_config": config.to_dict(), "model": state,
                **extra}, path)
    return path


def test_weights_that_claim_a_huge_model_without_its_bytes_are_refused_before_allocating(tmp_path, monkeypatch):
    big = ModelConfig(n_layer=32, n_head=64, n_embd=16384, block_size=1 << 17)  # within bounds: 103 G weights
    path = expanded_checkpoint(tmp_path / "expand.pt", big)
    assert path.stat().st_size < 100_000
    real_init = ByteLM.__init__

    def only_on_meta(self, config):
        assert torch.empty(0).device.type == "meta", "a real model was allocated"
        real_init(self, config)

    monkeypatch.setattr(ByteLM, "__init__", only_on_meta)
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="weights hold .* bytes of data, but the config needs .* weights"):
        load_model(path)
    assert time.perf_counter() - t < 30


def test_resuming_from_a_crafted_resume_file_is_refused_before_allocating(tmp_path):
    """--resume takes the run's settings from <stem>.last.pt, so a crafted one could pick the model's size."""
    out = tmp_path / "m.pt"
    big = ModelConfig(n_layer=8, n_head=32, n_embd=8192, block_size=64)  # 6.4 G weights: 26 GB if allocated
    cfg = TrainConfig.from_preset("tiny", data="builtin", out=str(out), n_layer=8, n_head=32, n_embd=8192)
    state = {"step": 1, "optimizers": [{}, {}], "sampler": {"version": 2, "seed": 0, "batches": 1},
             "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "seq_len", "preset", "data")}}
    expanded_checkpoint(RunPaths.for_out(out).last, big, train_state=state)
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"some text to train on. " * 400)
    with pytest.raises(CheckpointError, match="bytes of data, but the config needs"):
        main(["--out", str(out), "--resume", "--data", str(corpus), "--threads", "1"])


@pytest.mark.parametrize("change, field", [
    (dict(n_layer=-1), "n_layer"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_layer=10**30), "n_layer"),
    (dict(vocab_size=257), "vocab_size"),
    (dict(vocab_size=65536), "vocab_size"),
    (dict(n_embd=10**6), "n_embd"),
    (dict(n_head=0), "n_head"),
    (dict(n_head=3), "n_embd"),  # 32 does not split into 3 heads
    (dict(mlp_ratio=10**4), "mlp_ratio"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=-(10**9)), "block_size"),
    (dict(rope_base=float("inf")), "rope_base"),
    (dict(rope_base=float("nan")), "rope_base"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(n_layer="2"), "n_layer"),
    (dict(n_layer=2.0), "n_layer"),
    (dict(n_layer=True), "n_layer"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(evil=1), "unknown fields"),
])
def test_absurd_configs_are_refused_naming_the_field(tmp_path, change, field):
    path = tmp_path / "absurd.pt"
    torch.manual_seed(0)
    torch.save({"format": "bytelm", "version": FORMAT_VERSION, "model_config": {**TINY.to_dict(), **change},
                "model": ByteLM(TINY).state_dict()}, path)
    with pytest.raises(CheckpointError, match=field):
        load_model(path)


@pytest.mark.parametrize("model_config", [[1, 2], "n_layer=2", None, {1: 2}])
def test_a_config_that_is_not_a_mapping_of_names_is_refused(tmp_path, model_config):
    path = tmp_path / "odd.pt"
    torch.save({"format": "bytelm", "version": 1, "model_config": model_config, "model": {}}, path)
    with pytest.raises(CheckpointError):
        load_model(path)


def test_integer_weights_of_the_right_shapes_are_refused(tmp_path):
    torch.manual_seed(0)
    state = {k: v.to(torch.int64) for k, v in ByteLM(TINY).state_dict().items()}
    path = tmp_path / "int.pt"
    torch.save({"format": "bytelm", "version": 1, "model_config": TINY.to_dict(), "model": state}, path)
    with pytest.raises(CheckpointError, match="torch.int64, not floating-point"):
        load_model(path)


# Pickles that would run `touch MARKER` if loaded with plain pickle, in several protocols and opcodes
# (REDUCE, INST, OBJ, STACK_GLOBAL, BUILD via __setstate__), placed as a torch zip's data.pkl.
def _payloads(marker: str) -> dict[str, bytes]:
    cmd = f"touch {marker}".encode()
    return {
        "protocol0_reduce": b"cos\nsystem\n(S'" + cmd + b"'\ntR.",
        "protocol0_inst": b"(S'" + cmd + b"'\nios\nsystem\n.",
        "protocol1_obj": b"(cos\nsystem\nS'" + cmd + b"'\no.",
        "protocol4_stack_global": (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c" + bytes([len(cmd)]) + cmd
                                   + b"\x94\x85\x94R\x94."),
        "builtins_eval": b"cbuiltins\neval\n(S'__import__(\"os\").system(\"" + cmd + b"\")'\ntR.",
        "nested_in_model": (b"\x80\x02}q\x00(X\x06\x00\x00\x00formatX\x06\x00\x00\x00bytelmX\x05\x00\x00\x00model"
                            b"}X\x01\x00\x00\x00wcos\nsystem\n(S'" + cmd + b"'\ntRsu."),
    }


@pytest.mark.parametrize("name", list(_payloads("x")))
def test_code_in_any_pickle_form_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = _payloads(str(marker))[name]
    raw = tmp_path / "raw.pt"
    raw.write_bytes(payload)
    entries = plain_tensor_zip(tmp_path / "zipped.pt")
    entries[next(k for k in entries if k.endswith("data.pkl"))] = payload
    for path in (raw, write_zip(tmp_path / "zipped.pt", entries)):
        with pytest.raises(CheckpointError):
            load_model(path)
    assert not marker.exists()


def test_hostile_files_never_raise_peak_memory_in_a_fresh_process(tmp_path):
    """All of the above in one clean process, with its peak RSS measured: refusals cost no memory."""
    entries = plain_tensor_zip(tmp_path / "liar.pt")
    pkl = next(k for k in entries if k.endswith("data.pkl"))
    entries[pkl] = _tensor_pickle_with(10**10, 10**10)
    write_zip(tmp_path / "liar.pt", entries)
    expanded_checkpoint(tmp_path / "expand.pt", ModelConfig(n_layer=4, n_head=16, n_embd=4096, block_size=64))
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(10)}, buf, _use_new_zipfile_serialization=False)  # the legacy format
    legacy = buf.getvalue()
    assert legacy.count(b"cpuq\x06K\nN") == 1
    long = lambda n: b"\x8a\x08" + n.to_bytes(8, "little")  # noqa: E731
    (tmp_path / "legacy.pt").write_bytes(legacy.replace(b"cpuq\x06K\nN", b"cpuq\x06" + long(10**10) + b"N"))
    script = ("import resource, sys\nfrom bytelm.checkpoint import load_model\nfrom bytelm.errors import CheckpointError\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "for p in sys.argv[1:]:\n"
              "    try:\n        load_model(p)\n        print('LOADED', p)\n"
              "    except CheckpointError as e:\n        print('refused', e)\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    files = [str(tmp_path / n) for n in ("liar.pt", "expand.pt", "legacy.pt")]
    r = subprocess.run([sys.executable, "-c", script, *files], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:-1]] == ["refused"] * 3, r.stdout
    assert int(lines[-1]) < 200, f"peak RSS grew by {lines[-1]} MB"  # the expanded model alone would be 3.2 GB


# --- 5. Bad training input ---------------------------------------------------------------------------------

def tiny_run(data: Path | str, tmp_path: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(data), out=str(tmp_path / "out" / "m.pt"), threads=1, plot=False, sample_bytes=0,
                    cache_dir=str(tmp_path / "cache"), steps=3, eval_every=3, save_every=3, seq_len=32,
                    batch_size=4, eval_batches=1)
    return TrainConfig.from_preset("tiny", **{**settings, **overrides})


@pytest.mark.parametrize("kind", ["binary", "invalid_utf8", "nul_bytes", "mixed_folder"])
def test_binary_and_invalid_utf8_data_train_fine_because_bytes_are_bytes(tmp_path, kind):
    rng = __import__("random").Random(0)
    content = {
        "binary": bytes(rng.randrange(256) for _ in range(8000)),
        "invalid_utf8": b"caf\xe9 na\xefve \xff\xfe\xc3( \xed\xa0\x80 " * 300,  # Latin-1, BOMs, surrogates
        "nul_bytes": bytes(4000) + b"text" + bytes(4000),
    }
    data = tmp_path / "data"
    data.mkdir()
    if kind == "mixed_folder":
        (data / "a.bin").write_bytes(bytes(rng.randrange(256) for _ in range(4000)))
        (data / "b.txt").write_bytes("ünïcödé text ".encode() * 300)
        (data / "c.txt").write_bytes(b"\xff" * 3000)
    else:
        (data / "x").write_bytes(content[kind])
    summary = train(tiny_run(data, tmp_path), progress=False)
    assert summary["stop_reason"] == "done" and summary["best_val_bpb"] is not None
    model, _ = load_model(tmp_path / "out" / "m.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def cli_error(capsys, argv) -> str:
    rc = run_cli(main, argv)
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_zero_byte_files_are_skipped_and_only_zero_byte_files_are_a_clear_error(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        (data / f"empty{i}.txt").write_bytes(b"")
    args = ["--preset", "tiny", "--out", str(tmp_path / "m.pt"), "--threads", "1", "--no-plot"]
    assert "all 5 files" in cli_error(capsys, ["--data", str(data), *args])
    assert "all 1 files" in cli_error(capsys, ["--data", str(data / "empty0.txt"), *args])
    (data / "real.txt").write_bytes(b"enough text to train a tiny model on. " * 100)
    assert train(tiny_run(data, tmp_path), progress=False)["stop_reason"] == "done"


def test_devices_fifos_and_dangling_links_never_hang_or_trace(tmp_path, capsys):
    args = ["--preset", "tiny", "--out", str(tmp_path / "m.pt"), "--threads", "1", "--no-plot"]
    assert "no files in /dev/zero" in cli_error(capsys, ["--data", "/dev/zero", *args])  # not read forever
    data = tmp_path / "data"
    data.mkdir()
    (data / "real.txt").write_bytes(b"enough text to train a tiny model on. " * 100)
    os.mkfifo(data / "pipe")  # opening it would block until a writer came
    assert train(tiny_run(data, tmp_path), progress=False)["stop_reason"] == "done"
    (data / "dangling").symlink_to(tmp_path / "nowhere")
    assert f"cannot read {data / 'dangling'}" in cli_error(capsys, ["--data", str(data), *args, "--force"])


def test_a_file_that_vanishes_or_fails_while_being_read_is_one_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"f{i}.txt").write_bytes(b"enough text to train a tiny model on. " * 100)
    args = ["--data", str(data), "--preset", "tiny", "--out", str(tmp_path / "m.pt"), "--threads", "1", "--no-plot"]
    real_list = sources_mod.list_files

    def list_then_delete(spec):
        files = real_list(spec)
        files[1][0].unlink()  # deleted between listing and reading
        return files

    monkeypatch.setattr(sources_mod, "list_files", list_then_delete)
    err = cli_error(capsys, args)
    assert f"cannot read {data / 'f1.txt'}" in err and "No such file" in err
    monkeypatch.undo()
    (data / "f1.txt").write_bytes(b"back again " * 100)

    class FailingFile(io.BytesIO):
        def read(self, *a):
            raise OSError(5, "Input/output error")

    real_open = open
    monkeypatch.setattr(documents_mod, "open", lambda p, *a, **k: FailingFile() if str(p).endswith("f2.txt")
                        else real_open(p, *a, **k), raising=False)
    err = cli_error(capsys, args)
    assert f"cannot read {data / 'f2.txt'}: Input/output error" in err


def make_tiny_files(root: Path, n: int) -> Path:
    """n files of ~15 bytes in folders of 1,000."""
    for i in range(n):
        folder = f"{root}/d{i // 1000:04d}"
        if i % 1000 == 0:
            os.makedirs(folder, exist_ok=True)
        fd = os.open(f"{folder}/f{i:07d}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"tiny doc %d\n" % i)
        os.close(fd)
    return root


def many_files_trial(root: Path, n: int) -> dict:
    """Load a folder of n tiny files in a fresh process; returns seconds, peak RSS growth (MB) and the summary."""
    make_tiny_files(root, n)
    script = ("import resource, sys, time, json\nfrom bytelm.data.corpus import load_corpus\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nt = time.perf_counter()\n"
              "c = load_corpus(sys.argv[1], cache_dir=sys.argv[2])\n"
              "print(json.dumps({'seconds': time.perf_counter() - t, 'documents': c.info['documents'], "
              "'bytes': c.info['train_bytes'] + c.info['val_bytes'], "
              "'rss_growth_mb': (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))\n")
    r = subprocess.run([sys.executable, "-c", script, str(root), str(root.parent / "cache")], capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_folder_of_20000_tiny_files_loads_in_bounded_time_and_memory(tmp_path):
    r = many_files_trial(tmp_path / "many", 20_000)
    assert r["documents"] == 20_000
    assert r["seconds"] < 30 and r["rss_growth_mb"] < 200, r


@pytest.mark.slow
def test_a_folder_of_200000_tiny_files_loads_in_bounded_time_and_memory(tmp_path):
    r = many_files_trial(tmp_path / "many", 200_000)
    assert r["documents"] == 200_000
    assert r["seconds"] < 300 and r["rss_growth_mb"] < 1000, r

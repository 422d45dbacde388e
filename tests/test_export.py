"""`bytelm export --format safetensors` and .safetensors input: the weights and config round-trip exactly, every
command that takes a model takes one, and a damaged or foreign file is one clear line, never code run."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bytelm.checkpoint import load_model, read_model_config, save_checkpoint
from bytelm.cli.run import run_cli
from bytelm.cli import main as bytelm_main
from bytelm.config import ModelConfig
from bytelm.errors import CheckpointError
from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig
from bytelm.model import ByteLM

ROOT = Path(__file__).resolve().parents[1]
SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, value_embeds=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(a .pt checkpoint, its safetensors export) of a random 2x2x32 model with value embeddings."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(3)
    model = ByteLM(SMALL)
    pt = folder / "m.pt"
    save_checkpoint(pt, model, SMALL, {"step": 7})
    st = folder / "m.safetensors"
    assert run_cli(bytelm_main, ["export", str(pt), "--format", "safetensors", "-o", str(st)]) == 0
    return pt, st


def test_safetensors_export_holds_the_weights_and_the_config(exported):
    pt, st = exported
    a, _ = load_model(pt)
    b, ckpt = load_model(st)
    assert b.config == a.config == read_model_config(st)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert b.head.weight is b.embed.weight  # tied again, as trained
    assert "train_state" not in ckpt
    header = json.loads(st.read_bytes()[8:8 + struct.unpack("<Q", st.read_bytes()[:8])[0]])
    assert json.loads(header["__metadata__"]["model_config"]) == SMALL.to_dict()
    assert "head.weight" not in header  # stored once


def test_every_command_that_takes_a_model_takes_safetensors(exported, tmp_path, capsys):
    pt, st = exported
    prompt = b"The quick "
    sampled = InferenceConfig(temperature=1.0, seed=5, max_new_bytes=24)
    outs = [ByteLevelGenerator(str(p), sampled).generate_bytes(prompt) for p in (pt, st)]
    assert outs[0] == outs[1] and len(set(outs[0])) > 3
    (tmp_path / "text.txt").write_bytes(b"hello hello hello, a byte-level model " * 4)
    scores = []
    for p in (pt, st):
        capsys.readouterr()
        assert run_cli(bytelm_main, ["score", str(p), str(tmp_path / "text.txt"), "--json", "--threads", "1"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["total"]["bits_per_byte"])
    assert scores[0] == scores[1]
    assert run_cli(bytelm_main, ["info", str(st), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_config"] == SMALL.to_dict() and info["step"] is None
    # Compressed with the .pt, decompressed with its export: the same model to the last bit.
    assert run_cli(bytelm_main, ["compress", str(pt), str(tmp_path / "text.txt"), "-o", str(tmp_path / "t.blz"),
                                 "-q"]) == 0
    assert run_cli(bytelm_main, ["decompress", str(st), str(tmp_path / "t.blz"), "-o", str(tmp_path / "back.txt"),
                                 "-q"]) == 0
    assert (tmp_path / "back.txt").read_bytes() == (tmp_path / "text.txt").read_bytes()
    r = subprocess.run([sys.executable, "-m", "bytelm.cli", "generate", str(st), "-p", "The quick ", "-n", "24",
                        "--temp", "1", "--seed", "5"], capture_output=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == outs[0].decode("utf-8", "replace").encode(), r.stderr.decode()


def crafted(path: Path, state: dict, config: dict | None = SMALL.to_dict(), **metadata) -> Path:
    meta = {"format": "bytelm", "version": "1", **({"model_config": json.dumps(config)} if config else {}),
            **metadata}
    save_file(state, str(path), metadata=meta)
    return path


def good_state() -> dict:
    torch.manual_seed(0)
    state = ByteLM(SMALL).state_dict()
    state.pop("head.weight")
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("case, message", [
    ("no_metadata", "without bytelm's metadata"),
    ("nan", "NaN or infinite"),
    ("int_weights", "not floating-point"),
    ("wrong_shape", "has shape"),
    ("missing", "is missing"),
    ("extra", "unexpected weights"),
    ("bad_config", "invalid model config"),
    ("newer", "format version 99"),
    ("truncated", "not a readable safetensors file"),
])
def test_a_bad_safetensors_file_is_one_line(tmp_path, case, message):
    path, state = tmp_path / "bad.safetensors", good_state()
    if case == "no_metadata":
        save_file(state, str(path))
    elif case == "nan":
        state["blocks.0.mlp.fc.weight"][0, 0] = float("nan")
        crafted(path, state)
    elif case == "int_weights":
        state["norm_f.weight"] = state["norm_f.weight"].to(torch.int32)
        crafted(path, state)
    elif case == "wrong_shape":
        state["embed.weight"] = state["embed.weight"][:, :16].clone()
        crafted(path, state)
    elif case == "missing":
        del state["norm_f.weight"]
        crafted(path, state)
    elif case == "extra":
        crafted(path, {**state, "evil": torch.zeros(2)})
    elif case == "bad_config":
        crafted(path, state, {**SMALL.to_dict(), "n_layer": 10**9})
    elif case == "newer":
        crafted(path, state, version="99")
    else:
        crafted(path, state)
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(path)
    assert len(str(e.value).splitlines()) == 1


def test_export_of_a_missing_or_foreign_model_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    for model, message in ((tmp_path / "missing.pt", "checkpoint not found"),
                           (tmp_path / "notes.safetensors", "without bytelm's metadata")):
        assert run_cli(bytelm_main, ["export", str(model), "--format", "safetensors",
                                     "-o", str(tmp_path / "out.safetensors")]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.safetensors").exists()

"""Fine-tuning: `train.py --init-from MODEL` starts from a trained model's weights and shape, with a fresh
optimizer and schedule; flags that would change the shape are refused; --resume keeps its meaning.

Every run is the "tiny" preset (2x2x32) on a few KB of text written by the test, single-threaded.
"""
import json
import random
from pathlib import Path

import pytest
import torch

from bytelm.checkpoint import load_model, read_checkpoint
from bytelm.cli.run import run_cli
from bytelm.cli.train import config_from_args, main
from bytelm.errors import BytelmError
from bytelm.export import export
from bytelm.train.config import TrainConfig
from bytelm.train.loop import train
from bytelm.train.metrics import read_metrics
from bytelm.train.run_files import RunPaths

WORDS = "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree".split()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(150)) + "."})
                              for _ in range(40)))
    return path


def tiny(folder: Path, corpus_file: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(corpus_file), out=str(folder / "m.pt"), threads=1, plot=False, sample_bytes=0,
                    cache_dir=str(folder / "cache"))
    return TrainConfig.from_preset("tiny", **{**settings, **overrides})


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, corpus_file) -> Path:
    """A tiny model trained for 40 steps: the model the tests fine-tune."""
    folder = tmp_path_factory.mktemp("base")
    cfg = tiny(folder, corpus_file, steps=40, muon_lr=0.02, adam_lr=0.01, value_embeds=True, n_embd=48,
               n_head=4)
    train(cfg, progress=False)
    return Path(cfg.out)


def first_losses(out: str) -> list[float]:
    return [r["loss"] for r in read_metrics(RunPaths.for_out(out).metrics) if "loss" in r]


def test_init_from_starts_from_the_models_weights_with_a_fresh_schedule(tmp_path, corpus_file, base_model,
                                                                        capsys):
    scratch = tiny(tmp_path / "scratch", corpus_file, steps=5, value_embeds=True, n_embd=48, n_head=4)
    train(scratch, progress=False)
    capsys.readouterr()
    out = str(tmp_path / "ft.pt")
    assert main(["--preset", "tiny", "--init-from", str(base_model), "--data", str(corpus_file), "--out", out,
                 "--steps", "5", "--threads", "1", "--no-plot", "--sample-bytes", "0",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith(f"fine-tuning {base_model} | data: ")
    assert "model: 2x4x48" in first_line  # the base model's shape, not the tiny preset's 2x2x32
    # The base model's weights: its first loss is far below a random model's (about 8 bits per byte).
    assert first_losses(out)[0] < first_losses(scratch.out)[0] - 1.0
    state = read_checkpoint(RunPaths.for_out(out).last)["train_state"]
    assert state["step"] == 5 and state["config"]["init_from"] == str(base_model)  # a new run, from step 0
    scales = [r["lr_scale"] for r in read_metrics(RunPaths.for_out(out).metrics) if "loss" in r]
    assert scales[0] == pytest.approx(1 / 5)  # the warmup starts over (tiny: 5 steps)
    assert read_checkpoint(base_model)["train_state"]["step"] != 0  # the base file is left as it was
    model, _ = load_model(out)
    base, _ = load_model(base_model)
    assert model.config == base.config
    assert not torch.equal(model.embed.weight, base.embed.weight)  # and it trained


def test_init_from_refuses_flags_that_change_the_models_shape(tmp_path, corpus_file, base_model):
    common = ["--init-from", str(base_model), "--data", str(corpus_file), "--out", str(tmp_path / "ft.pt")]
    with pytest.raises(BytelmError, match=r"fixes the model's shape \(--n-embd 48\); drop --n-embd"):
        main([*common, "--n-embd", "64", "--n-head", "4"])
    with pytest.raises(BytelmError, match="--no-value-embeds|drop --value-embeds"):
        main([*common, "--no-value-embeds"])
    # The same shape given by hand is no change; the preset's own shape gives way to the model's.
    cfg = config_from_args({"init_from": str(base_model), "preset": "tiny", "n_embd": 48, "n_head": 4})
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.value_embeds) == (2, 4, 48, True)


def test_init_from_is_one_clear_line_for_a_bad_model_resume_or_out(tmp_path, corpus_file, base_model, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases = [
        (["--init-from", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (["--init-from", str(tmp_path / "junk.pt")], "not a"),
        (["--init-from", str(base_model), "--resume"], "give one of them"),
        (["--init-from", str(base_model), "--out", str(base_model)], "init-from and out are the same file"),
    ]
    for argv, message in cases:
        assert run_cli(main, [*argv, "--data", str(corpus_file)]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_a_fine_tuning_run_resumes_as_saved(tmp_path, corpus_file, base_model):
    settings = dict(init_from=str(base_model), steps=10, eval_every=5, save_every=5)
    straight = tiny(tmp_path / "a", corpus_file, **settings)
    train(straight, progress=False)
    paused = tiny(tmp_path / "b", corpus_file, stop_at=5, **settings)
    assert train(paused, progress=False)["stop_reason"] == "paused"
    main(["--resume", "--out", paused.out, "--no-plot"])  # the saved settings: init_from, the model's shape
    assert first_losses(paused.out) == pytest.approx(first_losses(straight.out))


def test_the_finetune_preset_writes_beside_the_base_model_not_over_it():
    cfg = TrainConfig.from_preset("finetune")
    assert cfg.out != TrainConfig().out and cfg.warmup < TrainConfig().warmup


def test_init_from_takes_a_safetensors_export(tmp_path, corpus_file, base_model):
    st = tmp_path / "base.safetensors"
    export(base_model, "safetensors", st)
    cfg = tiny(tmp_path, corpus_file, init_from=str(st), steps=2, eval_every=2)
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and load_model(cfg.out)[0].config == load_model(base_model)[0].config

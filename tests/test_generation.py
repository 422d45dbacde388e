"""Generation: KV-cache logits equal a full recompute, golden greedy output, seeds, sliding past the context,
whole UTF-8 characters, the penalty window, settings validation, and the CLI entry points' error handling.

Regenerate the golden file after an intended change: BYTELM_UPDATE_GOLDEN=1 pytest tests/test_generation.py
"""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bytelm.checkpoint import save_checkpoint
from bytelm.cli.generate import demo_main, main
from bytelm.config import DOC_SEPARATOR, ModelConfig
from bytelm.cli.run import run_cli
from bytelm.errors import BytelmError
from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig, decode_stream
from bytelm.model import ByteLM, KVCache
from bytelm.infer.native import library as native_library
from tiny import tiny_model

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "greedy.txt"
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)
GREEDY = dict(temperature=0, stop_at_separator=False)


@contextlib.contextmanager
def one_thread():
    """Tiny models run several times faster on one thread when the CPU is shared; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    model = tiny_model()
    save_checkpoint(path, model, model.config)
    return path


class ScriptedModel(torch.nn.Module):
    """Stands in for ByteLM: the i-th forward call of a generation predicts script[i] with certainty (or
    returns `logits` every time)."""

    def __init__(self, script: bytes = b"", logits: torch.Tensor | None = None, block_size: int = 64):
        super().__init__()
        self.config = ModelConfig(n_layer=1, n_head=1, n_embd=2, block_size=block_size)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the generator a device and dtype
        self.script, self.fixed, self.calls = script, logits, 0

    def new_cache(self, batch_size: int = 1) -> KVCache:
        self.calls = 0  # a new cache means a new generation: start the script again
        return KVCache(self.config, batch_size)

    def forward(self, idx, targets=None, cache=None, last_only=False):
        cache.pos += idx.shape[1]
        if self.fixed is not None:
            out = self.fixed.clone()
        else:
            out = torch.full((256,), -30.0)
            out[self.script[min(self.calls, len(self.script) - 1)]] = 30.0
        self.calls += 1
        return out.view(1, 1, 256), None


# --- the KV cache and the sliding window ------------------------------------------------------------------

def test_kv_cache_logits_match_full_recompute_before_and_after_slides():
    model = tiny_model()
    gen = ByteLevelGenerator(model, InferenceConfig(max_new_bytes=150, seed=3, stop_at_separator=False,
                                                    temperature=1.0, top_k=256, top_p=1.0),
                             decode_step="exact")  # fp32 steps: the default fp16 weights agree only to ~1e-3
    seen = []
    with one_thread():
        out = list(gen.stream_bytes("Hello, world", trace=lambda lg, ctx: seen.append((lg.clone(), ctx.clone()))))
        assert len(out) == 150 and gen.last_stats["slides"] >= 3
        with torch.inference_mode():
            for step, (logits, context) in enumerate(seen):
                assert 1 <= len(context) <= 64
                full, _ = model(context.view(1, -1))  # plain forward over the same window, no cache
                torch.testing.assert_close(logits, full[0, -1], msg=lambda m: f"step {step}: {m}")
    # The window always ends with the latest byte: what was generated is what the model conditions on.
    for (_, context), b in zip(seen[1:], out):
        assert context[-1].item() == b


def test_generation_three_times_the_context_gives_every_byte():
    gen = ByteLevelGenerator(tiny_model(), InferenceConfig(max_new_bytes=3 * 64 + 10, seed=0, stop_at_separator=False))
    with one_thread():
        out = gen.generate_bytes("Once upon a time")
    assert len(out) == 3 * 64 + 10
    s = gen.last_stats
    assert s["new_bytes"] == 202 and s["slides"] >= 5 and s["stopped_by"] == "length"


def test_prompt_longer_than_context_keeps_its_last_bytes_and_empty_prompt_starts_a_document():
    gen = ByteLevelGenerator(tiny_model(), InferenceConfig(max_new_bytes=2, **GREEDY))
    prompt = bytes(range(32, 132))  # 100 bytes, context 64
    assert gen.prepare_prompt(prompt) == prompt[-63:]
    contexts = []
    gen.generate_bytes(prompt, trace=lambda lg, ctx: contexts.append(bytes(ctx.tolist())))
    assert contexts[0] == prompt[-63:]
    assert gen.prepare_prompt("") == bytes([DOC_SEPARATOR])
    assert len(gen.generate_bytes("")) == 2


# --- golden output, seeds -----------------------------------------------------------------------------------

GOLDEN_TEXT = b"the quick brown fox jumps over the lazy dog. " * 8


def golden_model() -> ByteLM:
    """A tiny model that memorised one sentence: 80 AdamW steps from a fixed seed, fp32 on CPU."""
    torch.manual_seed(1234)
    model = ByteLM(ModelConfig(**TINY))
    data = torch.tensor(list(GOLDEN_TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(80):
        starts = ((torch.arange(8) * 37 + step * 11) % (len(GOLDEN_TEXT) - 65)).tolist()
        x = torch.stack([data[i:i + 64] for i in starts])
        y = torch.stack([data[i + 1:i + 65] for i in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2, loss.item()  # it learned the sentence: greedy margins are wide, hence robust
    return model.eval()


def test_greedy_output_of_a_fixed_tiny_model_matches_golden():
    with one_thread():
        gen = ByteLevelGenerator(golden_model(), InferenceConfig(max_new_bytes=150, **GREEDY))
        out = gen.generate_bytes("the quick")  # 9 + 150 bytes: crosses the 64-byte window twice
    if os.environ.get("BYTELM_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(out.hex() + "\n")
    expected = bytes.fromhex(GOLDEN.read_text().strip())
    assert out == expected, f"greedy output changed:\n got {out!r}\nwant {expected!r}"
    assert out.startswith(b" brown fox jumps over the lazy dog.")  # and the golden output is meaningful


def test_same_seed_same_bytes_different_seed_different_bytes():
    gen = ByteLevelGenerator(tiny_model(), InferenceConfig(max_new_bytes=40, temperature=1.0, stop_at_separator=False))
    with one_thread():
        a = gen.generate_bytes("abc", seed=11)
        assert gen.last_seed == 11
        b = gen.generate_bytes("abc", seed=11)
        c = gen.generate_bytes("abc", seed=12)
        d = gen.generate_bytes("abc")  # seed None: a fresh seed, reported so the user can repeat it
        assert gen.generate_bytes("abc", seed=gen.last_seed) == d
    assert a == b and a != c


def test_per_call_overrides_apply_to_that_call_only():
    gen = ByteLevelGenerator(tiny_model(), InferenceConfig(max_new_bytes=30, **GREEDY))
    assert len(gen.generate_bytes("x", max_new_bytes=5)) == 5
    assert len(gen.generate_bytes("x")) == 30
    with pytest.raises(BytelmError, match="unknown setting 'max_tokens'"):
        gen.generate("x", max_new_bytes=5, max_tokens=3)
    with pytest.raises(BytelmError, match="top_k"):
        gen.stream("x", top_k=0)  # checked when the stream is made, before any byte


# --- text out, stopping, the penalty window -----------------------------------------------------------------

def test_multibyte_characters_stream_whole():
    text = "héllo→🙂"
    script = text.encode()
    gen = ByteLevelGenerator(ScriptedModel(script), InferenceConfig(max_new_bytes=len(script), **GREEDY))
    pieces = list(gen.stream("say: "))
    assert pieces == list(text)  # one piece per character, never a partial one
    assert "\ufffd" not in "".join(pieces)


def test_invalid_utf8_becomes_replacement_characters():
    script = b"a\xffb\xe2\x86c\xf0\x9f"  # a stray byte, a cut 3-byte sequence, and a cut 4-byte one at the end
    gen = ByteLevelGenerator(ScriptedModel(script), InferenceConfig(max_new_bytes=len(script), **GREEDY))
    assert gen.generate("x") == "a\ufffdb\ufffdc\ufffd"
    assert gen.generate_bytes("x") == script  # the raw bytes stay available
    assert "".join(decode_stream(iter(b"\xc3"))) == "\ufffd"


def test_generation_stops_at_the_document_separator_unless_told_not_to():
    script = b"ab\x00cd"
    gen = ByteLevelGenerator(ScriptedModel(script), InferenceConfig(max_new_bytes=5, temperature=0))
    assert gen.generate("x") == "ab" and gen.last_stats["stopped_by"] == "separator"
    gen = ByteLevelGenerator(ScriptedModel(script), InferenceConfig(max_new_bytes=5, **GREEDY))
    assert gen.generate("x") == "ab\x00cd"


def test_repetition_penalty_leaves_bytes_outside_its_window_alone():
    logits = torch.full((256,), -10.0)
    logits[ord("a")], logits[ord("c")] = 3.0, 2.0  # penalised by 2, "a" (1.5) falls below "c" (2.0)
    settings = dict(max_new_bytes=1, temperature=0, repetition_penalty=2.0)
    gen = ByteLevelGenerator(ScriptedModel(logits=logits), InferenceConfig(**settings, repeat_last_n=8))
    assert gen.generate("a" + "b" * 8) == "a"   # "a" is 9 bytes back: outside the window, not penalised
    assert gen.generate("a" + "b" * 7) == "c"   # 8 bytes back: inside
    assert gen.generate("a" + "b" * 20, repeat_last_n=-1) == "c"  # -1: the whole context
    assert gen.generate("a", repeat_last_n=0) == "a"  # 0: no window
    assert gen.generate("a", repetition_penalty=1.0) == "a"


# --- settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("temperature", 5.0, "temperature must be 0 .greedy. or between 0.1 and 2.0"),
    ("temperature", 0.05, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("top_k", 0, "top_k must be between 1 and 256"),
    ("top_k", 257, "top_k"),
    ("top_k", 2.5, "top_k must be a whole number"),
    ("top_p", 0.05, "top_p must be between 0.1 and 1.0"),
    ("top_p", 1.5, "top_p"),
    ("min_p", -0.1, "min_p"),
    ("repetition_penalty", 0.9, "repetition_penalty must be between 1.0 and 2.0"),
    ("repeat_last_n", -2, "repeat_last_n"),
    ("max_new_bytes", 0, "max_new_bytes must be at least 1"),
    ("max_new_bytes", True, "max_new_bytes must be a whole number"),
    ("seed", -5, "seed"),
    ("stop_at_separator", "yes", "stop_at_separator"),
])
def test_inference_config_rejects_out_of_range_values(field, value, message):
    with pytest.raises(BytelmError, match=message):
        InferenceConfig(**{field: value})


def test_inference_config_defaults_follow_upstream():
    c = InferenceConfig()
    assert (c.max_new_bytes, c.temperature, c.top_k, c.top_p) == (1024, 0.8, 50, 0.9)
    assert c.seed is None and c.stop_at_separator
    assert (c.repetition_penalty, c.repeat_last_n) == (1.1, 64)  # measured, see docs/generation.md
    assert InferenceConfig(temperature=0).temperature == 0  # greedy is allowed
    assert InferenceConfig.parse_value("seed", "random") is None


# --- the upstream API and the command lines ---------------------------------------------------------------

def test_upstream_api_from_inference_module(tiny_checkpoint, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from inference import ByteLevelGenerator as G, InferenceConfig as C
    config = C(max_new_bytes=20, temperature=0.8, top_k=50, top_p=0.9, stop_at_separator=False, seed=1)
    generator = G(str(tiny_checkpoint), config, device="cpu")
    text = generator.generate("The future of AI is")
    assert isinstance(text, str) and text == generator.generate(b"The future of AI is")
    assert len(generator.generate_bytes("Once upon a time", max_new_bytes=7)) == 7
    assert "".join(generator.stream("The future of AI is")) == text


def test_generate_command_prints_only_the_generation(tiny_checkpoint, capsys):
    args = [str(tiny_checkpoint), "-p", "Hello", "-n", "25", "--temp", "0.9", "--top-k", "40", "--top-p", "0.95",
            "--seed", "5", "--repeat-penalty", "1.1", "--repeat-last-n", "16", "--ignore-eos"]
    assert run_cli(main, args) == 0
    out, err = capsys.readouterr()
    gen = ByteLevelGenerator(str(tiny_checkpoint), InferenceConfig(
        max_new_bytes=25, temperature=0.9, top_k=40, top_p=0.95, seed=5, repetition_penalty=1.1,
        repeat_last_n=16, stop_at_separator=False), device="cpu")
    assert out == gen.generate("Hello") and err == ""


def test_generate_command_exact_runs_the_fp32_step(tiny_checkpoint, capsys):
    """--exact: the reference's arithmetic, so its text equals the reference generator's byte for byte."""
    args = [str(tiny_checkpoint), "-p", "Hello", "-n", "40", "--temp", "0", "--ignore-eos", "-v"]
    assert run_cli(main, [*args, "--exact"]) == 0
    out, err = capsys.readouterr()
    ref = ByteLevelGenerator(str(tiny_checkpoint), InferenceConfig(max_new_bytes=40, temperature=0,
                                                                   stop_at_separator=False), decode_step="reference")
    assert out == ref.generate("Hello")
    exact_step = err.strip().rsplit("decode step ", 1)[1]
    assert exact_step in ("C", "torch")  # torch where there is no C compiler
    assert run_cli(main, args) == 0
    default_step = capsys.readouterr().err.strip().rsplit("decode step ", 1)[1]
    if exact_step == "C" and native_library().bytelm_half_supported():
        assert default_step == "C, fp16 weights"


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "top_k must be between 1 and 256"),
    (["--temp", "hot"], "temperature must be a number"),
])
def test_generate_command_rejects_bad_settings(tiny_checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error (exit 2) or BytelmError (exit 1)
        if run_cli(main, [str(tiny_checkpoint), *args]) != 0:
            raise SystemExit(1)
    assert e.value.code != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_bad_model_file_is_one_line_and_nonzero(tmp_path, capsys, content):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    assert run_cli(main, [str(path), "-p", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_demo_streams_five_prompts(tiny_checkpoint, capsys):
    assert run_cli(demo_main, [str(tiny_checkpoint), "-n", "10", "--seed", "0"]) == 0
    assert capsys.readouterr().out.count("--- ") == 5


def test_demo_without_a_model_says_how_to_train_one():
    r = subprocess.run([sys.executable, "demo_inference.py", "no_such_model.pt"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "python train.py" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_loading_and_generating_do_not_import_the_compiler(tiny_checkpoint):
    """torch._dynamo takes about 2 s to import here, and generation needs nothing from it; it came in through
    the attention custom op's first call and through checking a checkpoint's weights against a meta-device
    model. Every CLI that loads a model would wait for it before the first byte."""
    code = ("import sys\nfrom bytelm.infer.generation import ByteLevelGenerator, InferenceConfig\n"
            f"g = ByteLevelGenerator({str(tiny_checkpoint)!r}, InferenceConfig(max_new_bytes=80, "
            "stop_at_separator=False), device='cpu')\n"
            "n = sum(1 for _ in g.stream_bytes(b'hello'))\n"
            "print(n, 'torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["80", "False"]  # 80 bytes: past the 64-byte window, so a second prefill

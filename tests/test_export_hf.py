"""`bytelm export --format hf`: a folder that transformers loads with AutoModelForCausalLM and AutoTokenizer
(trust_remote_code, everything local), whose logits are bytelm's to float rounding and whose greedy
generate() gives bytelm's greedy bytes. Needs transformers (the dev extra)."""
import pytest
import torch

from bytelm.checkpoint import save_checkpoint
from bytelm.cli import main as bytelm_main
from bytelm.cli.run import run_cli
from bytelm.config import ModelConfig
from bytelm.errors import BytelmError
from bytelm.export.hf import write_hf_folder
from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig
from bytelm.model import ByteLM

transformers = pytest.importorskip("transformers")

TEXT = b"the quick brown fox jumps over the lazy dog. a byte-level model reads bytes. " * 4
PROMPTS = ["the quick ", "a byte-", "h\u00e9llo w\u00f6rld \u2603 ", "x"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: two stall each other on a busy 2-core machine (0.28 against 0.05 s per fitting step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread) -> ByteLM:
    """A small model with value embeddings, fitted for a few seconds to TEXT, so greedy text is not one byte."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, value_embeds=True))
    data = torch.tensor(list(TEXT))
    windows = torch.stack([data[i:i + 65] for i in range(0, len(data) - 65, 7)])  # (N, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(windows[:, :-1], windows[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, trained):
    base = tmp_path_factory.mktemp("hf")
    save_checkpoint(base / "m.pt", trained, trained.config)
    assert run_cli(bytelm_main, ["export", str(base / "m.pt"), "--format", "hf", "-o", str(base / "hf")]) == 0
    return base / "hf"


def test_the_folder_loads_with_auto_classes_and_gives_bytelms_logits(folder, trained):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert model.head.weight is model.embed.weight  # tied, as in bytelm
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert ids == list(prompt.encode("utf-8"))  # ids are the UTF-8 bytes
        assert tokenizer.decode(ids) == prompt
        x = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, trained(x)[0], rtol=1e-5, atol=1e-5)
    assert tokenizer.decode([0xE2, 0x98]) == "\ufffd"  # a cut character decodes, never raises


def test_greedy_generate_gives_bytelms_greedy_bytes(folder, trained):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    greedy = InferenceConfig(temperature=0.0, repetition_penalty=1.0, max_new_bytes=40, stop_at_separator=False)
    ours = ByteLevelGenerator(trained, greedy, decode_step="exact")
    for prompt in PROMPTS[:2]:
        expected = ours.generate_bytes(prompt)
        x = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**x, max_new_tokens=40, do_sample=False, eos_token_id=None)
        got = bytes(out[0, x["input_ids"].shape[1]:].tolist())
        assert got == expected and len(set(got)) > 3, (got, expected)


def test_export_refuses_a_folder_that_is_not_empty(tmp_path, trained):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(BytelmError, match="not empty"):
        write_hf_folder(trained, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]

"""`bytelm export --format onnx`: the forward as ONNX, whose logits under onnxruntime are bytelm's to float
rounding at several batch sizes and lengths. Needs onnx, onnxscript and onnxruntime (the dev extra); slow: the
export traces the model (~20 s on 2 busy CPU cores)."""
import pytest
import torch

from bytelm.checkpoint import save_checkpoint
from bytelm.cli import main as bytelm_main
from bytelm.cli.run import run_cli
from bytelm.config import ModelConfig
from bytelm.model import ByteLM

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.slow
def test_onnx_logits_match_bytelm_at_several_shapes(tmp_path):
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, value_embeds=True)).eval()
    save_checkpoint(tmp_path / "m.pt", model, model.config)
    assert run_cli(bytelm_main, ["export", str(tmp_path / "m.pt"), "--format", "onnx",
                                 "-o", str(tmp_path / "m.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 1), (2, 17), (1, 64), (3, 5)]:
        x = torch.randint(0, 256, shape)
        got = torch.from_numpy(session.run(None, {"input_ids": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x)[0], rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

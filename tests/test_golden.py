"""Golden output: a small trained checkpoint's greedy and seeded continuations, pinned byte for byte.

tests/golden/README.md says how golden.pt was trained. Every decode step the generator offers must reproduce
the pinned bytes: the fp32 steps for greedy and sampled output, the default fp16 step for greedy output (its
logits differ from fp32 in the third decimal, so a sampled draw may land on another byte).
"""
import json
from pathlib import Path

import pytest

from bytelm.checkpoint import load_model
from bytelm.infer.generation import DECODE_STEPS, ByteLevelGenerator, InferenceConfig

GOLDEN = Path(__file__).with_name("golden")
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
FP32_STEPS = [s for s in DECODE_STEPS if s != "auto"]


def _generator(step: str) -> ByteLevelGenerator:
    config = InferenceConfig(max_new_bytes=EXPECTED["max_new_bytes"], stop_at_separator=False)
    return ByteLevelGenerator(GOLDEN / "golden.pt", config, device="cpu", decode_step=step)


def test_golden_checkpoint_is_the_one_described():
    model, ckpt = load_model(GOLDEN / "golden.pt")
    cfg = ckpt["model_config"]
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"]) == (2, 4, 48, 64)
    assert model.num_params() == 67_824
    assert ckpt["train_state"]["step"] == 1500


@pytest.mark.parametrize("step", DECODE_STEPS)
@pytest.mark.parametrize("prompt", sorted(EXPECTED["greedy"]))
def test_greedy_output_matches_golden_on_every_decode_step(step, prompt):
    got = _generator(step).generate_bytes(prompt.encode(), temperature=0.0)
    assert got == EXPECTED["greedy"][prompt].encode("latin-1")


@pytest.mark.parametrize("step", FP32_STEPS)
@pytest.mark.parametrize("prompt", sorted(EXPECTED["sampled"]["outputs"]))
def test_seeded_sampled_output_matches_golden_on_every_fp32_decode_step(step, prompt):
    settings = EXPECTED["sampled"]["settings"]
    got = _generator(step).generate_bytes(prompt.encode(), **settings)
    assert got == EXPECTED["sampled"]["outputs"][prompt].encode("latin-1")

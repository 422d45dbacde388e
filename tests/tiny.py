"""The tiny model the tests share: 2 layers, 2 heads, width 32, a 64-byte context (MODEL_PRESETS["tiny"]),
randomly initialised from a seed, so every test file builds the same model in milliseconds."""
from pathlib import Path

import torch

from bytelm.checkpoint import save_checkpoint
from bytelm.config import MODEL_PRESETS, ModelConfig
from bytelm.model import ByteLM

TINY = ModelConfig(**MODEL_PRESETS["tiny"])


def tiny_model(seed: int = 0) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(TINY).eval()


def save_tiny_checkpoint(folder: Path) -> Path:
    """tiny_model() saved as folder/tiny.pt."""
    path = Path(folder) / "tiny.pt"
    save_checkpoint(path, tiny_model(), TINY)
    return path

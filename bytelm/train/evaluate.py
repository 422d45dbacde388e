"""Evaluation during training: bits per byte over held-out batches, and the sample text shown beside it.

    from bytelm.train.evaluate import evaluate
    nats = evaluate(model, eval_batches(corpus.val, 16, 128), torch.device("cpu"), "fp32")  # per scored byte
    bits_per_byte(nats)                                                                     # bytelm.train.metrics

The sample goes through bytelm.infer.generation, the one sampler, with its default filters and a fixed seed.
"""
from __future__ import annotations

import json

import torch

from bytelm.config import DOC_SEPARATOR
from bytelm.device import autocast
from bytelm.train.distributed import Dist, all_reduce_sum
from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, dtype: str, d: Dist = Dist()) -> float:
    """Mean cross-entropy (nats per scored byte) over fixed held-out batches (EvalBatches or SlidingBatches),
    shared out across ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of nats, bytes)
    for i in range(d.rank, len(batches), d.world_size):
        x, y = batches[i]
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        scored = int((y >= 0).sum())  # SlidingBatches marks the targets a window leaves to others as negative
        total[0] += loss.double() * scored
        total[1] += scored
    all_reduce_sum(total, d)
    model.train(was_training)
    return (total[0] / total[1]).item()


def sample_text(model: torch.nn.Module, prompt: bytes, n: int, seed: int) -> bytes:
    """Up to n bytes continuing `prompt`, sampled with generation's default settings from `seed` (the same
    bytes for the same weights and seed). The model is left in the mode it was in."""
    was_training = model.training
    try:
        generator = ByteLevelGenerator(model, InferenceConfig(max_new_bytes=n, seed=seed))
        return generator.generate_bytes(prompt)
    finally:
        model.train(was_training)


def sample_prompt(val, length: int = 24) -> bytes:
    """The opening bytes of the first held-out document: a prompt the model has never trained on."""
    head = bytes(val[: 4 * length])
    for part in head.split(bytes([DOC_SEPARATOR])):
        if part.strip():
            return part[:length]
    return bytes([DOC_SEPARATOR])


def printable(b: bytes) -> str:
    """Bytes -> one printable line: invalid UTF-8 becomes U+FFFD; newlines, NULs and other control
    characters are escaped, so a sample can never move the cursor or set the terminal's title."""
    text = json.dumps(b.decode("utf-8", errors="replace"), ensure_ascii=False)[1:-1]  # escapes C0 controls
    return "".join(f"\\u{ord(c):04x}" if "\x7f" <= c <= "\x9f" else c for c in text)  # DEL and C1 too

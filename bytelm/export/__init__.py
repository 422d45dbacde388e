"""Export a trained model to files other tools read: safetensors, a Hugging Face folder, ONNX.

    from bytelm.export import export
    export("byte_llm_model.pt", "safetensors", "model.safetensors")   # weights + config in the metadata
    export("byte_llm_model.pt", "hf", "byte_llm_hf/")                 # AutoModelForCausalLM, trust_remote_code
    export("byte_llm_model.pt", "onnx", "model.onnx")                 # the forward: bytes (B, T) -> logits

The command line is `bytelm export` (bytelm.cli.export); docs/export.md says what each format holds and how to
load it elsewhere. Every format is written from the model as `load_model` checks it, whatever file it came from.
"""
from __future__ import annotations

import os

from bytelm.checkpoint import load_model, save_safetensors
from bytelm.errors import BytelmError

FORMATS = ("safetensors", "hf", "onnx")


def export(model_path: str | os.PathLike, fmt: str, out: str | os.PathLike) -> None:
    """Write the model at `model_path` (a bytelm .pt or .safetensors) to `out` in format `fmt` (one of FORMATS)."""
    if fmt not in FORMATS:
        raise BytelmError(f"unknown export format {fmt!r}: choose from {', '.join(FORMATS)}")
    model, _ = load_model(model_path)
    if fmt == "safetensors":
        save_safetensors(out, model, model.config)
    elif fmt == "hf":
        from bytelm.export.hf import write_hf_folder
        write_hf_folder(model, out)
    else:
        from bytelm.export.onnx import write_onnx
        write_onnx(model, out)

"""`bytelm export`: write a trained model in a format other tools read (bytelm.export).

    bytelm export byte_llm_model.pt --format safetensors -o model.safetensors
    bytelm export byte_llm_model.pt --format hf -o byte_llm_hf/      # a folder transformers loads
    bytelm export byte_llm_model.pt --format onnx -o model.onnx

docs/export.md says what each holds and how to load it elsewhere.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from bytelm.checkpoint import DEFAULT_PATH

_DEFAULT_OUT = {"safetensors": "model.safetensors", "hf": "byte_llm_hf", "onnx": "model.onnx"}


def main(argv: Sequence[str] | None = None, prog: str = "bytelm export") -> int:
    from bytelm.export import FORMATS, export

    parser = argparse.ArgumentParser(prog=prog, description="write a trained model as safetensors, a Hugging Face "
                                     "folder (AutoModelForCausalLM) or ONNX; docs/export.md")
    parser.add_argument("model", nargs="?", default=DEFAULT_PATH,
                        help=f"bytelm checkpoint, .pt or .safetensors (default: {DEFAULT_PATH})")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("-o", "--out", help="file (safetensors, onnx) or folder (hf) to write (default: "
                        + ", ".join(f"{k}: {v}" for k, v in _DEFAULT_OUT.items()) + ")")
    args = parser.parse_args(argv)
    out = args.out or _DEFAULT_OUT[args.format]
    export(args.model, args.format, out)
    print(f"wrote {out} ({args.format}) from {args.model}")
    return 0

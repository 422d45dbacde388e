"""`bytelm` command: one subcommand per job, each owned by the module that does the job.

Each module has `main(argv, prog)`; this file only dispatches, so `bytelm X` and `python X.py` share code.
Command lines that belong to no other module live beside this file, one module per command. The list of
subcommands below is generated from SUBCOMMANDS, the same table `bytelm --help` prints, so neither can drift.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from bytelm.cli.run import run_cli

# name -> (module with main(argv, prog), one-line help). Imported lazily: `bytelm --help` stays instant.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bytelm.cli.train", "train a byte-level model (same as python train.py)"),
    "chat": ("bytelm.cli.chat", "interactive prompt for a trained model (same as python inference.py MODEL)"),
    "generate": ("bytelm.cli.generate", "print one generation for a prompt"),
    "info": ("bytelm.cli.info", "print a checkpoint's config, parameter count, step and metrics"),
    "env": ("bytelm.cli.env", "print versions, device, dtype, C library and cache (for a bug report)"),
    "serve": ("bytelm.cli.serve", "HTTP API (OpenAI-compatible) and a web page that colours every byte"),
    "score": ("bytelm.cli.score", "bits per byte of files under a model; per-byte surprisal, entropy patches"),
    "compress": ("bytelm.cli.compress", "compress a file losslessly with a model (gzip-style: IN -> IN.blz)"),
    "decompress": ("bytelm.cli.compress", "decompress a .blz file with the model that compressed it"),
    "export": ("bytelm.cli.export", "write a model as safetensors, a Hugging Face folder or ONNX"),
}
__doc__ = (__doc__ or "") + "\n" + "\n".join(  # `python -OO` drops docstrings: then the list alone
    f"    bytelm {name:<10} {help_}  ({module})" for name, (module, help_) in SUBCOMMANDS.items())


def _dispatch(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="bytelm", description="bytelm: a byte-level transformer language model you train and run yourself.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in SUBCOMMANDS.items())
        + "\n\n`bytelm SUBCOMMAND --help` explains each.")
    parser.add_argument("subcommand", choices=list(SUBCOMMANDS), metavar="SUBCOMMAND")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module_name, _ = SUBCOMMANDS[args.subcommand]
    module = importlib.import_module(module_name)
    return int(module.main(argv[1:], prog=f"bytelm {args.subcommand}") or 0)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())

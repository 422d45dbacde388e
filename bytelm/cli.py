"""`bytelm` command: one subcommand per job, each owned by the module that does the job.

    bytelm train ...          train a model            (bytelm.training)
    bytelm chat MODEL         interactive prompt       (bytelm.repl)
    bytelm generate MODEL     one generation to stdout (bytelm.generation)
    bytelm info MODEL         describe a checkpoint    (here)

Each module has `main(argv, prog)`; this file only dispatches, so `bytelm X` and `python X.py` share code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

from .errors import run_cli

# name -> (module with main(argv, prog), one-line help). Imported lazily: `bytelm --help` stays instant.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bytelm.training", "train a byte-level model (same as python train.py)"),
    "chat": ("bytelm.repl", "interactive prompt for a trained model (same as python inference.py MODEL)"),
    "generate": ("bytelm.generation", "print one generation for a prompt"),
    "info": ("bytelm.cli", "print a checkpoint's config, parameter count, step and metrics"),
}


def info_main(argv: Sequence[str] | None = None, prog: str = "bytelm info") -> int:
    from .checkpoint import read_checkpoint, load_model

    parser = argparse.ArgumentParser(prog=prog, description=SUBCOMMANDS["info"][1])
    parser.add_argument("model", help="checkpoint file, e.g. byte_llm_model.pt")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    model, ckpt = load_model(args.model)
    state = ckpt.get("train_state") or {}
    out = {
        "path": args.model,
        "format_version": ckpt["version"],
        "model_config": ckpt["model_config"],
        "parameters": model.num_params(),
        "step": state.get("step"),
        "metrics": state.get("metrics"),
        "data": state.get("data_info"),
    }
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"checkpoint   {out['path']} (format v{out['format_version']})")
    print(f"parameters   {out['parameters']:,}")
    for k, v in out["model_config"].items():
        print(f"  {k:<14} {v}")
    print(f"step         {out['step'] if out['step'] is not None else 'n/a (weights only)'}")
    for k, v in (out["metrics"] or {}).items():
        print(f"  {k:<14} {v:.4f}" if isinstance(v, float) else f"  {k:<14} {v}")
    if out["data"]:
        print(f"data         {out['data']}")
    return 0



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
    if args.subcommand == "info":
        return info_main(argv[1:], prog="bytelm info")
    module = importlib.import_module(module_name)
    return int(module.main(argv[1:], prog=f"bytelm {args.subcommand}") or 0)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())

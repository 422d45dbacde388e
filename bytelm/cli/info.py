"""`bytelm info MODEL`: a checkpoint's config, parameter count, step and metrics (`--json` for scripts).

    bytelm info byte_llm_model.pt
    bytelm info byte_llm_model.pt --json

The names and values come from the file, so on a terminal their control characters are shown as `cat -v`
does (a crafted file cannot drive the terminal); a pipe gets them exactly. JSON escapes them anyway.
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from bytelm.cli.terminal import text_stdout


def main(argv: Sequence[str] | None = None, prog: str = "bytelm info") -> int:
    from bytelm.checkpoint import load_model

    parser = argparse.ArgumentParser(prog=prog, description="print a checkpoint's config, parameter count, step and metrics")
    parser.add_argument("model", help="checkpoint file, e.g. byte_llm_model.pt")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    out = text_stdout()
    model, ckpt = load_model(args.model)
    # The training state is the trainer's to validate on --resume; here anything is shown as it is.
    state = ckpt.get("train_state")
    state = state if isinstance(state, dict) else {}
    info = {
        "path": args.model,
        "format_version": ckpt["version"],
        "model_config": ckpt["model_config"],
        "parameters": model.num_params(),
        "step": state.get("step"),
        "metrics": state.get("metrics"),
        "data": state.get("data_info"),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str), file=out)
        return 0
    print(f"checkpoint   {info['path']} (format v{info['format_version']})", file=out)
    print(f"parameters   {info['parameters']:,}", file=out)
    for k, v in info["model_config"].items():
        print(f"  {k:<14} {v}", file=out)
    print(f"step         {info['step'] if info['step'] is not None else 'n/a (weights only)'}", file=out)
    metrics = info["metrics"]
    for k, v in (metrics.items() if isinstance(metrics, dict) else [("(not a table)", metrics)] if metrics else []):
        print(f"  {k!s:<14} {v:.4f}" if isinstance(v, float) else f"  {k!s:<14} {v}", file=out)
    if info["data"]:
        print(f"data         {info['data']}", file=out)
    return 0

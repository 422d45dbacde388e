"""`bytelm info MODEL`: a checkpoint's config, parameter count, step and metrics (`--json` for scripts)."""
from __future__ import annotations

import argparse
import json
from typing import Sequence


def main(argv: Sequence[str] | None = None, prog: str = "bytelm info") -> int:
    from ..checkpoint import load_model

    parser = argparse.ArgumentParser(prog=prog, description="print a checkpoint's config, parameter count, step and metrics")
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

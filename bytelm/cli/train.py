"""`bytelm train` and `python train.py`: the training command line, one flag per TrainConfig field.

    bytelm train --preset cpu10 --data tinyshakespeare.txt
    bytelm train --resume --steps 2000        # the saved run's settings, then the flags given
    bytelm train --preset finetune --init-from byte_llm_model.pt --data my.txt   # fine-tune a trained model
    bytelm train --help                       # every flag, by group, with its default

Flags given override the preset; with --resume, they override the settings the run was saved with.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from bytelm.checkpoint import DEFAULT_PATH
from bytelm.errors import BytelmError
from bytelm.train.resume import saved_settings
from bytelm.train.run_files import RunPaths
from bytelm.train.config import TRAIN_PRESETS, TrainConfig
from bytelm.train.loop import train
from bytelm.cli.args import add_dataclass_arguments, given_values


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a byte-level transformer language model. With no flags: the default model on the "
                    "built-in corpus (Python's own documentation), at most ~12 minutes on 2 CPU cores, written to "
                    f"{DEFAULT_PATH}.",
        epilog="presets (flags given override them):\n"
               + "\n".join(f"  {n:<8} {', '.join(f'{k}={v}' for k, v in s.items()) or 'the defaults above'}"
                           for n, s in TRAIN_PRESETS.items())
               + "\n\nfiles beside --out: <stem>.last.pt (resume state), <stem>.metrics.jsonl, <stem>.loss.png"
               + "\nmulti-process: torchrun --nproc_per_node=N " + prog + " ... (--batch-size is per process)")
    add_dataclass_arguments(parser, TrainConfig)
    return parser


def config_from_args(explicit: dict) -> TrainConfig:
    """TrainConfig from the flags actually given: preset < flags; with --resume, saved run < flags."""
    if explicit.get("resume"):
        last = RunPaths.for_out(explicit.get("out", DEFAULT_PATH)).last
        if last.exists():
            saved = saved_settings(last)
            if "preset" in explicit and explicit["preset"] != saved.get("preset", explicit["preset"]):
                raise BytelmError(f"--preset {explicit['preset']} differs from the resumed run's "
                                  f"({saved['preset']}); give the flags to change instead")
            return TrainConfig(**{**saved, **explicit})
    explicit = dict(explicit)
    if explicit.get("init_from"):
        if explicit.get("resume"):
            raise BytelmError("--init-from starts a new run from a model's weights and --resume continues a run "
                              "as saved: give one of them")
        cfg = TrainConfig.from_preset(explicit.pop("preset", "default"), **explicit)
        return cfg.with_model(cfg.init_model_config(given=explicit))
    return TrainConfig.from_preset(explicit.pop("preset", "default"), **explicit)


def main(argv: Sequence[str] | None = None, prog: str = "train.py") -> int:
    args = build_parser(prog).parse_args(argv)
    cfg = config_from_args(given_values(args, TrainConfig))
    command = "bytelm train" if prog.startswith("bytelm") else f"python {prog}"
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        command = f"torchrun --nproc_per_node={world} {prog}"
    summary = train(cfg, command=command)
    return 130 if summary["stop_reason"] == "interrupted" else 0

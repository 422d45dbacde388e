"""What a training run tells its user: the opening line, each evaluation's line, the closing line, and the
messages for a divergence or a stop, with the command that resumes the run.

Pure functions of their arguments (strings out), so the loop in bytelm.train.loop only decides when to print.
"""
from __future__ import annotations

import shlex

from bytelm.checkpoint import DEFAULT_PATH
from bytelm.train.evaluate import printable
from bytelm.train.metrics import bits_per_byte
from bytelm.train.run_files import RunPaths
from bytelm.train.config import TrainConfig


def fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_rate(r: float) -> str:
    for unit, scale in (("MB/s", 1e6), ("kB/s", 1e3)):
        if r >= scale:
            return f"{r / scale:.1f}{unit}"
    return f"{r:.0f}B/s"


def opening_line(cfg: TrainConfig, info: dict, n_params: int, block_size: int, world_size: int, device,
                 dtype: str, threads: tuple[int, str] | None, start_step: int) -> str:
    """data, held-out share, model, device and batch: the first thing a run prints. threads: (count, why) on
    the CPU (bytelm.device.thread_choice), else None."""
    held_out = info["val_bytes"] / max(1, info["train_bytes"] + info["val_bytes"])
    return ((f"fine-tuning {cfg.init_from} | " if cfg.init_from and not cfg.resume else "")
            + f"data: {info['source']}: {info['train_bytes']:,} train / {info['val_bytes']:,} val bytes "
            f"({held_out:.1%} held out) | model: {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, {n_params:,} parameters, "
            f"context {block_size} | {world_size} x {device} {dtype}"
            + (f" ({threads[0]} thread{'s' if threads[0] > 1 else ''}: {threads[1]})" if threads else "")
            + f" | batch {cfg.batch_size} x {cfg.seq_len}"
            + (f" ({cfg.batch_size * cfg.seq_len // cfg.short_seq_len} x {cfg.short_seq_len} for the first "
               f"{cfg.short_seq_share:.0%} of steps)" if cfg.short_seq_len else "")
            + (f" x {world_size} processes" if world_size > 1 else "")
            + f" | {'resuming at step ' + str(start_step) + ' of ' if cfg.resume else ''}{cfg.steps} steps")


def eval_line(step: int, steps: int, recent_loss: float | None, bpb: float, improved: bool, metrics: dict,
              elapsed: float) -> str:
    train_bpb = f"{bits_per_byte(recent_loss):.3f}" if recent_loss is not None else "n/a"
    best = " (best, saved)" if improved else f" (best {metrics['best_val_bpb']:.4f} at {metrics['best_step']})"
    return f"step {step:>6}/{steps} | train bpb {train_bpb} | val bpb {bpb:.4f}{best} | {fmt_time(elapsed)}"


def sample_line(prompt: bytes, text: bytes) -> str:
    return f"  sample: {printable(prompt)}\u2502{printable(text)}"


def progress_postfix(loss: float, rate: float) -> str:
    return f"loss {loss:.3f} bpb {bits_per_byte(loss):.3f} {fmt_rate(rate)}"


def resume_command(command: str, cfg: TrainConfig, world_size: int) -> str:
    if world_size > 1 and "torchrun" not in command:
        command = f"torchrun --nproc_per_node={world_size} train.py"
    out = "" if cfg.out == DEFAULT_PATH else f" --out {shlex.quote(cfg.out)}"
    return f"{command} --resume{out}"


def closing_line(summary: dict, cfg: TrainConfig, paths: RunPaths, command: str, world_size: int) -> str:
    """What the run did, where its best model is, and for a stopped run how to go on."""
    step, start, reason = summary["steps"], summary["start_step"], summary["stop_reason"]
    best = (f"best val bpb {summary['best_val_bpb']:.4f} at step {summary['best_step']} in {paths.best}"
            if summary["best_val_bpb"] is not None else f"no evaluation yet, so no {paths.best}")
    rate = f"{fmt_time(summary['seconds'])}, {fmt_rate(summary['bytes_per_s'])}"
    if reason == "done":
        last = f"; final val bpb {summary['last_val_bpb']:.4f}" if summary["last_val_bpb"] is not None else ""
        return f"done: {step} steps ({step - start} in {rate}); {best}{last}"
    why = {"interrupted": "interrupted", "paused": f"paused (--stop-at {cfg.stop_at})",
           "time_budget": f"time budget of {cfg.time_budget:.0f} s reached"}[reason]
    extra = " --time-budget 0" if reason == "time_budget" else ""
    return (f"{why} at step {step} of {cfg.steps} ({rate}); {best}; resume state in {paths.last}\n"
            f"resume with: {resume_command(command, cfg, world_size)}{extra}")


def divergence_message(what: str, value, step: int, paths: RunPaths, metrics: dict, command: str,
                       cfg: TrainConfig, phrase: str = "is") -> str:
    """Why training stopped on a non-finite number, what was kept, and what to try."""
    kept = []
    if paths.last.exists():
        kept.append(f"the last good state is {paths.last}")
    if metrics.get("best_val_bpb") is not None:
        kept.append(f"the best model (val bpb {metrics['best_val_bpb']:.4f}, step {metrics['best_step']}) "
                    f"is {paths.best}")
    kept_s = "; ".join(kept) if kept else "nothing had been saved yet"
    then = (f", then: {command} --resume{'' if cfg.out == DEFAULT_PATH else ' --out ' + shlex.quote(cfg.out)} "
            "with those flags" if paths.last.exists() else "")
    return (f"training diverged: the {what} {phrase} {value} at step {step}; stopped without saving this model "
            f"({kept_s}). Try lower learning rates (--muon-lr {cfg.muon_lr / 2:g} --adam-lr {cfg.adam_lr / 2:g}), "
            f"a longer --warmup or --dtype fp32{then}")

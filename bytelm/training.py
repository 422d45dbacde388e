"""The training loop: TrainConfig and presets, the learning-rate schedule, evaluation, checkpoints, DDP.

    python train.py                               # default run: built-in corpus, <= ~12 min on 2 CPU cores
    python train.py --preset seed                 # the upstream recipe: batch 24 x 512, 5,000 steps
    python train.py --resume                      # continue the run behind byte_llm_model.pt
    torchrun --nproc_per_node=2 train.py ...      # DDP, one process per GPU (or CPU worker)

    from bytelm.training import TrainConfig, train
    summary = train(TrainConfig.from_preset("tiny", data="notes.txt", out="tiny.pt"))

Files, all beside --out (docs/training.md):
    byte_llm_model.pt               the model with the best validation bits per byte so far
    byte_llm_model.last.pt          the latest full state (optimizer, data position, RNG) for --resume
    byte_llm_model.metrics.jsonl    one JSON line per step and per evaluation
    byte_llm_model.loss.png         train and validation curves
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import math
import os
import signal
import sys
import threading
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import DEFAULT_PATH, check_weights, read_checkpoint, remove_stale_temps, save_checkpoint
from .config import DOC_SEPARATOR, MODEL_PRESETS, ModelConfig
from .batches import BatchSampler, eval_batches
from .corpus import load_corpus
from .device import autocast, default_dtype, pick_device
from .errors import BytelmError, DataError
from .metrics import MetricsLog, bits_per_byte, plot_losses
from .model import ByteLM
from .optim import MOMENTUM, MOMENTUM_START, build_optimizers

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None


PLAN_AT_STEP = 20  # with a time budget, steps 5..20 are timed and the run's length is fitted to the budget


# torch.compile (block by block) takes ~20 s for the default model on 2 CPU cores; below this many steps it does not
# pay back (measured 0.458 vs 0.578 s per step at batch 16 x 128: bench/bench_train.py).
COMPILE_MIN_STEPS = 300


def _arg(default, help: str, group: str):
    """A TrainConfig field that becomes a command-line flag with this help text."""
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class TrainConfig:
    """Everything a training run needs. Flags are derived from these fields (`--batch-size` <- batch_size)."""
    # data
    data: str = _arg("builtin", "training data: builtin, cosmopedia, a file, a folder or a glob",
                     "data")  # Python's own docs: works offline, 1.9 MB
    text_field: str = _arg("text", "field holding the text in .jsonl/.parquet/streamed records",
                           "data")  # the HuggingFace convention
    val_fraction: float = _arg(0.05, "share of documents held out for validation",
                               "data")  # 1 in 20: ~90 KB of the built-in corpus
    max_bytes: int = _arg(0, "use at most this many bytes of documents (0: all)", "data")  # all of it
    cache_dir: str = _arg("", "data cache folder (default: $BYTELM_CACHE, else ~/.cache/bytelm)",
                          "data")  # empty: bytelm.data picks
    # model
    preset: str = _arg("default", "named settings to start from (flags given override them)",
                       "model")  # the CPU run described below
    n_layer: int = _arg(ModelConfig.n_layer, "transformer blocks", "model")  # upstream shape, 6
    n_head: int = _arg(ModelConfig.n_head, "attention heads", "model")  # upstream shape, 8
    n_embd: int = _arg(ModelConfig.n_embd, "model width", "model")  # upstream shape, 192
    block_size: int = _arg(0, "context window the model is built for (0: seq_len)",
                           "model")  # RoPE only learns the positions it is trained on
    value_embeds: bool = _arg(False, "give every layer a byte table added to its attention values (value embeddings)",
                              "model")  # docs/training.md, "Value embeddings"
    # length and batch
    steps: int = _arg(1000, "total optimizer steps of the run; a resumed run continues toward it",
                      "run")  # ~0.6 s each on 2 idle CPU cores: ~10 min; --time-budget trims it when slower
    batch_size: int = _arg(16, "sequences per step on EACH process (global batch = this x processes)",
                           "run")  # 2 KiB per step: many cheap steps beat few big ones in 15 CPU minutes
    seq_len: int = _arg(128, "bytes per training sequence", "run")  # 4x cheaper than 512; still ~20 words
    short_seq_len: int = _arg(0, "train the first --short-seq-share of the steps on shorter windows, this long (a "
                              "divisor of --seq-len), cutting each sequence into pieces (0: off)",
                              "run")  # early on the model uses little context; short windows make those steps cheaper
    short_seq_share: float = _arg(0.5, "share of the steps trained on --short-seq-len windows", "run")  # see above
    time_budget: float = _arg(720.0, "seconds this process may train: the run's length is fitted to it after "
                              f"{PLAN_AT_STEP} timed steps, and it stops (evaluating, saving) when it runs out "
                              "(0: no limit)", "run")  # the default run ends in ~12 min even on a busy machine
    stop_at: int = _arg(0, "pause after this step as Ctrl-C would (resume later with --resume; 0: never)",
                        "run")  # train a long schedule in chunks
    # optimizer
    muon_lr: float = _arg(0.01, "Muon learning rate (attention and MLP matrices)", "optimizer")  # upstream
    adam_lr: float = _arg(0.001, "AdamW learning rate (embedding, head, norms)", "optimizer")  # upstream
    muon_weight_decay: float = _arg(0.1, "Muon decoupled weight decay (AdamW parameters get none)",
                                    "optimizer")  # torch.optim.Muon's default, as upstream
    warmup: int = _arg(50, "steps of linear learning-rate warmup", "optimizer")  # ~4% of the default run
    cooldown: float = _arg(0.4, "final share of steps over which the learning rate decays linearly to 0",
                           "optimizer")  # warmup-stable-decay, as modded-nanogpt's Muon runs
    momentum_warmup: int = _arg(300, f"steps over which Muon's momentum rises linearly from {MOMENTUM_START} to "
                                f"{MOMENTUM} (0: {MOMENTUM} throughout)",
                                "optimizer")  # modded-nanogpt's; docs/training.md, "Optimizer"
    normuon: bool = _arg(True, "even out the neurons' Muon step sizes by a running second moment (NorMuon)",
                         "optimizer")  # -0.02 val bpb in fixed-step screens; docs/training.md, "Optimizer"
    grad_clip: float = _arg(1.0, "clip the global gradient norm to this (0: off)", "optimizer")  # GPT-2 habit
    # precision and device
    device: str = _arg("auto", "cpu, cuda, cuda:N or auto (CUDA if present)", "device")  # fastest present
    dtype: str = _arg("auto", "autocast precision: fp32, bf16 or auto (the faster on this device)",
                      "device")  # bf16 only where it is fast: bytelm.device
    threads: int = _arg(0, "CPU threads for torch (0: the cores other processes leave free)",
                        "device")  # busy cores stall OpenMP: auto_threads
    compile: str = _arg("auto", "torch.compile the training forward/backward: on, off, or auto (on for runs "
                        f"of at least {COMPILE_MIN_STEPS} steps in one process)",
                        "device")  # 1.26x per step at 16x128 here, after a ~20 s compile: docs/training.md
    seed: int = _arg(1337, "seed for initialisation and batches", "device")  # nanoGPT's
    # evaluation, logging, checkpoints
    eval_every: int = _arg(100, "evaluate validation bits per byte every this many steps",
                           "eval")  # 10 evals of ~2 s in the default run
    eval_batches: int = _arg(8, "held-out batches per evaluation (fixed, the same every time)",
                             "eval")  # 8 x 16 x 128 = 16 KiB, spread over the 88 KB built-in val split
    sample_bytes: int = _arg(100, "bytes of sample text printed at each evaluation (0: none)", "eval")  # a glance
    save_every: int = _arg(100, "write the resume state (<out>.last.pt) every this many steps",
                           "eval")  # each save costs ~0.1 s; lose at most 100 steps to a crash
    out: str = _arg(DEFAULT_PATH, "checkpoint path; holds the best-validation model", "eval")  # upstream's name
    plot: bool = _arg(True, "write <out stem>.loss.png at each evaluation", "eval")  # matplotlib, Agg
    resume: bool = _arg(False, "continue the run saved in <out stem>.last.pt", "eval")  # explicit, never guessed
    force: bool = _arg(False, "overwrite an existing --out and its run files", "eval")  # never by accident

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_preset(cls, name: str = "default", **overrides) -> "TrainConfig":
        """The preset's settings with `overrides` on top."""
        if name not in TRAIN_PRESETS:
            raise BytelmError(f"unknown preset {name!r}: choose from {', '.join(TRAIN_PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise BytelmError(f"unknown training settings {unknown}")
        return cls(**{**TRAIN_PRESETS[name], **overrides, "preset": name})

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise BytelmError(f"invalid training setting: {msg}")

        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v, t = getattr(self, f.name), hints[f.name]
            ok = (isinstance(v, bool) if t is bool else
                  isinstance(v, int) and not isinstance(v, bool) if t is int else
                  isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if t is float else
                  isinstance(v, t))
            if not ok:
                bad(f"{f.name} must be {t.__name__}, got {v!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) < 1:
                bad(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_bytes", "block_size", "warmup", "momentum_warmup", "sample_bytes", "threads", "stop_at",
                     "time_budget", "grad_clip", "muon_weight_decay"):
            if getattr(self, name) < 0:
                bad(f"{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        for name in ("muon_lr", "adam_lr"):
            if getattr(self, name) <= 0:
                bad(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.cooldown <= 1:
            bad(f"cooldown must be a fraction in [0, 1], got {self.cooldown}")
        if not 0 <= self.short_seq_share <= 1:
            bad(f"short-seq-share must be a fraction in [0, 1], got {self.short_seq_share}")
        if self.short_seq_len and (self.short_seq_len >= self.seq_len or self.seq_len % self.short_seq_len):
            bad(f"short-seq-len ({self.short_seq_len}) must be a divisor of seq-len ({self.seq_len}) smaller than it")
        if not 0 <= self.val_fraction < 1:
            bad(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            bad(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.compile not in ("auto", "on", "off"):
            bad(f"compile must be auto, on or off, got {self.compile!r}")
        if self.preset not in TRAIN_PRESETS:
            bad(f"unknown preset {self.preset!r}: choose from {', '.join(TRAIN_PRESETS)}")
        if self.block_size and self.seq_len > self.block_size:
            bad(f"seq-len ({self.seq_len}) is longer than the model's block-size ({self.block_size})")
        if not self.out:
            bad("out must be a file path")
        self.model_config()  # raises on an impossible shape

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                           block_size=self.block_size or self.seq_len, value_embeds=self.value_embeds)


# Named starting points; flags override them. "default" is TrainConfig's own defaults.
TRAIN_PRESETS: dict[str, dict] = {
    "default": {},
    # The upstream recipe exactly: default 6x8x192 model, context 512. Hours on a CPU; minutes on a GPU.
    "seed": dict(batch_size=24, seq_len=512, block_size=512, steps=5000, muon_lr=0.01, adam_lr=0.001,
                 warmup=100, eval_every=250, eval_batches=20, save_every=250, time_budget=0.0),
    # Tests and smoke runs: trains in seconds, so compiling (tens of seconds) never pays, even for --steps 100000
    # runs that are stopped early.
    "tiny": dict(**{k: v for k, v in MODEL_PRESETS["tiny"].items() if k != "block_size"}, seq_len=64,
                 batch_size=8, steps=60, warmup=5, eval_every=20, eval_batches=4, save_every=20,
                 sample_bytes=32, time_budget=0.0, compile="off"),
}


def lr_scale(step: int, total_steps: int, warmup: int, cooldown: float) -> float:
    """Learning-rate multiplier for the update that turns `step` completed steps into step + 1.

    Linear warmup over `warmup` steps, flat, then a linear decay to zero over the last `cooldown` share of
    `total_steps`. A pure function of its arguments, so a resumed run follows the same curve exactly.
    """
    scale = 1.0
    if warmup > 0:
        scale = min(scale, (step + 1) / warmup)
    decay_steps = int(round(cooldown * total_steps))
    if decay_steps > 0:
        scale = min(scale, (total_steps - step) / decay_steps)
    return max(scale, 0.0)


def muon_momentum(step: int, warmup: int) -> float:
    """Muon's momentum for the update after `step`: MOMENTUM_START rising linearly to MOMENTUM over `warmup` steps.

    Early on the gradient's direction changes fast, and a long momentum average (0.95 spans ~20 steps) lags
    behind it; in 1,200-step screens the warmup lowered validation bpb in both seeds (docs/training.md).
    A pure function of the step, like lr_scale, so a resumed run follows the same curve.
    """
    if warmup <= 0:
        return MOMENTUM
    frac = min(step / warmup, 1.0)
    return MOMENTUM_START + frac * (MOMENTUM - MOMENTUM_START)


def _shortest_total(step: int, cooldown: float) -> int:
    """The fewest total steps whose decay has not begun before the update after `step` (lr_scale flat there)."""
    return math.ceil((step + 1) / (1 - cooldown)) if cooldown < 1 else step + 1


def plan_steps(cfg: TrainConfig, step: int, elapsed: float, per_step: float) -> int:
    """The most total steps (at most cfg.steps) that fit in what is left of cfg.time_budget.

    Evaluations are counted at (eval_batches / 3 + 2) steps each: a forward pass is about a third of a training
    step, plus the sample, the plot and the checkpoint. 3% of the budget is kept as margin. Called before the
    cooldown starts, so the schedule run so far is exactly the new total's: lr_scale is flat there.
    """
    left = 0.97 * cfg.time_budget - elapsed
    eval_cost = per_step * (cfg.eval_batches / 3 + 2)
    per_step_all_in = per_step + eval_cost / cfg.eval_every
    fit = step + int((left - eval_cost) / per_step_all_in)
    # Never so short that the cooldown would have begun before `step` (the hard budget stop still holds).
    shortest = _shortest_total(step, cfg.cooldown)
    return min(cfg.steps, max(shortest, fit))


# Share of the time left that each re-plan keeps unused. The stretch between two evaluations can run ~10% slower
# than the one the pace was measured on (a shared machine; seen in tests/test_training.py's slow-evaluation run,
# which overran a 3% margin and hit the hard stop two steps before the end of its decay).
REPLAN_MARGIN = 0.1


def replan_steps(cfg: TrainConfig, step: int, elapsed: float, pace: float, asked: int) -> tuple[int, float]:
    """Refit the run to `pace`, the seconds per step measured since the last plan with evaluations, saves and
    any slowdown of the machine included, so that the learning-rate decay ends as the budget does, whether the
    machine slowed down or sped up since the last plan. Used at each evaluation. `asked`: the --steps given,
    never exceeded. REPLAN_MARGIN of the time left is kept unused. Returns (total steps, cooldown share).

    Before the decay the cooldown share is kept: the new plan is exactly a run planned with that many steps.
    Once the decay has begun, the cooldown share is refitted with the steps so that the decay goes on from
    the current learning rate, with no jump, and reaches zero at the new last step; both are saved, so
    `--resume` follows the same curve.
    """
    fit = step + int((1 - REPLAN_MARGIN) * (cfg.time_budget - elapsed) / pace)
    if not cooldown_started(step, cfg.steps, cfg.cooldown):
        shortest = _shortest_total(step, cfg.cooldown)
        return min(asked, max(shortest, fit)), cfg.cooldown
    rate = lr_scale(step, cfg.steps, cfg.warmup, cfg.cooldown)  # of the next update; > 0 as step < steps
    longest = int(step / (1 - rate)) if rate < 1 else asked  # more would need a decay longer than the run
    total = min(asked, longest, max(step + 1, fit))
    # Rounded up, so the rate goes on at or just below where it was (lr_scale(step, total, ., decay / total)).
    decay = min(total, max(1, math.ceil((total - step) / rate - 1e-9)))
    return total, decay / total


def in_short_phase(step: int, total_steps: int, cfg: TrainConfig) -> bool:
    """Whether the update after `step` trains on --short-seq-len windows (the first --short-seq-share of steps)."""
    return cfg.short_seq_len > 0 and step < round(cfg.short_seq_share * total_steps)


def cooldown_started(step: int, total_steps: int, cooldown: float) -> bool:
    """Whether lr_scale has begun its decay for the update after `step` (the plan is fixed from then on)."""
    return total_steps - step <= int(round(cooldown * total_steps))


@dataclass
class RunPaths:
    best: Path
    last: Path
    metrics: Path
    plot: Path

    @classmethod
    def for_out(cls, out: str | os.PathLike) -> "RunPaths":
        """byte_llm_model.pt -> byte_llm_model.{last.pt, metrics.jsonl, loss.png}, all in the same folder."""
        out = Path(out)
        stem = out.stem if out.suffix == ".pt" else out.name
        return cls(out, out.with_name(f"{stem}.last.pt"), out.with_name(f"{stem}.metrics.jsonl"),
                   out.with_name(f"{stem}.loss.png"))

    def as_dict(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}


def lock_path(out: str | os.PathLike) -> Path:
    """The hidden file a run locks while it writes `out` and its run files: .byte_llm_model.pt.lock."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, enabled: bool = True):
    """Hold an exclusive lock on `out` for the whole run, so a second run at the same --out (which with --force
    would delete the first one's files, and would otherwise interleave its checkpoints) is refused at once
    with the first one's PID. flock is released by the kernel when a process dies, even by SIGKILL, so a
    crashed run never leaves a stale lock. Where flock is missing or unsupported (Windows, some network
    filesystems) runs are not locked.
    """
    if not enabled or fcntl is None:
        yield
        return
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BytelmError(f"cannot create the folder of --out {out}: {e.strerror or e}") from None
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise BytelmError(f"cannot write beside --out {out} ({path}: {e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (PID {pid})" if pid.isdigit() else ""
            raise BytelmError(f"another training run{who} is writing {out}; wait for it to finish or stop it, "
                              f"or choose another --out") from None
        except OSError:  # ENOLCK and friends: this filesystem cannot lock; run unlocked as before
            os.close(fd)
            yield
            return
        # A run that just finished deletes the file after we opened it: then our lock is on a file nobody
        # else can see, so open the new one and lock again.
        try:
            st, mine = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise BytelmError(f"cannot lock {path}: it keeps being replaced")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)  # while still locked, so anyone who opened it sees it gone and starts again
        except OSError:
            pass
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is one process.

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if world == 1:
        return Dist(device=device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local, device, owns)


def _all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_reduce_max(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def auto_threads() -> int:
    """CPU threads for torch: the cores that other processes are not already keeping busy.

    OpenMP threads wait for each other at every parallel region, so a thread sharing its core with another
    busy process stalls all of them. Measured on the 2-core test machine with one other job running: the
    default model's step took 2-14 s with 2 threads and a steady 0.95 s with 1. OMP_NUM_THREADS (torchrun
    sets it) is respected.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (OSError, AttributeError):
        busy = 0
    return max(1, min(torch.get_num_threads(), cores - busy))


# ---------------------------------------------------------------------------------------------------------
# Evaluation and a tiny sampler (the generation module is separate; training only needs a glance).

@torch.no_grad()
def evaluate(model: ByteLM, batches, device: torch.device, dtype: str, d: Dist = Dist()) -> float:
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
    _all_reduce_sum(total, d)
    model.train(was_training)
    return (total[0] / total[1]).item()


@torch.no_grad()
def sample_bytes(model: ByteLM, prompt: bytes, n: int, seed: int = 0, temperature: float = 0.8) -> bytes:
    """Up to n bytes continuing `prompt`, sampled at `temperature` from a fixed-seed generator (fp32)."""
    device = next(model.parameters()).device
    n = min(n, model.config.block_size - len(prompt))
    if n <= 0 or not prompt:
        return b""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(1)
    logits, _ = model(torch.tensor([list(prompt)], device=device), cache=cache, last_only=True)  # (1, 1, V)
    out: list[int] = []
    while True:
        probs = F.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)  # (V,)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
        if len(out) == n:
            break
        logits, _ = model(torch.tensor([out[-1:]], device=device), cache=cache)  # (1, 1, V)
    model.train(was_training)
    return bytes(out)


def sample_prompt(val, length: int = 24) -> bytes:
    """The opening bytes of the first held-out document: a prompt the model has never trained on."""
    head = bytes(val[: 4 * length])
    for part in head.split(bytes([DOC_SEPARATOR])):
        if part.strip():
            return part[:length]
    return bytes([DOC_SEPARATOR])


def _show(b: bytes) -> str:
    """Bytes -> one printable line: invalid UTF-8 becomes U+FFFD, newlines and NULs are escaped."""
    return json.dumps(b.decode("utf-8", errors="replace"), ensure_ascii=False)[1:-1]


# ---------------------------------------------------------------------------------------------------------
# The loop.

class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second Ctrl-C aborts at once."""

    def __init__(self, announce):
        self.requested = False
        self.announce = announce
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.announce(f"\n{signal.Signals(signum).name}: finishing this step and saving "
                      "(press Ctrl-C again to abort without saving)")

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteLoss(BytelmError):
    """The loss or gradient became NaN/Inf; training stopped without saving the broken model."""


def _run_file_error(path, e: OSError) -> BytelmError:
    return BytelmError(f"cannot write {path}: {e.strerror or e}; training stopped, and the checkpoints already "
                       "saved are unchanged")


class _RunLog(MetricsLog):
    """The metrics log, whose write errors (a full disk, a failing device) stop the run with one clear line
    instead of a traceback: with the disk full, this small append is often the first write to fail."""

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            raise _run_file_error(self.path, e) from None

    def write(self, record: dict) -> None:
        self._guard(super().write, record)

    def truncate_after(self, step: int) -> None:
        self._guard(super().truncate_after, step)

    def reset(self) -> None:
        self._guard(super().reset)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_rate(r: float) -> str:
    for unit, scale in (("MB/s", 1e6), ("kB/s", 1e3)):
        if r >= scale:
            return f"{r / scale:.1f}{unit}"
    return f"{r:.0f}B/s"


def train(cfg: TrainConfig, *, progress: bool = True, command: str = "python train.py") -> dict:
    """Run (or resume) training as `cfg` says. Returns a summary dict (see the end of _train).

    Raises BytelmError for anything the user can fix, NonFiniteLoss if the loss diverges.
    `command` is how the user launched us, used in the resume hint.
    """
    cfg.validate()
    d = setup_distributed(cfg.device)
    try:
        with run_lock(cfg.out, enabled=d.main):  # rank 0 writes every file, so it holds the lock
            return _train(cfg, d, progress, command)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, progress: bool, command: str) -> dict:
    import tqdm

    cfg = dataclasses.replace(cfg)  # our copy: a time budget may shorten cfg.steps (plan_steps)
    paths = RunPaths.for_out(cfg.out)
    device = d.device
    dtype = default_dtype(device) if cfg.dtype == "auto" else cfg.dtype
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or auto_threads())
    bar = None

    def say(msg: str) -> None:
        if d.main:
            (tqdm.tqdm.write(msg) if bar is not None and not bar.disable else print(msg, flush=True))

    # Refuse to clobber a run before doing anything slow.
    if paths.best.is_dir():
        raise BytelmError(f"--out {paths.best} is a folder; give a file path such as {paths.best / DEFAULT_PATH}")
    state: dict = {}
    if cfg.resume:
        if not paths.last.exists():
            only_best = f" ({paths.best} exists but holds only the best weights)" if paths.best.exists() else ""
            raise BytelmError(f"--resume: no resume state at {paths.last}{only_best}; start a new run without --resume")
        ckpt = read_checkpoint(paths.last)
        state = ckpt.get("train_state") or {}
        if not {"step", "optimizers", "sampler"} <= set(state):
            raise BytelmError(f"{paths.last} has no training state to resume from")
        if ckpt["model_config"] != cfg.model_config().to_dict():
            raise BytelmError(f"--resume: {paths.last} holds a {_shape(ckpt['model_config'])} model but the "
                              f"settings ask for {_shape(cfg.model_config().to_dict())}; drop the model flags")
    elif not cfg.force:
        for p in (paths.best, paths.last):
            if p.exists():
                raise BytelmError(f"{p} already exists: add --resume to continue that run, --force to start "
                                  f"over and overwrite it, or choose another --out")
    if d.main:  # temp files of saves that a SIGKILL cut short; safe to delete while we hold the run lock
        for p in (paths.best, paths.last):
            remove_stale_temps(p)
    if cfg.stop_at and cfg.stop_at <= state.get("step", 0):
        raise BytelmError(f"--stop-at {cfg.stop_at} is not after the resumed step {state['step']}")

    corpus = load_corpus(cfg.data, val_fraction=cfg.val_fraction, text_field=cfg.text_field,
                         cache_dir=cfg.cache_dir or None, max_bytes=cfg.max_bytes or None,
                         rank=d.rank, world_size=d.world_size)
    if len(corpus.val) == 0:
        raise DataError(f"{corpus.info['source']}: the validation split is empty; raise --val-fraction "
                        "or add documents")
    val_batches = eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches)
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, d.rank, d.world_size)

    model_cfg = cfg.model_config()
    if cfg.resume:  # before allocating the model: the resumed settings came from that file (config_from_args)
        check_weights(paths.last, model_cfg, ckpt["model"])
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = ByteLM(model_cfg).to(device)
    optimizers = build_optimizers(model, muon_lr=cfg.muon_lr, adam_lr=cfg.adam_lr,
                                  muon_weight_decay=cfg.muon_weight_decay, normuon=cfg.normuon)
    metrics = {"best_val_bpb": None, "best_step": None, "last_val_bpb": None}
    step, elapsed_before = 0, 0.0
    if cfg.resume:
        model.load_state_dict(ckpt["model"])
        for opt, sd in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)
        sampler.load_state_dict(state["sampler"])
        rng = state.get("rng") or {}
        if isinstance(rng.get("torch"), torch.Tensor):
            torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
        step, elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
        metrics.update(state.get("metrics") or {})
        old_sha = (state.get("data_info") or {}).get("sha256")
        if old_sha and old_sha != corpus.info.get("sha256"):
            say(f"warning: the data differ from the run being resumed ({state['data_info'].get('source')}); "
                "continuing on the new data")
        if state.get("world_size", 1) != d.world_size:
            say(f"warning: resuming a {state.get('world_size', 1)}-process run on {d.world_size}; "
                "the data order will differ from an uninterrupted run")
        del ckpt
    ddp_model = model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Compiled blocks serve training steps only; evaluation and sampling run the same weights eagerly.
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and d.world_size == 1
                                          and cfg.steps - step >= COMPILE_MIN_STEPS)
    model.compile_blocks(use_compile)

    log = _RunLog(paths.metrics, enabled=d.main)
    if d.main:
        if cfg.resume:
            log.truncate_after(step)  # steps after the saved state are about to be redone
        else:  # --force, or a fresh path: start clean (done only now, after data and model loaded fine)
            for p in (paths.best, paths.last, paths.plot):
                p.unlink(missing_ok=True)
            log.reset()

    def train_state(full: bool) -> dict:
        s = {"step": step, "config": asdict(cfg), "metrics": dict(metrics), "data_info": corpus.info,
             "world_size": d.world_size, "elapsed": elapsed_before + (time.perf_counter() - t_start)}
        if full:
            s["optimizers"] = [opt.state_dict() for opt in optimizers]
            s["sampler"] = sampler.state_dict()  # identical on every rank (bytelm.data.BatchSampler)
            s["rng"] = {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        return s

    def check_weights_finite() -> None:
        # The loss check in the loop sees a non-finite update only one step later; an optimizer step can turn
        # finite gradients into inf/NaN weights (a huge learning rate), and the save right after it would
        # then replace the last good state with a broken model. Identical on every rank (DDP weights agree).
        if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            raise NonFiniteLoss(_nonfinite_message("model weights", "not finite (inf or nan)", step, paths,
                                                   metrics, command, cfg, phrase="are"))

    def save_last() -> None:
        check_weights_finite()
        if d.main:
            save_checkpoint(paths.last, model, model_cfg, train_state(full=True))

    def run_eval() -> None:
        check_weights_finite()
        val_loss = evaluate(model, val_batches, device, dtype, d)
        if not math.isfinite(val_loss):  # never "best, saved" for a broken model (nan < best is False, None is not)
            raise NonFiniteLoss(_nonfinite_message("validation loss", val_loss, step, paths, metrics, command, cfg))
        bpb = bits_per_byte(val_loss)
        metrics["last_val_bpb"] = bpb
        improved = metrics["best_val_bpb"] is None or bpb < metrics["best_val_bpb"]
        if improved:
            metrics["best_val_bpb"], metrics["best_step"] = bpb, step
        if not d.main:
            return
        log.write({"step": step, "val_loss": val_loss, "val_bpb": bpb, "time": round(_elapsed(), 3)})
        if improved:
            save_checkpoint(paths.best, model, model_cfg, train_state(full=False))
        train_bpb = f"{bits_per_byte(recent_loss):.3f}" if recent_loss is not None else "n/a"
        say(f"step {step:>6}/{cfg.steps} | train bpb {train_bpb} | val bpb {bpb:.4f}"
            + (" (best, saved)" if improved else f" (best {metrics['best_val_bpb']:.4f} at {metrics['best_step']})")
            + f" | {_fmt_time(_elapsed())}")
        if cfg.sample_bytes:
            text = sample_bytes(model, prompt, cfg.sample_bytes, seed=cfg.seed)
            say(f"  sample: {_show(prompt)}\u2502{_show(text)}")
        if cfg.plot:
            try:
                plot_losses(paths.metrics, paths.plot)
            except OSError as e:  # a full disk: one clear line, not a matplotlib traceback
                raise _run_file_error(paths.plot, e) from None

    prompt = sample_prompt(corpus.val)
    bytes_per_step = cfg.batch_size * cfg.seq_len * d.world_size
    start_step = step
    if d.main:
        n_params = model.num_params()
        say(f"data: {corpus.info['source']}: {corpus.info['train_bytes']:,} train / {corpus.info['val_bytes']:,} "
            f"val bytes | model: {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, {n_params:,} parameters, context "
            f"{model_cfg.block_size} | {d.world_size} x {device} {dtype}"
            + (f" ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
               if device.type == "cpu" else "")
            + f" | batch {cfg.batch_size} x {cfg.seq_len}"
            + (f" ({cfg.batch_size * cfg.seq_len // cfg.short_seq_len} x {cfg.short_seq_len} for the first "
               f"{cfg.short_seq_share:.0%} of steps)" if cfg.short_seq_len else "")
            + (f" x {d.world_size} processes" if d.world_size > 1 else "")
            + f" | {'resuming at step ' + str(step) + ' of ' if cfg.resume else ''}{cfg.steps} steps")

    t_start = time.perf_counter()

    def _elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    stop_reason = "done"
    recent_loss = None
    last_eval_step = -1
    if step >= cfg.steps:
        say(f"the run is already at step {step} of {cfg.steps}: nothing to do (raise --steps to train further)")
    bar = tqdm.tqdm(total=cfg.steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True,
                    disable=not (progress and d.main and sys.stderr.isatty()))
    rate = None  # bytes/s, smoothed
    step_times: list[float] = []
    plan_at = PLAN_AT_STEP if cfg.time_budget > 0 and start_step == 0 and cfg.steps > 2 * PLAN_AT_STEP else 0
    plan_mark = None  # (step, time) of the last plan: re-planning measures the pace from there
    try:
        with _StopRequest(say) as stop:
            while step < cfg.steps:
                t_step = time.perf_counter()
                scale = lr_scale(step, cfg.steps, cfg.warmup, cfg.cooldown)
                for opt, base in zip(optimizers, (cfg.muon_lr, cfg.adam_lr)):
                    for group in opt.param_groups:
                        group["lr"] = base * scale
                for group in optimizers[0].param_groups:  # Muon
                    group["momentum"] = muon_momentum(step, cfg.momentum_warmup)
                x, y = sampler.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if in_short_phase(step, cfg.steps, cfg):
                    # The same bytes as more, shorter windows: (B, T) -> (B * T / t, t). Context is what the
                    # model learns to use last; positions t..T-1 are trained in the rest of the run.
                    x, y = x.view(-1, cfg.short_seq_len), y.view(-1, cfg.short_seq_len)
                try:
                    with autocast(device, dtype):
                        _, loss = ddp_model(x, y)
                except Exception as e:  # compilation happens at the first call; fall back rather than fail
                    if not model.blocks_compiled or cfg.compile == "on":
                        raise
                    say(f"warning: torch.compile failed here ({type(e).__name__}); training without it "
                        "(--compile off skips the attempt)")
                    model.compile_blocks(False)
                    with autocast(device, dtype):
                        _, loss = ddp_model(x, y)
                loss.backward()
                if cfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                               if p.grad is not None])
                # One collective per step carries everything the ranks must agree on.
                time_up = cfg.time_budget > 0 and time.perf_counter() - t_start >= cfg.time_budget
                flags = torch.stack([loss.detach().double(), grad_norm.detach().double().to(device),
                                     torch.tensor(float(stop.requested or time_up), dtype=torch.float64,
                                                  device=device),
                                     torch.tensor(float(time_up), dtype=torch.float64, device=device)])
                flags = _all_reduce_sum(flags, d).tolist()
                loss_value = flags[0] / d.world_size
                if not (math.isfinite(loss_value) and math.isfinite(flags[1])):
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    raise NonFiniteLoss(_nonfinite_message(what, loss_value if what == "loss" else flags[1],
                                                           step + 1, paths, metrics, command, cfg))
                for opt in optimizers:
                    opt.step()
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                step += 1
                recent_loss = loss_value if recent_loss is None else 0.9 * recent_loss + 0.1 * loss_value
                log.write({"step": step, "loss": loss_value, "lr_scale": scale,
                           "bytes": step * bytes_per_step, "time": round(_elapsed(), 3)})
                dt = time.perf_counter() - t_step
                step_times.append(dt)
                rate = bytes_per_step / dt if rate is None else 0.9 * rate + 0.1 * bytes_per_step / dt
                bar.set_postfix_str(f"loss {loss_value:.3f} bpb {bits_per_byte(loss_value):.3f} "
                                    f"{_fmt_rate(rate)}", refresh=False)
                bar.update(1)
                if step == plan_at:
                    per_step = sorted(step_times[PLAN_AT_STEP // 4:])[len(step_times[PLAN_AT_STEP // 4:]) // 2]
                    if d.world_size > 1:  # plan for the slowest rank, and agree on it
                        per_step = _all_reduce_max(torch.tensor(per_step, device=device), d).item()
                    planned = plan_steps(cfg, step, time.perf_counter() - t_start, per_step)
                    asked_steps, plan_mark = cfg.steps, (step, time.perf_counter())
                    if planned < cfg.steps:
                        say(f"time budget {cfg.time_budget:.0f} s: at {per_step:.2f} s per step here, the run is "
                            f"planned as {planned} steps instead of {cfg.steps}, so its learning-rate decay "
                            f"finishes in time (--time-budget 0 runs all --steps)")
                        cfg.steps = planned
                        bar.total = planned
                        bar.refresh()

                paused = flags[2] > 0 or (cfg.stop_at and step >= cfg.stop_at)
                if step % cfg.eval_every == 0 or step == cfg.steps or (flags[3] > 0 and step != last_eval_step):
                    run_eval()
                    last_eval_step = step
                if step % cfg.save_every == 0 or step == cfg.steps or paused:
                    save_last()
                if plan_mark and step > plan_mark[0] and step % cfg.eval_every == 0 and step < cfg.steps:
                    now = time.perf_counter()
                    pace = (now - plan_mark[1]) / (step - plan_mark[0])  # since the last plan, evals included
                    if d.world_size > 1:
                        pace = _all_reduce_max(torch.tensor(pace, device=device), d).item()
                    replanned, cooldown = replan_steps(cfg, step, now - t_start, pace, asked_steps)
                    plan_mark = (step, now)
                    # Any shortening is taken (running over the budget cuts the decay short); a longer plan
                    # only when it gains over 1%, so a steady pace does not re-plan at every evaluation.
                    if replanned < cfg.steps or replanned > 1.01 * cfg.steps:
                        if abs(replanned - cfg.steps) > 0.01 * cfg.steps:
                            say(f"time budget: {pace:.2f} s per step since the last plan, evaluations included; "
                                f"re-planned as {replanned} steps instead of {cfg.steps}")
                        cfg.steps, cfg.cooldown = replanned, cooldown
                        bar.total = replanned
                        bar.refresh()
                if paused:
                    stop_reason = ("time_budget" if flags[3] > 0 else
                                   "interrupted" if flags[2] > 0 else "paused")
                    break
    finally:
        bar.close()
        log.close()

    seconds = time.perf_counter() - t_start
    trained_bytes = (step - start_step) * bytes_per_step
    summary = {
        "stop_reason": stop_reason, "steps": step, "start_step": start_step, "total_steps": cfg.steps,
        "best_val_bpb": metrics["best_val_bpb"], "best_step": metrics["best_step"],
        "last_val_bpb": metrics["last_val_bpb"], "seconds": seconds,
        "bytes_per_s": trained_bytes / seconds if seconds > 0 else 0.0, "paths": paths.as_dict(),
    }
    if d.main:
        best = (f"best val bpb {metrics['best_val_bpb']:.4f} at step {metrics['best_step']} in {paths.best}"
                if metrics["best_val_bpb"] is not None else f"no evaluation yet, so no {paths.best}")
        rate_s = f"{_fmt_time(seconds)}, {_fmt_rate(summary['bytes_per_s'])}"
        if stop_reason == "done":
            last = f"; final val bpb {metrics['last_val_bpb']:.4f}" if metrics["last_val_bpb"] is not None else ""
            say(f"done: {step} steps ({step - start_step} in {rate_s}); {best}{last}")
        else:
            why = {"interrupted": "interrupted", "paused": f"paused (--stop-at {cfg.stop_at})",
                   "time_budget": f"time budget of {cfg.time_budget:.0f} s reached"}[stop_reason]
            extra = " --time-budget 0" if stop_reason == "time_budget" else ""
            say(f"{why} at step {step} of {cfg.steps} ({rate_s}); {best}; resume state in {paths.last}\n"
                f"resume with: {_resume_command(command, cfg, d)}{extra}")
    return summary


def _shape(model_config: dict) -> str:
    return (f"{model_config['n_layer']}x{model_config['n_head']}x{model_config['n_embd']} "
            f"(context {model_config['block_size']})")


def _resume_command(command: str, cfg: TrainConfig, d: Dist) -> str:
    if d.world_size > 1 and "torchrun" not in command:
        command = f"torchrun --nproc_per_node={d.world_size} train.py"
    out = "" if cfg.out == DEFAULT_PATH else f" --out {_quote(cfg.out)}"
    return f"{command} --resume{out}"


def _quote(s: str) -> str:
    return shlex.quote(s)


def _nonfinite_message(what: str, value, step: int, paths: RunPaths, metrics: dict, command: str,
                       cfg: TrainConfig, phrase: str = "is") -> str:
    kept = []
    if paths.last.exists():
        kept.append(f"the last good state is {paths.last}")
    if metrics.get("best_val_bpb") is not None:
        kept.append(f"the best model (val bpb {metrics['best_val_bpb']:.4f}, step {metrics['best_step']}) "
                    f"is {paths.best}")
    kept_s = "; ".join(kept) if kept else "nothing had been saved yet"
    return (f"training diverged: the {what} {phrase} {value} at step {step}; stopped without saving this model "
            f"({kept_s}). Try lower learning rates (--muon-lr {cfg.muon_lr / 2:g} --adam-lr {cfg.adam_lr / 2:g}), "
            f"a longer --warmup or --dtype fp32"
            + (f", then: {command} --resume{'' if cfg.out == DEFAULT_PATH else ' --out ' + _quote(cfg.out)} "
               "with those flags" if paths.last.exists() else ""))


# ---------------------------------------------------------------------------------------------------------
# Command line: one flag per TrainConfig field.

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    defaults = TrainConfig()
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
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        default, t, help_ = getattr(defaults, f.name), hints[f.name], f.metadata["help"]
        if t is bool and default:
            group.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                               default=argparse.SUPPRESS, help=f"do not {help_[0].lower()}{help_[1:]}")
        elif t is bool:
            group.add_argument(_flag(f.name), action="store_true", default=argparse.SUPPRESS, help=help_)
        else:
            kwargs = {}
            if f.name == "preset":
                kwargs["choices"] = list(TRAIN_PRESETS)
            elif f.name == "dtype":
                kwargs["choices"] = ["auto", "fp32", "bf16"]
            elif f.name == "compile":
                kwargs["choices"] = ["auto", "on", "off"]
            group.add_argument(_flag(f.name), type=t, default=argparse.SUPPRESS, metavar=f.name.upper(),
                               help=help_ if default == "" else f"{help_} (default: {default})", **kwargs)
    return parser


# What a run saved before these TrainConfig fields existed trained with (their default now is different).
SAVED_BEFORE_FIELD = {"momentum_warmup": 0, "normuon": False}


def config_from_args(explicit: dict) -> TrainConfig:
    """TrainConfig from the flags actually given: preset < flags; with --resume, saved run < flags."""
    if explicit.get("resume"):
        last = RunPaths.for_out(explicit.get("out", DEFAULT_PATH)).last
        if last.exists():
            saved = dict((read_checkpoint(last).get("train_state") or {}).get("config") or {})
            known = {f.name for f in fields(TrainConfig)}
            saved = {k: v for k, v in saved.items() if k in known}
            # A run saved before a setting existed goes on as it ran, not with the setting's new default.
            saved = {**SAVED_BEFORE_FIELD, **saved} if saved else saved
            if "preset" in explicit and explicit["preset"] != saved.get("preset", explicit["preset"]):
                raise BytelmError(f"--preset {explicit['preset']} differs from the resumed run's "
                                  f"({saved['preset']}); give the flags to change instead")
            # One-off settings of the earlier invocation do not carry over.
            for k in ("stop_at", "force"):
                saved.pop(k, None)
            return TrainConfig(**{**saved, **explicit})
    return TrainConfig.from_preset(explicit.pop("preset", "default"), **explicit)


def main(argv: Sequence[str] | None = None, prog: str = "train.py") -> int:
    args = build_parser(prog).parse_args(argv)
    cfg = config_from_args(vars(args))
    command = "bytelm train" if prog.startswith("bytelm") else f"python {prog}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        command = f"torchrun --nproc_per_node={os.environ['WORLD_SIZE']} {prog}"
    summary = train(cfg, command=command)
    return 130 if summary["stop_reason"] == "interrupted" else 0

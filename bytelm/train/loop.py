"""The training loop, read top to bottom: settings -> files -> data -> model -> steps, evaluations and saves.

    python train.py                               # default run: built-in corpus, <= ~12 min on 2 CPU cores
    python train.py --preset cpu10 --data t.txt   # the 10-minute CPU recipe on your own text
    python train.py --resume                      # continue the run behind byte_llm_model.pt
    torchrun --nproc_per_node=2 train.py ...      # DDP, one process per GPU (or CPU worker)

    from bytelm.train.loop import TrainConfig, train
    summary = train(TrainConfig.from_preset("tiny", data="notes.txt", out="tiny.pt"))

The parts live in their own modules: settings (config), schedule, run files and lock (run_files), the
resume state (resume), processes (distributed), evaluation (evaluate), what a run prints
(report); the command line is bytelm.cli.train. Files beside --out: see bytelm.train.run_files.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from bytelm.data.batches import BatchSampler, EvalBatches, eval_batches
from bytelm.checkpoint import load_model, remove_stale_temps, save_checkpoint
from bytelm.data.corpus import load_corpus
from bytelm.device import autocast, default_dtype, thread_choice
from bytelm.train.distributed import Dist, all_reduce_max, all_reduce_sum, setup_distributed, teardown_distributed
from bytelm.errors import BytelmError, DataError
from bytelm.train.evaluate import evaluate, sample_prompt, sample_text
from bytelm.files import cache_root, private_dir
from bytelm.train.metrics import bits_per_byte, plot_losses
from bytelm.model import ByteLM
from bytelm.train.optim import build_optimizers
from bytelm.train.resume import METRIC_NAMES, build_train_state, read_resume_state, restore, resume_warnings
from bytelm.train.run_files import RunLog, RunPaths, refuse_to_overwrite, remove_run_files, run_file_error, run_lock
from bytelm.train.report import closing_line, divergence_message, eval_line, opening_line, progress_postfix, sample_line
from bytelm.train.schedule import (PLAN_AT_STEP, in_short_phase, lr_scale, median_step_time, muon_momentum,
                                   plan_steps, replan_due, replan_steps)
from bytelm.train.config import COMPILE_MIN_STEPS, TRAIN_PRESETS, TrainConfig, check_step_memory

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train", "NonFiniteLoss"]


class NonFiniteLoss(BytelmError):
    """The loss or gradient became NaN/Inf; training stopped without saving the broken model."""


def train(cfg: TrainConfig, *, progress: bool = True, command: str = "python train.py") -> dict:
    """Run (or resume) training as `cfg` says. Returns a summary dict (Run.summary).

    Raises BytelmError for anything the user can fix, NonFiniteLoss if the loss diverges.
    `command` is how the user launched us, used in the resume hint.
    """
    cfg.validate()
    cfg = dataclasses.replace(cfg)  # our copy: a time budget may shorten cfg.steps
    d = setup_distributed(cfg.device)
    try:
        with run_lock(cfg.out, enabled=d.main):  # rank 0 writes every file, so it holds the lock
            return _train(cfg, d, progress, command)
    finally:
        teardown_distributed(d)


def _train(cfg: TrainConfig, d: Dist, progress: bool, command: str) -> dict:
    paths, device = RunPaths.for_out(cfg.out), d.device
    # Fine-tuning: the model's shape comes from --init-from (a resumed run restores its own weights instead).
    init_config = cfg.init_model_config() if cfg.init_from and not cfg.resume else None
    if init_config:
        cfg = cfg.with_model(init_config)
    dtype = default_dtype(device) if cfg.dtype == "auto" else cfg.dtype
    # The files: a resume state checked whole, or an earlier run's files kept unless --force.
    resume = read_resume_state(paths, cfg) if cfg.resume else None
    if not cfg.resume:
        refuse_to_overwrite(paths, cfg.force)
    if cfg.stop_at and resume and cfg.stop_at <= resume.step:
        raise BytelmError(f"--stop-at {cfg.stop_at} is not after the resumed step {resume.step}")
    if d.main:  # temp files of saves that a SIGKILL cut short; safe to delete while we hold the run lock
        for p in (paths.best, paths.last):
            remove_stale_temps(p)
    check_step_memory(cfg, device)  # before any allocation the settings decide
    threads = thread_choice(cfg.threads) if device.type == "cpu" else None  # (count, why) for the opening line
    if threads:
        torch.set_num_threads(threads[0])

    # The data: shuffled training batches, fixed validation batches.
    corpus = load_corpus(cfg.data, val_fraction=cfg.val_fraction, text_field=cfg.text_field,
                         cache_dir=cfg.cache_dir or None, max_bytes=cfg.max_bytes or None,
                         rank=d.rank, world_size=d.world_size)
    if len(corpus.val) == 0:
        raise DataError(f"{corpus.info['source']}: the validation split is empty; raise --val-fraction "
                        "or add documents")
    val_batches = eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches)
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, d.rank, d.world_size)

    # The model and its optimizers, fresh or as saved.
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if init_config:  # every check of load_model (shapes, dtypes, finiteness); the optimizers start fresh
        model = load_model(cfg.init_from)[0].to(device).train()
    else:
        model = ByteLM(cfg.model_config()).to(device)
    optimizers = build_optimizers(model, muon_lr=cfg.muon_lr, adam_lr=cfg.adam_lr,
                                  muon_weight_decay=cfg.muon_weight_decay, normuon=cfg.normuon)
    if resume:
        restore(resume, model, optimizers, sampler, device)
        for warning in resume_warnings(resume, corpus.info, d.world_size) if d.main else ():
            print(f"warning: {warning}", flush=True)
    ddp_model = model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    start_step = resume.step if resume else 0
    # Compiled blocks serve training steps only; evaluation and sampling run the same weights eagerly.
    if cfg.compile == "on" or (cfg.compile == "auto" and d.world_size == 1
                               and cfg.steps - start_step >= COMPILE_MIN_STEPS):
        use_private_compile_cache(cfg.cache_dir)
        model.compile_blocks(True)

    # The log: rewound to the resumed step, or an earlier run's files removed (only now that all loaded fine).
    log = RunLog(paths.metrics, enabled=d.main)
    if d.main and resume:
        log.truncate_after(start_step)  # steps after the saved state are about to be redone
    elif d.main:
        remove_run_files(paths)

    run = Run(cfg, d, paths, dtype, command, model, ddp_model, optimizers, sampler, val_batches, corpus.info,
              log, sample_prompt(corpus.val), step=start_step, start_step=start_step)
    if resume:
        run.elapsed_before, run.metrics = resume.elapsed, dict(resume.metrics)
    run.say(opening_line(cfg, corpus.info, model.num_params(), model.config.block_size, d.world_size, device,
                         dtype, threads, start_step))
    stop_reason = run.loop(progress)
    summary = run.summary(stop_reason)
    run.say(closing_line(summary, cfg, paths, command, d.world_size))
    return summary


def use_private_compile_cache(cache_dir: str) -> None:
    """Point torch.compile's cache at a folder of bytelm's cache that only this user can write, unless the user
    chose one: the default, /tmp/torchinductor_$USER, is a shared folder another local user could create
    first and fill with code that compiled training would then load."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and not current.startswith(("/tmp/torchinductor_", "/var/tmp/torchinductor_")):
        return  # the user's choice (torch itself sets the shared default on first use, so that is replaced)
    try:
        folder = private_dir(cache_root(cache_dir or None) / "torch-compile")
    except OSError as e:
        raise BytelmError(f"cannot use the torch.compile cache: {e}; set TORCHINDUCTOR_CACHE_DIR to a folder of "
                          "yours or use --compile off") from None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


class StopRequest:
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

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """A run in progress: what it trains, where it stands, and the steps, evaluations and saves it takes."""
    cfg: TrainConfig
    d: Dist
    paths: RunPaths
    dtype: str
    command: str
    model: ByteLM
    ddp_model: torch.nn.Module  # the model, or its DDP wrapper
    optimizers: list
    sampler: BatchSampler
    val_batches: EvalBatches
    data_info: dict
    log: RunLog
    prompt: bytes  # the sample text's prompt: the start of the first held-out document
    step: int = 0
    start_step: int = 0
    elapsed_before: float = 0.0  # seconds trained before a resume
    metrics: dict = field(default_factory=lambda: dict.fromkeys(METRIC_NAMES))
    recent_loss: float | None = None  # smoothed training loss, for the evaluation line
    t_start: float = 0.0
    bar: object = None  # tqdm progress bar while the loop runs
    step_times: list = field(default_factory=list)
    rate: float | None = None  # training bytes per second, smoothed
    plan_mark: tuple[int, float] | None = None  # (step, time) of the last plan by the time budget
    replan_now: bool = False  # the last step found the plan due for a refit (schedule.replan_due, every rank)
    asked_steps: int = 0  # --steps as given, before any plan

    @property
    def device(self) -> torch.device:
        return self.d.device

    @property
    def bytes_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len * self.d.world_size

    def say(self, msg: str) -> None:
        if self.d.main:
            (self.bar.write(msg) if self.bar is not None and not self.bar.disable else print(msg, flush=True))

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def loop(self, progress: bool) -> str:
        """Steps until cfg.steps, a stop request, --stop-at or the time budget. Returns why it stopped."""
        import tqdm

        cfg = self.cfg
        if self.step >= cfg.steps:
            self.say(f"the run is already at step {self.step} of {cfg.steps}: nothing to do (raise --steps to "
                     "train further)")
        self.bar = tqdm.tqdm(total=cfg.steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                             disable=not (progress and self.d.main and sys.stderr.isatty()))
        plan_at = PLAN_AT_STEP if cfg.time_budget > 0 and self.step == 0 and cfg.steps > 2 * PLAN_AT_STEP else 0
        self.asked_steps, self.t_start = cfg.steps, time.perf_counter()
        try:
            with StopRequest(self.say) as stop:
                while self.step < cfg.steps:
                    interrupted, time_up = self.train_step(stop)
                    if self.step == plan_at:
                        self.plan()
                    paused = interrupted or time_up or bool(cfg.stop_at and self.step >= cfg.stop_at)
                    if self.step % cfg.eval_every == 0 or self.step == cfg.steps or time_up:
                        self.evaluate()
                    if self.step % cfg.save_every == 0 or self.step == cfg.steps or paused:
                        self.save_last()
                    if self.plan_mark and self.step < cfg.steps and (self.step % cfg.eval_every == 0
                                                                      or self.replan_now):
                        self.replan()
                    if paused:
                        return "time_budget" if time_up else "interrupted" if interrupted else "paused"
        finally:
            self.bar.close()
            self.log.close()
        return "done"

    def train_step(self, stop: StopRequest) -> tuple[bool, bool]:
        """One optimizer step on the next batch. Returns (a stop was requested, the time budget ran out), as
        agreed by every rank."""
        cfg, device, t_step = self.cfg, self.device, time.perf_counter()
        scale = lr_scale(self.step, cfg.steps, cfg.warmup, cfg.cooldown)
        for opt, base in zip(self.optimizers, (cfg.muon_lr, cfg.adam_lr)):
            for group in opt.param_groups:
                group["lr"] = base * scale
        for group in self.optimizers[0].param_groups:  # Muon
            group["momentum"] = muon_momentum(self.step, cfg.momentum_warmup)
        x, y = self.sampler.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if in_short_phase(self.step, cfg.steps, cfg):
            # The same bytes as more, shorter windows: (B, T) -> (B * T / t, t). Context is what the model
            # learns to use last; positions t..T-1 are trained in the rest of the run.
            x, y = x.view(-1, cfg.short_seq_len), y.view(-1, cfg.short_seq_len)
        loss = self.forward(x, y)
        loss.backward()
        params = list(self.model.parameters())
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # One collective per step carries everything the ranks must agree on.
        now = time.perf_counter()
        time_up = cfg.time_budget > 0 and now - self.t_start >= cfg.time_budget
        due = self.plan_mark is not None and replan_due(self.step + 1, now, self.plan_mark, cfg)
        flags = torch.tensor([float(stop.requested or time_up), float(time_up), float(due)], dtype=torch.float64,
                             device=device)
        flags = all_reduce_sum(torch.cat([loss.detach().double().view(1),
                                          grad_norm.detach().double().to(device).view(1), flags]), self.d).tolist()
        loss_value = flags[0] / self.d.world_size
        for what, value in (("loss", loss_value), ("gradient norm", flags[1])):
            if not math.isfinite(value):
                raise NonFiniteLoss(divergence_message(what, value, self.step + 1, self.paths, self.metrics,
                                                       self.command, cfg))
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self.after_step(loss_value, scale, time.perf_counter() - t_step)
        self.replan_now = flags[4] > 0  # any rank's clock: the ranks re-plan together
        return flags[2] > 0, flags[3] > 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of (x, y): (B, T) each. A torch.compile that fails at its first call falls back to
        eager mode with a warning (not with --compile on)."""
        try:
            with autocast(self.device, self.dtype):
                return self.ddp_model(x, y)[1]
        except Exception as e:  # compilation happens at the first call; fall back rather than fail
            if not self.model.blocks_compiled or self.cfg.compile == "on":
                raise
            self.say(f"warning: torch.compile failed here ({type(e).__name__}); training without it "
                     "(--compile off skips the attempt)")
            self.model.compile_blocks(False)
            with autocast(self.device, self.dtype):
                return self.ddp_model(x, y)[1]

    def after_step(self, loss: float, scale: float, seconds: float) -> None:
        self.recent_loss = loss if self.recent_loss is None else 0.9 * self.recent_loss + 0.1 * loss
        self.log.write({"step": self.step, "loss": loss, "lr_scale": scale,
                        "bytes": self.step * self.bytes_per_step, "time": round(self.elapsed(), 3)})
        self.step_times.append(seconds)
        speed = self.bytes_per_step / seconds
        self.rate = speed if self.rate is None else 0.9 * self.rate + 0.1 * speed
        self.bar.set_postfix_str(progress_postfix(loss, self.rate), refresh=False)
        self.bar.update(1)

    def plan(self) -> None:
        """Fit the run's length to the time budget from the steps timed so far (the slowest rank's pace)."""
        cfg = self.cfg
        per_step = median_step_time(self.step_times)
        if self.d.world_size > 1:
            per_step = all_reduce_max(torch.tensor(per_step, device=self.device), self.d).item()
        planned = plan_steps(cfg, self.step, time.perf_counter() - self.t_start, per_step)
        self.plan_mark = (self.step, time.perf_counter())
        if planned < cfg.steps:
            self.say(f"time budget {cfg.time_budget:.0f} s: at {per_step:.2f} s per step here, the run is planned "
                     f"as {planned} steps instead of {cfg.steps}, so its learning-rate decay finishes in time "
                     "(--time-budget 0 runs all --steps)")
            self.set_total_steps(planned, cfg.cooldown)

    def replan(self) -> None:
        """Refit the plan to the pace since the last plan, evaluations and saves included: at each evaluation
        and every few percent of the budget (schedule.replan_due), in both directions."""
        cfg, now = self.cfg, time.perf_counter()
        pace = (now - self.plan_mark[1]) / (self.step - self.plan_mark[0])
        if self.d.world_size > 1:
            pace = all_reduce_max(torch.tensor(pace, device=self.device), self.d).item()
        replanned, cooldown = replan_steps(cfg, self.step, now - self.t_start, pace, self.asked_steps)
        self.plan_mark = (self.step, now)
        # Any shortening is taken (running over the budget cuts the decay short); a longer plan only when it
        # gains over 1%, so a steady pace does not re-plan every time. Said when it moves the end by over 5%.
        if replanned < cfg.steps or replanned > 1.01 * cfg.steps:
            if abs(replanned - cfg.steps) > 0.05 * cfg.steps:
                self.say(f"time budget: {pace:.2f} s per step since the last plan, evaluations included; "
                         f"re-planned as {replanned} steps instead of {cfg.steps}")
            self.set_total_steps(replanned, cooldown)

    def set_total_steps(self, steps: int, cooldown: float) -> None:
        self.cfg.steps, self.cfg.cooldown = steps, cooldown
        self.bar.total = steps
        self.bar.refresh()

    def train_state(self, full: bool) -> dict:
        return build_train_state(self.step, self.cfg, self.metrics, self.data_info, self.d.world_size,
                                 self.elapsed(), *((self.optimizers, self.sampler, self.device) if full else ()))

    def check_weights_finite(self) -> None:
        # The loss check sees a non-finite update only one step later; an optimizer step can turn finite
        # gradients into inf/NaN weights (a huge learning rate), and the save right after it would then
        # replace the last good state with a broken model. Identical on every rank (DDP weights agree).
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            raise NonFiniteLoss(divergence_message("model weights", "not finite (inf or nan)", self.step, self.paths,
                                                   self.metrics, self.command, self.cfg, phrase="are"))

    def save_last(self) -> None:
        self.check_weights_finite()
        if self.d.main:
            save_checkpoint(self.paths.last, self.model, self.model.config, self.train_state(full=True))

    def evaluate(self) -> None:
        """Validation bits per byte; the best model so far saved; a line, a sample and the plot."""
        self.check_weights_finite()
        val_loss = evaluate(self.model, self.val_batches, self.device, self.dtype, self.d)
        if not math.isfinite(val_loss):  # never "best, saved" for a broken model
            raise NonFiniteLoss(divergence_message("validation loss", val_loss, self.step, self.paths, self.metrics,
                                                   self.command, self.cfg))
        bpb = bits_per_byte(val_loss)
        improved = self.metrics["best_val_bpb"] is None or bpb < self.metrics["best_val_bpb"]
        self.metrics["last_val_bpb"] = bpb
        if improved:
            self.metrics["best_val_bpb"], self.metrics["best_step"] = bpb, self.step
        if not self.d.main:
            return
        self.log.write({"step": self.step, "val_loss": val_loss, "val_bpb": bpb, "time": round(self.elapsed(), 3)})
        if improved:
            save_checkpoint(self.paths.best, self.model, self.model.config, self.train_state(full=False))
        self.say(eval_line(self.step, self.cfg.steps, self.recent_loss, bpb, improved, self.metrics, self.elapsed()))
        if self.cfg.sample_bytes:
            self.say(sample_line(self.prompt, sample_text(self.model, self.prompt, self.cfg.sample_bytes,
                                                          self.cfg.seed)))
        if self.cfg.plot:
            try:
                plot_losses(self.paths.metrics, self.paths.plot)
            except OSError as e:  # a full disk: one clear line, not a matplotlib traceback
                raise run_file_error(self.paths.plot, e) from None

    def summary(self, stop_reason: str) -> dict:
        seconds = time.perf_counter() - self.t_start
        trained_bytes = (self.step - self.start_step) * self.bytes_per_step
        return {"stop_reason": stop_reason, "steps": self.step, "start_step": self.start_step,
                "total_steps": self.cfg.steps, "best_val_bpb": self.metrics["best_val_bpb"],
                "best_step": self.metrics["best_step"], "last_val_bpb": self.metrics["last_val_bpb"],
                "seconds": seconds, "bytes_per_s": trained_bytes / seconds if seconds > 0 else 0.0,
                "paths": self.paths.as_dict()}

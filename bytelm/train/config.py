"""Training settings: TrainConfig (every field a `train.py` flag), the named presets, and their checks.

    from bytelm.train.config import TrainConfig
    cfg = TrainConfig.from_preset("cpu10", data="tinyshakespeare.txt")   # the preset, then overrides
    cfg.model_config()                                                   # the ModelConfig it trains

Each field's comment says why its default is what it is; `bytelm.cli.args` turns the fields into flags
(`--batch-size` <- batch_size), so the defaults are written only here. `step_memory` estimates what one
training step of a config allocates, so a flag such as `--batch-size 1000000000` is refused before anything
is allocated (bytelm.train.loop checks it against the device's memory).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace

from bytelm.checkpoint import DEFAULT_PATH, read_model_config
from bytelm.settings import option
from bytelm.config import MODEL_PRESETS, ModelConfig
from bytelm.device import require_memory
from bytelm.errors import BytelmError, check_field_types, invalid
from bytelm.train.optim import MOMENTUM, MOMENTUM_START
from bytelm.train.schedule import PLAN_AT_STEP

# torch.compile (block by block) takes ~20 s for the default model on 2 CPU cores; below this many steps it does
# not pay back (0.458 against 0.578 s per step at batch 16 x 128: bench/bench_train.py).
COMPILE_MIN_STEPS = 300

MAX_SEED = 2**64 - 1  # torch.manual_seed takes 64-bit seeds; generation's seeds have the same range
MAX_THREADS = 1024  # more OpenMP threads than any one machine has cores only slows a run down
MAX_STEPS = 10**12  # far past any run; keeps the data position within int64 arithmetic
MAX_SAMPLE_BYTES = 1 << 20  # the sample is a glance at each evaluation, not a generation run
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,4})?")

# Named starting points; flags override them. "default" is TrainConfig's own defaults.
TRAIN_PRESETS: dict[str, dict] = {
    "default": {},
    # The seed recipe: upstream's exactly (the project bytelm grew from), default 6x8x192 model, context 512.
    # Hours on a CPU; minutes on a GPU.
    "seed": dict(batch_size=24, seq_len=512, block_size=512, steps=5000, muon_lr=0.01, adam_lr=0.001,
                 warmup=100, eval_every=250, eval_batches=20, save_every=250, time_budget=0.0),
    # Tests and smoke runs: trains in seconds, so compiling (tens of seconds) never pays, even for --steps 100000
    # runs that are stopped early.
    "tiny": dict(**{k: v for k, v in MODEL_PRESETS["tiny"].items() if k != "block_size"}, seq_len=64,
                 batch_size=8, steps=60, warmup=5, eval_every=20, eval_batches=4, save_every=20,
                 sample_bytes=32, time_budget=0.0, compile="off"),
    # The best 10-minute recipe found for 2 CPU cores (docs/training.md; bench/bench_time_to_quality.py runs it
    # on tinyshakespeare): a wider, shallower model and a longer decay; the budget fits the run's length, so
    # `steps` only caps it. val_fraction 0.1 is nanoGPT's split of tinyshakespeare.
    "cpu10": dict(n_layer=4, n_head=4, n_embd=160, value_embeds=True, seq_len=128, batch_size=16, threads=2,
                  cooldown=0.6, time_budget=600.0, steps=100_000, eval_every=200, save_every=200, val_fraction=0.1),
    # Fine-tuning a trained model (--init-from, whose shape it takes): a 10-step warmup and the base run's learning
    # rates, the best of a screen of 0.25x-1.5x the rates and warmups of 10 and 50 (docs/training.md,
    # "Fine-tuning"); cpu10's decay; a 5-minute budget; the result beside the base model, never over it.
    # val_fraction 0.1 as cpu10, for a small text of one's own.
    "finetune": dict(warmup=10, cooldown=0.6, time_budget=300.0, steps=100_000, eval_every=200, save_every=200,
                     val_fraction=0.1, out="byte_llm_finetuned.pt"),
}

# The fields that make up the model's shape: --init-from takes them from the model, and refuses flags that differ.
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "value_embeds")


@dataclass
class TrainConfig:
    """Everything a training run needs. Flags are derived from these fields (`--batch-size` <- batch_size)."""
    # data
    data: str = option("builtin", "training data: builtin, cosmopedia, a file, a folder or a glob",
                       group="data")  # Python's own docs: works offline, 1.9 MB
    text_field: str = option("text", "field holding the text in .jsonl/.parquet/streamed records",
                             group="data")  # the HuggingFace convention
    val_fraction: float = option(0.05, "share of the bytes held out for validation",
                                 group="data")  # 1 in 20: ~90 KB of the built-in corpus
    max_bytes: int = option(0, "use at most this many bytes of documents (0: all)", group="data")  # all of it
    cache_dir: str = option("", "cache folder for data and compiled code (default: $BYTELM_CACHE, else "
                            "~/.cache/bytelm)", group="data")  # empty: bytelm.files.cache_root picks
    # model
    preset: str = option("default", "named settings to start from (flags given override them)", group="model",
                         choices=TRAIN_PRESETS)  # the CPU run described below
    n_layer: int = option(ModelConfig.n_layer, "transformer blocks", group="model")  # upstream shape, 6
    n_head: int = option(ModelConfig.n_head, "attention heads", group="model")  # upstream shape, 8
    n_embd: int = option(ModelConfig.n_embd, "model width", group="model")  # upstream shape, 192
    block_size: int = option(0, "context window the model is built for (0: seq_len)",
                             group="model")  # RoPE only learns the positions it is trained on
    value_embeds: bool = option(False, "give every layer a byte table added to its attention values (value "
                                "embeddings)", group="model")  # docs/training.md, "Value embeddings"
    init_from: str = option("", "start from this trained model's weights and shape (a bytelm .pt or .safetensors), "
                            "with a fresh optimizer and schedule: fine-tuning", group="model",
                            metavar="MODEL")  # empty: random weights
    # length and batch
    steps: int = option(1000, "total optimizer steps of the run; a resumed run continues toward it",
                        group="run")  # ~0.6 s each on 2 idle CPU cores: ~10 min; --time-budget trims it when slower
    batch_size: int = option(16, "sequences per step on EACH process (global batch = this x processes)",
                             group="run")  # 2 KiB per step: many cheap steps beat few big ones in 15 CPU minutes
    seq_len: int = option(128, "bytes per training sequence", group="run")  # 4x cheaper than 512; still ~20 words
    short_seq_len: int = option(0, "train the first --short-seq-share of the steps on shorter windows, this long "
                                "(a divisor of --seq-len), cutting each sequence into pieces (0: off)",
                                group="run")  # early on the model uses little context; short windows are cheaper
    short_seq_share: float = option(0.5, "share of the steps trained on --short-seq-len windows",
                                    group="run")  # see above
    time_budget: float = option(720.0, "seconds this process may train: the run's length is fitted to it after "
                                f"{PLAN_AT_STEP} timed steps, and it stops (evaluating, saving) when it runs out "
                                "(0: no limit)", group="run")  # the default run ends in ~12 min on a busy machine
    stop_at: int = option(0, "pause after this step as Ctrl-C would (resume later with --resume; 0: never)",
                          group="run")  # train a long schedule in chunks
    # optimizer
    muon_lr: float = option(0.01, "Muon learning rate (attention and MLP matrices)", group="optimizer")  # upstream
    adam_lr: float = option(0.001, "AdamW learning rate (embedding, head, norms)", group="optimizer")  # upstream
    muon_weight_decay: float = option(0.1, "Muon decoupled weight decay (AdamW parameters get none)",
                                      group="optimizer")  # torch.optim.Muon's default, as upstream
    warmup: int = option(50, "steps of linear learning-rate warmup", group="optimizer")  # ~4% of the default run
    cooldown: float = option(0.4, "final share of steps over which the learning rate decays linearly to 0",
                             group="optimizer")  # warmup-stable-decay, as modded-nanogpt's Muon runs
    momentum_warmup: int = option(300, f"steps over which Muon's momentum rises linearly from {MOMENTUM_START} to "
                                  f"{MOMENTUM} (0: {MOMENTUM} throughout)",
                                  group="optimizer")  # modded-nanogpt's; docs/training.md, "Optimizer"
    normuon: bool = option(True, "even out the neurons' Muon step sizes by a running second moment (NorMuon)",
                           group="optimizer")  # lower val bpb in fixed-step screens; docs/training.md, "Optimizer"
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)", group="optimizer")  # GPT-2
    # precision and device
    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA if present)", group="device")  # fastest present
    dtype: str = option("auto", "autocast precision: fp32, bf16 or auto (the faster on this device)",
                        group="device", choices=("auto", "fp32", "bf16"))  # bf16 only where fast: bytelm.device
    threads: int = option(0, "CPU threads for torch (0: every core this process may run on, less those other "
                          "processes keep busy now)", group="device")  # bytelm.device.thread_choice
    compile: str = option("auto", "torch.compile the training forward/backward: on, off, or auto (on for runs "
                          f"of at least {COMPILE_MIN_STEPS} steps in one process)", group="device",
                          choices=("auto", "on", "off"))  # faster per step after a ~20 s compile: docs/training.md
    seed: int = option(1337, "seed for initialisation, batches and the sample text", group="device")  # nanoGPT's
    # evaluation, logging, checkpoints
    eval_every: int = option(100, "evaluate validation bits per byte every this many steps",
                             group="eval")  # 10 evals of ~2 s in the default run
    eval_batches: int = option(8, "held-out batches per evaluation (fixed, the same every time)",
                               group="eval")  # 8 x 16 x 128 = 16 KiB, spread over the 88 KB built-in val split
    sample_bytes: int = option(100, "bytes of sample text printed at each evaluation (0: none)",
                               group="eval")  # a glance
    save_every: int = option(100, "write the resume state (<out>.last.pt) every this many steps",
                             group="eval")  # each save costs ~0.1 s; lose at most 100 steps to a crash
    out: str = option(DEFAULT_PATH, "checkpoint path; holds the best-validation model", group="eval")  # upstream
    plot: bool = option(True, "write <out stem>.loss.png at each evaluation", group="eval")  # matplotlib, Agg
    resume: bool = option(False, "continue the run saved in <out stem>.last.pt", group="eval")  # never guessed
    force: bool = option(False, "start over at an existing --out, removing its earlier run's files",
                         group="eval")  # never by accident

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_preset(cls, name: str = "default", **overrides) -> "TrainConfig":
        """The preset's settings with `overrides` on top."""
        if name not in TRAIN_PRESETS:
            raise BytelmError(f"unknown preset {name!r}: choose from {', '.join(TRAIN_PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise BytelmError(f"unknown training settings {unknown}")
        return cls(**{**TRAIN_PRESETS[name], **overrides, "preset": name})

    def validate(self) -> None:
        """Raise BytelmError naming the first field out of range (with its flag's spelling)."""
        bad = invalid("training setting")
        check_field_types(self, bad)

        def flag(name: str) -> str:
            return name.replace("_", "-")

        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) < 1:
                bad(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_bytes", "block_size", "warmup", "momentum_warmup", "sample_bytes", "threads", "stop_at",
                     "time_budget", "grad_clip", "muon_weight_decay"):
            if getattr(self, name) < 0:
                bad(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        for name, top in (("steps", MAX_STEPS), ("threads", MAX_THREADS), ("sample_bytes", MAX_SAMPLE_BYTES)):
            if getattr(self, name) > top:
                bad(f"{flag(name)} must be at most {top:,}, got {getattr(self, name):,}")
        for name in ("muon_lr", "adam_lr"):
            if getattr(self, name) <= 0:
                bad(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            bad(f"seed must be a whole number from 0 to 2**64-1, got {self.seed}")
        for name in ("cooldown", "short_seq_share"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{flag(name)} must be a fraction in [0, 1], got {getattr(self, name)}")
        if self.short_seq_len and (self.short_seq_len >= self.seq_len or self.seq_len % self.short_seq_len):
            bad(f"short-seq-len ({self.short_seq_len}) must be a divisor of seq-len ({self.seq_len}) smaller than it")
        if not 0 <= self.val_fraction < 1:
            bad(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        for name, allowed in (("dtype", ("auto", "fp32", "bf16")), ("compile", ("auto", "on", "off")),
                              ("preset", tuple(TRAIN_PRESETS))):
            if getattr(self, name) not in allowed:
                bad(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not _DEVICE.fullmatch(self.device):
            bad(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.block_size and self.seq_len > self.block_size:
            bad(f"seq-len ({self.seq_len}) is longer than the model's block-size ({self.block_size})")
        if not self.out:
            bad("out must be a file path")
        if self.init_from and not self.resume and _same_file(self.init_from, self.out):
            bad(f"init-from and out are the same file ({self.out}); write the new model elsewhere with --out")
        self.model_config()  # raises on an impossible shape

    def with_model(self, mc: ModelConfig) -> "TrainConfig":
        """These settings with the model shape of `mc` (what --init-from trains)."""
        shape = {name: getattr(mc, name) for name in ARCHITECTURE_FIELDS}
        return replace(self, **shape)

    def init_model_config(self, given: dict | None = None) -> ModelConfig:
        """The config of the --init-from model; raises BytelmError if `given` (the flags set by hand) asks
        for another shape."""
        mc = read_model_config(self.init_from)
        if mc.mlp_ratio != ModelConfig.mlp_ratio or not mc.tie_embeddings:
            raise BytelmError(f"--init-from {self.init_from}: its MLP ratio or untied head are not a shape train.py "
                              "trains")
        differ = [name for name in ARCHITECTURE_FIELDS if name in (given or {}) and given[name] != getattr(mc, name)]
        if differ:
            theirs = ", ".join(f"--{n.replace('_', '-')} {getattr(mc, n)}" for n in differ)
            raise BytelmError(f"--init-from {self.init_from} fixes the model's shape ({theirs}); drop "
                              + " ".join(f"--{n.replace('_', '-')}" for n in differ))
        return mc

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                           block_size=self.block_size or self.seq_len, value_embeds=self.value_embeds)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def step_memory(cfg: TrainConfig) -> tuple[int, int]:
    """(bytes for the weights, gradients and optimizer state, bytes for one step's batch and activations): an
    estimate, within a small factor, of what one training step of `cfg` allocates on each process."""
    mc = cfg.model_config()
    c, layers = mc.n_embd, mc.n_layer
    params = layers * (4 + 2 * mc.mlp_ratio) * c * c + 256 * c * (2 + layers * mc.value_embeds)  # (+ an untied head)
    # fp32 weights and gradients, and at most two optimizer tensors per weight (AdamW's moments)
    model_bytes = 16 * params
    # per byte of the batch: what autograd keeps per layer (inputs of the norms, q/k/v, the attention output,
    # the MLP's hidden layer), the logits with their softmax and gradient, and the int64 inputs and targets
    per_token = 4 * layers * (8 + 2 * mc.mlp_ratio) * c + 3 * 4 * 256 + 3 * 2 * 8
    return model_bytes, cfg.batch_size * cfg.seq_len * per_token


def check_step_memory(cfg: TrainConfig, device) -> None:
    """Refuse, in one line naming the settings and the memory they need, a run whose step cannot fit in the
    memory `device` allows (bytelm.device.require_memory: BYTELM_MAX_MEMORY, cgroup and rlimits included)."""
    model_bytes, batch_bytes = step_memory(cfg)
    require_memory([(f"batch-size {cfg.batch_size} x seq-len {cfg.seq_len}, the batch and its activations",
                     batch_bytes),
                    (f"the model's shape (n-layer {cfg.n_layer}, n-embd {cfg.n_embd}), weights, gradients and "
                     "optimizer state", model_bytes)],
                   device, what="one training step", fix="choose smaller settings")

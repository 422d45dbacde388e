"""The resume state (`<out stem>.last.pt`): what a run saves to go on exactly where it stopped, and the checks
that turn a damaged or hand-edited one into one clear line before anything of it is used.

    state = build_train_state(step, cfg, metrics, ...)        # what save_checkpoint stores as train_state
    resume = read_resume_state(paths, cfg)                    # checked: types, ranges, the weights' shapes
    restore(resume, model, optimizers, sampler, device)       # optimizer states checked against the parameters
    resume_warnings(resume, corpus.info, world_size)          # what differs from the saved run (it still resumes)

train_state holds: step, config (TrainConfig as a dict), metrics, data_info, world_size, elapsed, and in the
resume file also optimizers (state_dicts), sampler (BatchSampler.state_dict) and rng (torch's, CUDA's).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from bytelm.checkpoint import check_weights, read_checkpoint
from bytelm.config import ModelConfig
from bytelm.errors import BytelmError, CheckpointError
from bytelm.train.run_files import RunPaths
from bytelm.train.config import MAX_STEPS, TrainConfig

# Settings of one invocation that a resumed run does not inherit.
ONE_OFF_SETTINGS = ("stop_at", "force", "resume")
METRIC_NAMES = ("best_val_bpb", "best_step", "last_val_bpb")
# Per-parameter optimizer tensors, (required, optional): AdamW's; torch Muon's and NorMuon's (bytelm.train.optim).
_ADAMW_ENTRIES = ({"step", "exp_avg", "exp_avg_sq"}, {"max_exp_avg_sq"})
_MUON_ENTRIES = ({"momentum_buffer"}, {"second_moment"})


def build_train_state(step: int, cfg: TrainConfig, metrics: dict, data_info: dict, world_size: int,
                      elapsed: float, optimizers=None, sampler=None, device: torch.device | None = None) -> dict:
    """The train_state of a checkpoint; with optimizers (and sampler, device), the full state --resume needs."""
    state = {"step": step, "config": asdict(cfg), "metrics": dict(metrics), "data_info": data_info,
             "world_size": world_size, "elapsed": elapsed}
    if optimizers is not None:
        state["optimizers"] = [opt.state_dict() for opt in optimizers]
        state["sampler"] = sampler.state_dict()  # identical on every rank (bytelm.data.batches.BatchSampler)
        state["rng"] = {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device is not None and device.type == "cuda" else []}
    return state


def _show(value) -> str:
    """A value from the file on one short line (a tensor's repr spans lines)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _not(value, expected: str) -> str:
    """How a field that should be `expected` is described in an error: "missing", or what it is instead."""
    return "missing" if value is None else f"a {type(value).__name__}, not {expected}"


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value, low: float = 0.0) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= low)


def _train_state(ckpt: dict, path: Path) -> dict:
    state = ckpt.get("train_state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its training state is {_not(state, 'a mapping')}; it cannot be resumed "
                              "(start a new run with --force)")
    return state


def saved_settings(path: Path) -> dict:
    """The training settings a resume file was saved with, less the one-off ones (for the command line)."""
    state = _train_state(read_checkpoint(path), path)
    saved = state.get("config")
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise CheckpointError(f"{path}: its training settings are {_not(saved, 'a mapping of names')}")
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise CheckpointError(f"{path}: unknown training settings {unknown[:3]}")
    saved = {k: v for k, v in saved.items() if k not in ONE_OFF_SETTINGS}
    try:
        TrainConfig(**saved)
    except BytelmError as e:
        raise CheckpointError(f"{path}: {e} (as saved there)") from None
    return saved


@dataclass
class ResumeState:
    """A checked resume file: every field has its type and range; the weights fit the model config."""
    path: Path
    weights: dict
    step: int
    elapsed: float
    world_size: int
    metrics: dict
    data_info: dict
    optimizers: list
    sampler: dict
    rng: dict


def _shape(mc: ModelConfig) -> str:
    return f"{mc.n_layer}x{mc.n_head}x{mc.n_embd} (context {mc.block_size})"


def read_resume_state(paths: RunPaths, cfg: TrainConfig) -> ResumeState:
    """Read and check `paths.last` for resuming `cfg`'s run, before anything is allocated for it. Raises
    BytelmError (CheckpointError for a damaged file) with one line naming the file and the field."""
    path = paths.last
    if not path.exists():
        only_best = f" ({paths.best} exists but holds only the best weights)" if paths.best.exists() else ""
        raise BytelmError(f"--resume: no resume state at {path}{only_best}; start a new run without --resume")
    ckpt = read_checkpoint(path)
    state = _train_state(ckpt, path)
    missing = [k for k in ("step", "optimizers", "sampler") if k not in state]
    if missing:
        raise CheckpointError(f"{path} has no {missing[0]} in its training state to resume from")
    try:
        saved_model = ModelConfig.from_dict(ckpt["model_config"])
    except (BytelmError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if saved_model != cfg.model_config():
        raise BytelmError(f"--resume: {path} holds a {_shape(saved_model)} model but the settings ask for "
                          f"{_shape(cfg.model_config())}; drop the model flags")
    check_weights(path, saved_model, ckpt["model"])
    return ResumeState(path, ckpt["model"], _check_step(path, state), *_check_run_fields(path, state),
                       optimizers=_check_optimizer_list(path, state["optimizers"]),
                       sampler=_check_sampler(path, state["sampler"], state["step"]),
                       rng=_check_rng(path, state.get("rng")))


def _check_step(path: Path, state: dict) -> int:
    step, saved = state["step"], state.get("config")
    top = saved["steps"] if isinstance(saved, dict) and _whole(saved.get("steps"), 1, MAX_STEPS) else MAX_STEPS
    if not _whole(step, 0, top):
        raise CheckpointError(f"{path}: its step is {_show(step)}, not a whole number from 0 to the run's {top:,} "
                              "steps (damaged or edited)")
    return step


def _check_run_fields(path: Path, state: dict) -> tuple[float, int, dict, dict]:
    """(elapsed, world_size, metrics, data_info), each checked."""
    elapsed, world_size = state.get("elapsed", 0.0), state.get("world_size", 1)
    if not _number(elapsed):
        raise CheckpointError(f"{path}: its elapsed time is {_show(elapsed)}, not a number of seconds")
    if not _whole(world_size, 1, 1 << 20):
        raise CheckpointError(f"{path}: its world_size is {_show(world_size)}, not a number of processes")
    metrics = {} if state.get("metrics") is None else state["metrics"]
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{path}: its metrics are {_not(metrics, 'a mapping')}")
    if not set(metrics) <= set(METRIC_NAMES):
        raise CheckpointError(f"{path}: its metrics hold unexpected fields {sorted(map(str, metrics))[:4]}; "
                              f"expected {', '.join(METRIC_NAMES)}")
    for name in ("best_val_bpb", "last_val_bpb"):
        if metrics.get(name) is not None and not _number(metrics[name]):
            raise CheckpointError(f"{path}: metric {name} is {_show(metrics[name])}, not bits per byte")
    if metrics.get("best_step") is not None and not _whole(metrics["best_step"], 0, state["step"]):
        raise CheckpointError(f"{path}: metric best_step is {_show(metrics['best_step'])}, not a step of this run")
    data_info = {} if state.get("data_info") is None else state["data_info"]
    if not isinstance(data_info, dict):
        raise CheckpointError(f"{path}: its data description is {_not(data_info, 'a mapping')}")
    for name in ("sha256", "source"):
        if not isinstance(data_info.get(name, ""), str):
            raise CheckpointError(f"{path}: its data {name} is {_not(data_info[name], 'a string')}")
    return float(elapsed), world_size, {**dict.fromkeys(METRIC_NAMES), **metrics}, data_info


def _check_optimizer_list(path: Path, saved) -> list:
    if not (isinstance(saved, list) and len(saved) == 2 and all(isinstance(s, dict) for s in saved)):
        raise CheckpointError(f"{path}: its optimizer state is {_not(saved, 'the two optimizers (Muon, AdamW)')}")
    return saved


def _check_sampler(path: Path, saved, step) -> dict:
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its data position is {_not(saved, 'a batch sampler state')}")
    if not _whole(saved.get("batches"), step, step):
        raise CheckpointError(f"{path}: its data position ({_show(saved.get('batches'))} batches drawn) does not match "
                              f"its step ({step})")
    if not _whole(saved.get("seed"), 0, 2**64 - 1):
        raise CheckpointError(f"{path}: its data seed is {_show(saved.get('seed'))}, not a whole number from 0 to 2**64-1")
    return saved


def _check_rng(path: Path, rng) -> dict:
    rng = {} if rng is None else rng
    if not isinstance(rng, dict):
        raise CheckpointError(f"{path}: its random state is {_not(rng, 'a mapping')}")
    expected = torch.get_rng_state()
    t = rng.get("torch")
    if t is not None and not (isinstance(t, torch.Tensor) and t.dtype == expected.dtype and t.shape == expected.shape
                              and t.layout == torch.strided):
        what = (f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}")
        raise CheckpointError(f"{path}: its random state is {what}, not torch's ({expected.numel()} bytes)")
    cuda = [] if rng.get("cuda") is None else rng["cuda"]
    if not (isinstance(cuda, list) and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda)):
        raise CheckpointError(f"{path}: its CUDA random state is {_not(cuda, 'a list of byte tensors')}")
    return {"torch": t, "cuda": cuda}


def resume_warnings(resume: ResumeState, data_info: dict, world_size: int) -> list[str]:
    """What differs from the run being resumed, though it can go on."""
    warnings = []
    saved_sha = resume.data_info.get("sha256")
    if saved_sha and saved_sha != data_info.get("sha256"):
        warnings.append(f"the data differ from the run being resumed ({resume.data_info.get('source')!r}); "
                        "continuing on the new data")
    if resume.world_size != world_size:
        warnings.append(f"resuming a {resume.world_size}-process run on {world_size}; the data order will differ "
                        "from an uninterrupted run")
    return warnings


def restore(resume: ResumeState, model: torch.nn.Module, optimizers: list, sampler, device: torch.device) -> None:
    """Load the checked state into a freshly built model, its optimizers and the batch sampler, and set the
    random generators. The optimizers keep their own hyperparameters (from the settings): only their
    per-parameter state comes from the file, after checking it fits the parameters."""
    path = resume.path
    try:
        model.load_state_dict(resume.weights)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its weights do not load: {str(e).splitlines()[0][:160]}") from None
    for opt, saved in zip(optimizers, resume.optimizers, strict=True):
        _load_optimizer(path, opt, saved)
    try:
        sampler.load_state_dict(resume.sampler)
    except BytelmError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        if resume.rng["torch"] is not None:
            torch.set_rng_state(resume.rng["torch"])
        if device.type == "cuda" and resume.rng["cuda"]:
            torch.cuda.set_rng_state_all(resume.rng["cuda"])
    except (RuntimeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: its random state is damaged ({str(e).splitlines()[0][:80]})") from None


def _load_optimizer(path: Path, opt: torch.optim.Optimizer, saved: dict) -> None:
    name = type(opt).__name__
    params = [p for group in opt.param_groups for p in group["params"]]
    by_index = _check_optimizer_groups(path, name, opt, saved, len(params))
    state = saved.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the {name} state is {_not(state, 'a mapping')}")
    required, optional = _ADAMW_ENTRIES if isinstance(opt, torch.optim.AdamW) else _MUON_ENTRIES
    for index, entries in state.items():
        if index not in by_index or not isinstance(entries, dict):
            raise CheckpointError(f"{path}: the {name} state is for other parameters (entry {_show(index)})")
        if entries and not required <= set(entries) <= required | optional:  # empty: not stepped yet
            raise CheckpointError(f"{path}: the {name} state of parameter {index} holds {sorted(map(str, entries))}, "
                                  f"not {sorted(required)}")
        p = params[by_index[index]]
        for key, t in entries.items():
            _check_optimizer_tensor(path, f"{name} {_show(key)} of parameter {index}", key, t, p)
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    try:
        opt.load_state_dict(saved)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: the {name} state does not load: {str(e).splitlines()[0][:160]}") from None
    for group, own in zip(opt.param_groups, hyper):
        group.update(own)


def _check_optimizer_groups(path: Path, name: str, opt, saved: dict, n_params: int) -> dict:
    """{saved parameter index: position in opt's parameters}; raises unless the groups match opt's."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list):
        raise CheckpointError(f"{path}: the {name} state's parameter groups are {_not(groups, 'a list')}")
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"{path}: the {name} state has {len(groups)} parameter groups, not "
                              f"{len(opt.param_groups)}")
    indices = []
    for group, own in zip(groups, opt.param_groups):
        ids = group.get("params") if isinstance(group, dict) else None
        if not (isinstance(ids, list) and len(ids) == len(own["params"]) and all(_whole(i, 0, n_params - 1) for i in ids)):
            raise CheckpointError(f"{path}: the {name} state is for other parameters (its groups do not match "
                                  "this model's)")
        indices += ids
    if sorted(indices) != list(range(n_params)):
        raise CheckpointError(f"{path}: the {name} state is for other parameters (indices {indices[:4]}...)")
    return {index: position for position, index in enumerate(indices)}


def _check_optimizer_tensor(path: Path, what: str, key, t, p: torch.Tensor) -> None:
    if not (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.is_floating_point()):
        raise CheckpointError(f"{path}: optimizer entry {what} is {_not(t, 'a floating-point tensor')}")
    if key == "step":
        ok = t.numel() == 1 and t.ndim == 0
    elif key == "second_moment":  # one value per neuron: the parameter's shape with one axis 1
        ok = t.ndim == p.ndim and all(a in (b, 1) for a, b in zip(t.shape, p.shape))
    else:
        ok = t.shape == p.shape
    if not ok:
        raise CheckpointError(f"{path}: optimizer entry {what} has shape {tuple(t.shape)}, but the parameter's is "
                              f"{tuple(p.shape)}: a state for other parameters")
    if not t.is_contiguous() or t.untyped_storage().nbytes() < t.numel() * t.element_size():
        raise CheckpointError(f"{path}: optimizer entry {what} does not hold its own data (corrupt or crafted)")
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{path}: optimizer entry {what} holds inf or nan")
    # AdamW divides by 1 - beta ** step and takes square roots of the second moments: a step that is not a
    # whole number >= 1, or a negative second moment, would end the resumed run in a traceback or NaN.
    if key == "step" and not (1 <= float(t) <= 2**53 and float(t) == int(float(t))):
        raise CheckpointError(f"{path}: optimizer entry {what} is {float(t)!r}, not a whole number of steps >= 1")
    if key in ("exp_avg_sq", "second_moment") and bool((t < 0).any()):
        raise CheckpointError(f"{path}: optimizer entry {what} holds negative values (a second moment cannot)")

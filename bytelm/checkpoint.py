"""Versioned, self-describing checkpoints: atomic writes, and loads that can never run code.

File layout (a torch.save'd dict, loaded with weights_only=True so no pickled object can execute):
    format         "bytelm"             tells a bytelm checkpoint from any other .pt file
    version        FORMAT_VERSION       bumped whenever the layout changes; newer files are refused
    model_config   ModelConfig as dict  enough to rebuild the model with no other file
    model          state_dict           weights of the uncompiled, unwrapped module
    train_state    dict or absent       optimizer, step, RNG, data position, metrics (see bytelm.training)
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import BytelmError, CheckpointError
from .model import ByteLM

FORMAT_NAME = "bytelm"
FORMAT_VERSION = 1
DEFAULT_PATH = "byte_llm_model.pt"  # the upstream project's file name

# Wrappers add these to parameter names; a checkpoint stores the plain module's names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip torch.compile / DDP prefixes so weights load into a plain ByteLM."""
    out = {}
    for name, t in state.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p):], True
        out[name] = t
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it.

    A crash or error at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the umask).
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                                  "the previous file, if any, is unchanged") from None
        raise
    _fsync_dir(folder)


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig,
                    train_state: dict | None = None) -> None:
    """Write a checkpoint atomically. `model` may be compiled or DDP-wrapped; the plain weights are saved."""
    ckpt = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_config": config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in clean_state_dict(model.state_dict()).items()},
    }
    if train_state is not None:
        ckpt["train_state"] = train_state
    atomic_save(ckpt, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and check a checkpoint's dict on CPU. Raises CheckpointError with one clear line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (train one with `python train.py`)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "REDUCE" in str(e) or "BUILD" in str(e):
            raise CheckpointError(f"refusing to load {path}: it contains Python objects other than tensors "
                                  "and plain data (possibly malicious code); nothing from it was run") from None
        raise CheckpointError(f"{path} is not a bytelm checkpoint (unreadable pickle data)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, UnicodeDecodeError) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable bytelm checkpoint (truncated or corrupt: {reason})") from None
    except MemoryError:
        raise CheckpointError(f"{path} declares more data than fits in memory; refusing it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a bytelm checkpoint (no bytelm format marker)")
    version = ckpt.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path} has no valid format version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses checkpoint format version {version}, but this bytelm reads up to "
                              f"version {FORMAT_VERSION}; upgrade bytelm to load it")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_config"), dict):
        raise CheckpointError(f"{path} is missing its model weights or config")
    return ckpt


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[ByteLM, dict]:
    """Rebuild the model from a checkpoint. Returns (model in eval mode on `device`, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (BytelmError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    state = ckpt["model"]
    # Check every shape before building the model, so a lying file cannot make us allocate for nothing.
    with torch.device("meta"):
        expected = ByteLM(config).state_dict()
    for name, t in expected.items():
        got = state.get(name)
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{path}: weight {name} is missing")
        if tuple(got.shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: weight {name} has shape {tuple(got.shape)}, "
                                  f"the config needs {tuple(t.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected weights {extra[:3]}")
    model = ByteLM(config)
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt

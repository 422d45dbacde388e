"""Versioned, self-describing checkpoints: atomic writes, and loads that can never run code.

File layout (a torch.save'd dict, loaded with weights_only=True so no pickled object can execute):
    format         "bytelm"             tells a bytelm checkpoint from any other .pt file
    version        FORMAT_VERSION       bumped whenever the layout changes; newer files are refused
    model_config   ModelConfig as dict  enough to rebuild the model with no other file
    model          state_dict           weights of the uncompiled, unwrapped module
    train_state    dict or absent       optimizer, step, RNG, data position, metrics (see bytelm.train.resume)

A .safetensors file (save_safetensors; `bytelm export MODEL --format safetensors`) holds the weights alone, with
format, version and model_config (JSON) in its metadata; read_checkpoint tells the two apart by their first
bytes, so every command that takes a model takes either, with the same checks.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from bytelm.config import ModelConfig
from bytelm.device import require_memory
from bytelm.errors import BytelmError, CheckpointError
from bytelm.files import atomic_write
from bytelm.model import ByteLM, model_memory

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


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through files.atomic_write: a crash or error at any point leaves the old file or the new
    one, never a partial file."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except Exception as e:
        # torch.save's zip writer reacts to a failed write (ENOSPC, EIO, EFBIG) by raising RuntimeError
        # ("unexpected pos ...") from its __exit__, with the OSError only as __context__: look down the chain,
        # or a full disk ends training with a traceback (found by tests/test_fault_injection.py).
        err = e
        while isinstance(err, Exception) and not isinstance(err, OSError):
            err = err.__cause__ or err.__context__
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}; "
                                  "the previous file, if any, is unchanged") from None
        raise


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


def save_safetensors(path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig) -> None:
    """Write the weights as safetensors, the model config in the metadata, atomically. The tied head is the
    embedding itself, so it is stored once (safetensors refuses shared tensors) and tied again on load."""
    state = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(model.state_dict()).items()}
    if config.tie_embeddings:
        state.pop("head.weight", None)
    metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "model_config": json.dumps(config.to_dict())}
    from safetensors.torch import save
    data = save(state, metadata=metadata)
    try:
        atomic_write(Path(path), lambda f: f.write(data))
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}; the previous file, if any, is unchanged") \
            from None


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then that much JSON ({...}), then the data."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def _read_safetensors(path: Path) -> dict:
    """A .safetensors file as read_checkpoint's dict (no train_state). The safetensors library checks that every
    tensor's bytes lie inside the file and match its dtype and shape; nothing in the file is code."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise CheckpointError(f"{path} is a safetensors file without bytelm's metadata (format, version, "
                                      "model_config); export it with `bytelm export MODEL --format safetensors`")
            state = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt: {reason})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except TypeError as e:  # a dtype that torch has no type for
        raise CheckpointError(f"{path}: {e}") from None
    try:
        version, config = int(metadata.get("version", "")), json.loads(metadata.get("model_config", ""))
    except (ValueError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has no valid format version or model config in its metadata") from None
    if isinstance(config, dict) and config.get("tie_embeddings", True) and "embed.weight" in state:
        state.setdefault("head.weight", state["embed.weight"])
    return {"format": FORMAT_NAME, "version": version, "model_config": config, "model": state}


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that an atomic_save of `path` killed mid-write (SIGKILL, power loss) left behind.

    They never affect loading (they have other names), but they would pile up. Only call this when no other
    process can be saving `path` right now: training does, while it holds the run's lock.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    removed = []
    # mkstemp's names: the prefix, 8 random characters, the suffix. Exactly 8, so the temp files of another
    # checkpoint whose name merely starts with this one's (m.pt.v2.pt beside m.pt) are never matched.
    for tmp in folder.glob(f".{glob.escape(path.name)}.{'?' * 8}.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


_ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells its zip format from the legacy one (torch.serialization)


def _check_archive(path: Path) -> None:
    """Refuse a zip whose entries would inflate beyond the file's own size (a zip bomb), or whose data fail
    their CRC-32 (silent damage), before torch reads it.

    torch.save writes every entry uncompressed (stored), and torch.load checks each storage's declared size
    against its entry's size, but it does inflate a compressed entry in full: a 1 MB file can make it
    allocate 1 GB (measured; docs/reliability.md). So a bytelm checkpoint's entries must all be stored, and
    together no larger than the file. Legacy (non-zip) files are left to torch.load, which reads each storage
    from the file itself and never touches memory a file only declares (measured too).
    """
    try:
        with open(path, "rb") as f:
            if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                return
            size = os.fstat(f.fileno()).st_size
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                entries = zf.infolist()
                declared = sum(e.file_size for e in entries)
                compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
                if compressed or declared > size:
                    raise CheckpointError(
                        f"refusing {path}: its entries declare {declared:,} bytes in a {size:,}-byte file"
                        + (f" ({len(compressed)} compressed, which torch.save never writes)" if compressed else "")
                        + "; a bytelm checkpoint is never compressed (possible zip bomb); nothing was loaded")
                # miniz (torch's zip reader) treats an entry with the DOS folder attribute as empty and hands
                # torch uninitialised memory for it: found by tests/test_fuzz.py, a one-bit flip in the zip
                # directory that loaded different weights without a word.
                folders = [e.filename for e in entries if e.is_dir() or e.external_attr & 0x10]
                if folders:
                    raise CheckpointError(f"{path} is corrupt: entry {folders[0]!r} is marked as a folder; "
                                          "nothing was loaded")
                # torch.load does not check the CRC-32 that torch.save stores for each entry, so a flipped bit
                # in the weights (a failing disk, a bad copy) would load silently. Reading the file once more
                # costs ~30 ms for the default model's resume file. CRC 0 means torch.save was told not to
                # compute it (torch.serialization.set_crc32_options): nothing to check then.
                for e in entries:
                    if e.CRC == 0 and e.file_size:
                        continue
                    with zf.open(e) as entry:
                        while entry.read(1 << 20):
                            pass
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except zipfile.BadZipFile as e:
        if "CRC" in str(e):
            raise CheckpointError(f"{path} is corrupt: {str(e).replace('Bad CRC-32 for file', 'entry')} fails its "
                                  "CRC-32 check (damaged on disk or in a copy); nothing was loaded") from None
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable bytelm checkpoint (truncated or corrupt: {reason})") from None
    except (zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError, RuntimeError) as e:
        # RuntimeError: zipfile's answer to an entry flagged as encrypted (found by tests/test_fuzz.py)
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable bytelm checkpoint (truncated or corrupt: {reason})") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and check a checkpoint's dict on CPU. Raises CheckpointError with one clear line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (train one with `python train.py`)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    try:
        with open(path, "rb") as f:
            head, size = f.read(9), os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if _is_safetensors(head, size):
        return _check_layout(path, _read_safetensors(path))
    _check_archive(path)
    try:
        # torch warns about what it meets in odd files (sparse CSR layouts, unusual pickle protocols): the
        # checks below refuse such files with one line of their own, so its warnings would be noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "REDUCE" in str(e) or "BUILD" in str(e):
            raise CheckpointError(f"refusing to load {path}: it contains Python objects other than tensors "
                                  "and plain data (possibly malicious code); nothing from it was run") from None
        raise CheckpointError(f"{path} is not a bytelm checkpoint (unreadable pickle data)") from None
    except MemoryError:
        raise CheckpointError(f"{path} declares more data than fits in memory; refusing it") from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways: EOFError, BadZipFile, the
        # unpickler's IndexError or KeyError on garbage, ...; each is the same one line for the user
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable bytelm checkpoint (truncated or corrupt: {reason})") from None
    return _check_layout(path, ckpt)


def _check_layout(path: Path, ckpt) -> dict:
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


class _SkipRandomInit(TorchFunctionMode):
    """Leaves a tensor as it is where a module would fill it with random numbers: for building a model on the
    meta device, which has no values to fill. Why: torch's meta normal_ is a Python reference whose first call
    imports torch._dynamo, about 2 s here, which every program that loads a checkpoint would wait for.
    Thread-local, like every torch function mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_ or func is torch.Tensor.normal_:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def check_weights(path: str | os.PathLike, config: ModelConfig, state: dict) -> None:
    """Check that `state` fits a ByteLM of `config` before any memory is allocated for the model.

    Names and shapes are compared with a model built on the meta device (no memory). Shapes alone prove
    nothing about size, though: a tensor can claim any shape over a one-element storage (stride 0), so a
    5 KB file could pass for a model of gigabytes. The weights' storages must therefore really hold (at
    least half precision) as many bytes as the model will allocate: what we build is bounded by the file.
    """
    with torch.device("meta"), _SkipRandomInit():
        meta_model = ByteLM(config)
    expected = meta_model.state_dict()
    for name, t in expected.items():
        got = state.get(name)
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{path}: weight {name} is missing")
        if tuple(got.shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: weight {name} has shape {tuple(got.shape)}, "
                                  f"the config needs {tuple(t.shape)}")
        if got.layout != torch.strided:  # sparse COO/CSR/...: torch.load builds them, bytelm never writes them
            raise CheckpointError(f"{path}: weight {name} is stored as a {str(got.layout).replace('torch.', '')} "
                                  "tensor; bytelm checkpoints hold dense weights only")
        if not got.is_floating_point():
            raise CheckpointError(f"{path}: weight {name} holds {got.dtype}, not floating-point numbers")
    extra = sorted(map(str, set(state) - set(expected)))
    if extra:
        raise CheckpointError(f"{path}: unexpected weights {extra[:3]}")
    storages = {}
    for t in state.values():
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
    need = sum(p.numel() for p in meta_model.parameters()) * 2  # bytes at 16 bits a weight
    if sum(storages.values()) < need:
        raise CheckpointError(f"{path}: its weights hold {sum(storages.values()):,} bytes of data, but the config "
                              f"needs {need // 2:,} weights; refusing it (corrupt or crafted)")


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with (read and checked as load_model does, weights unused)."""
    try:
        return ModelConfig.from_dict(read_checkpoint(path)["model_config"])
    except (BytelmError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {e}") from None


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[ByteLM, dict]:
    """Rebuild the model from a checkpoint. Returns (model in eval mode on `device`, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (BytelmError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    state = ckpt["model"]
    check_weights(path, config, state)
    model = ByteLM(config)  # checks that the weights and rotary tables fit in memory before allocating them
    model.load_state_dict(state)
    check_finite(path, model)
    if torch.device(device).type != "cpu":
        require_memory(model_memory(config), device)
    return model.to(device).eval(), ckpt


def check_finite(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Refuse weights that are NaN or infinite (a diverged run, damage, or a value outside fp32's range in a
    checkpoint saved in fp64): every step's output would be NaN, and sampling from NaN is undefined."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{path}: weight {name} holds NaN or infinite values (a diverged or damaged "
                                  "run); refusing it")

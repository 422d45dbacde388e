"""Errors a user can cause (bad paths, bad checkpoints, bad settings), and the checks that raise them.

Anything raised as a BytelmError is the user's to fix: the command lines (bytelm/cli/run.py) print its
message on one line and exit 1, never a traceback. Anything else is a bug in bytelm and keeps its traceback.
"""
from __future__ import annotations

import math
import typing
from typing import Callable, NoReturn


class BytelmError(Exception):
    """A problem the user can fix; its message is a complete, one-line explanation."""


class CheckpointError(BytelmError):
    """A checkpoint is missing, unreadable, corrupt, hostile, or from an unknown format version."""


class DataError(BytelmError):
    """Training data is missing, unreadable, empty, too small, or unreachable."""


def invalid(what: str) -> Callable[[str], NoReturn]:
    """The validator helper of every config class: `bad = invalid("model config")`, then
    `bad("n_layer must be in 1..256, got 0")` raises BytelmError("invalid model config: n_layer must be ...")."""
    def bad(message: str) -> NoReturn:
        raise BytelmError(f"invalid {what}: {message}")
    return bad


def check_field_types(config, bad: Callable[[str], NoReturn]) -> None:
    """Call bad() for the first field of dataclass `config` whose value is not of its annotated type: bool,
    int (not a bool), str, or float (an int or float, not a bool, finite). Other annotations are the class's
    own business."""
    hints = typing.get_type_hints(type(config))
    for name in getattr(config, "__dataclass_fields__", {}):
        value, kind = getattr(config, name), hints.get(name)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind is str:
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            article = "an" if kind is int else "a"
            shown = " ".join(repr(value).split())  # one line, even for a tensor
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            bad(f"{name} must be {article} {'finite number' if kind is float else kind.__name__}, got {shown}")

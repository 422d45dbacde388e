"""Errors a user can cause (bad paths, bad checkpoints, bad settings) and the CLI wrapper that prints them.

Anything raised as a BytelmError is the user's to fix: the CLI prints its message on one line and exits 1,
never a traceback. Anything else is a bug in bytelm and keeps its traceback.
"""
from __future__ import annotations

import errno
import math
import os
import sys
import typing
from typing import Callable, NoReturn, Sequence


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


# Errors of a stream the user pointed somewhere that cannot take it (a full disk, /dev/full, a closed or
# broken descriptor): the user's to fix, so one line, not a traceback.
_STREAM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF, errno.EROFS}


def _say(message: str) -> None:
    """One line on stderr, control characters shown visibly if it is a terminal; nothing if it is closed."""
    if sys.stderr is None:
        return
    from .cli.terminal import terminal_text
    try:
        print(message, file=terminal_text(sys.stderr), flush=True)
    except (OSError, ValueError):
        pass


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's final flush of what is still buffered cannot
    fail again ("Exception ignored ... BrokenPipeError") after the error has been reported."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point: user errors become one line on stderr and exit 1; Ctrl-C exits 130; stdout on a
    full disk or a broken descriptor exits 1 with one line; a reader that leaves early (`| head`) exits 0."""
    try:
        code = int(main(argv) or 0)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, so that a full disk is reported as below rather than at exit
        return code
    except BytelmError as e:
        _say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        _say("\ninterrupted")
        return 130
    except BrokenPipeError:
        # `bytelm generate ... | head` closes the pipe early; that is not an error.
        _discard_stdout()
        return 0
    except OSError as e:
        if e.errno not in _STREAM_ERRNOS:
            raise
        _discard_stdout()
        _say(f"error: cannot write {e.filename or 'the output'}: {e.strerror or e}")
        return 1

"""Errors a user can cause (bad paths, bad checkpoints, bad settings) and the CLI wrapper that prints them.

Anything raised as a BytelmError is the user's to fix: the CLI prints its message on one line and exits 1,
never a traceback. Anything else is a bug in bytelm and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class BytelmError(Exception):
    """A problem the user can fix; its message is a complete, one-line explanation."""


class CheckpointError(BytelmError):
    """A checkpoint is missing, unreadable, corrupt, hostile, or from an unknown format version."""


class DataError(BytelmError):
    """Training data is missing, unreadable, empty, too small, or unreachable."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point: user errors become one line on stderr and exit 1; Ctrl-C exits 130."""
    try:
        return int(main(argv) or 0)
    except BytelmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `bytelm generate ... | head` closes the pipe early; that is not an error.
        return 0

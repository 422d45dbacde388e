"""How every command line ends: user errors as one line on stderr, never a traceback.

    from bytelm.cli.run import run_cli
    sys.exit(run_cli(main))          # main(argv) -> exit code; BytelmError -> "error: ..." and exit 1
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Sequence

from bytelm.cli.terminal import terminal_text
from bytelm.errors import BytelmError

# Errors of a stream the user pointed somewhere that cannot take it (a full disk, /dev/full, a closed or
# broken descriptor): the user's to fix, so one line, not a traceback.
_STREAM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF, errno.EROFS}


def _say(message: str) -> None:
    """One line on stderr, control characters shown visibly if it is a terminal; nothing if it is closed."""
    if sys.stderr is None:
        return
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

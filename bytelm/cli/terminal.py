"""The standard streams of the command lines, and text for a terminal: control characters shown visibly, so
bytes a model generates or strings a checkpoint holds cannot drive the terminal (set its title, move the
cursor, clear the screen, ...).

    out = text_stdout()               # sys.stdout, wrapped by terminal_text; a closed stdout is a BytelmError
    out.write(piece)                  # on a terminal ESC shows as ^[, CR as ^M, DEL as ^?, U+009B as M-^[
    data = binary_stdin().read()      # sys.stdin's bytes; a closed stdin is a BytelmError

The notation is `cat -v`'s. Newline and tab pass through; pipes and files get the exact text.
"""
from __future__ import annotations

import sys
from typing import BinaryIO, TextIO

from bytelm.errors import BytelmError


def _caret(code: int) -> str:
    return "^?" if code == 0x7F else "^" + chr(code + 0x40)


# C0 controls but newline and tab, DEL, and the C1 controls (U+0080-U+009F: U+009B is a one-character CSI
# to terminals that honour C1 codes).
_VISIBLE = {code: _caret(code) for code in [*range(0x20), 0x7F] if code not in (0x09, 0x0A)}
_VISIBLE.update({code: "M-" + _caret(code - 0x80) for code in range(0x80, 0xA0)})


def visible(text: str) -> str:
    """`text` with every control character but newline and tab written out as `cat -v` shows it."""
    return text.translate(_VISIBLE)


def is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return False


class VisibleControls:
    """A text stream's stand-in whose write() shows control characters visibly; all else is the stream's."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(visible(text))

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def terminal_text(stream: TextIO) -> TextIO:
    """`stream` wrapped in VisibleControls if it is a terminal, else `stream` itself (exact bytes)."""
    return VisibleControls(stream) if is_terminal(stream) else stream


def text_stdout() -> TextIO:
    """sys.stdout, set to replace characters its encoding cannot show rather than crash mid-generation, and to
    show control characters visibly where it is a terminal. A closed stdout (`>&-`) is a BytelmError."""
    out = sys.stdout
    if out is None:
        raise BytelmError("standard output is closed; send it to a file or to /dev/null")
    if hasattr(out, "reconfigure"):
        try:
            out.reconfigure(errors="replace")
        except (ValueError, OSError):
            pass
    return terminal_text(out)


def binary_stdin() -> BinaryIO:
    """sys.stdin's bytes; a closed stdin (`<&-`) is a BytelmError."""
    if sys.stdin is None:
        raise BytelmError("standard input is closed; give it a file or /dev/null")
    return sys.stdin.buffer

"""Settings written once, as dataclass fields whose metadata says how they become command-line flags.

`option(default, help, ...)` is a dataclass field that is also an option; the parsers turn a user's text into
a field's value with one clear line for bad text. Library dataclasses (TrainConfig, InferenceConfig,
ServeSettings) declare their fields here; bytelm/cli/args.py turns them into argparse flags, so the library
never imports the command-line layer.

    @dataclass
    class Settings:
        steps: int = option(1000, "optimizer steps", group="run")          # --steps N, parsed by type
        temperature: float = option(0.8, "0 = greedy", flags=("--temperature", "--temp"), metavar="T")
    parse_text(Settings, "steps", "20")                                     # 20, as a REPL command parses it
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, Iterable

from bytelm.errors import BytelmError

Parser = Callable[[str, str], Any]  # (field name, text) -> value, or BytelmError


def option(default: Any, help: str, *, group: str = "", flags: tuple[str, ...] = (), parse: Parser | None = None,
           metavar: str = "", choices: Iterable[str] | None = None) -> Any:
    """A dataclass field that is also a command-line option. flags: () gives `--field-name`; group: the
    --help section ("" puts it in the caller's default group); parse: how text becomes a value (default: by
    the field's type); choices: the values allowed (shown in --help, checked by argparse)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "group": group, "flags": tuple(flags), "parse": parse, "metavar": metavar,
        "choices": tuple(choices) if choices is not None else None})


def parse_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise BytelmError(f"{name} must be a whole number, got {text.strip()!r}") from None


def parse_float(name: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise BytelmError(f"{name} must be a number, got {text.strip()!r}") from None
    if not math.isfinite(value):
        raise BytelmError(f"{name} must be a finite number, got {text.strip()!r}")
    return value


def parse_bool(name: str, text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    raise BytelmError(f"{name} must be on or off, got {text.strip()!r}")


def parse_str(name: str, text: str) -> str:
    return text


_BY_TYPE: dict[type, Parser] = {int: parse_int, float: parse_float, bool: parse_bool, str: parse_str}


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    """The field's flags: its own, else `--` and its name with dashes."""
    return f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)


def parser_of(cls: type, f: dataclasses.Field) -> Parser:
    """How text becomes a value of field `f`: its own parser, else the one for its type."""
    if f.metadata.get("parse"):
        return f.metadata["parse"]
    t = typing.get_type_hints(cls)[f.name]
    if t not in _BY_TYPE:
        raise TypeError(f"{cls.__name__}.{f.name}: give option(parse=...) for type {t}")
    return _BY_TYPE[t]


def parse_text(cls: type, name: str, text: str) -> Any:
    """Turn a user's text into a value for field `name` of `cls` (for prompts and REPL commands)."""
    return parser_of(cls, {f.name: f for f in dataclasses.fields(cls)}[name])(name, text)

"""Command-line flags from a dataclass: the one dataclass-to-argparse helper of every bytelm command line.

Defaults are written once, in the dataclass. Each field's metadata (set with `option`) carries its help text
and, where the plain rule does not fit, its group, flags, parser, metavar and choices:

    from dataclasses import dataclass
    from bytelm.cli.args import add_dataclass_arguments, given_values
    from bytelm.settings import option, parse_int

    @dataclass
    class Settings:
        steps: int = option(1000, "optimizer steps", group="run")          # --steps N, parsed by type
        temperature: float = option(0.8, "0 = greedy", flags=("--temperature", "--temp"), metavar="T")
        plot: bool = option(True, "draw the loss curve")                    # --plot / --no-plot
        dtype: str = option("auto", "autocast precision", choices=("auto", "fp32", "bf16"))
        seed: int | None = option(None, "seed (none: random)", parse=lambda name, text:
                                  None if text == "none" else parse_int(name, text))

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Settings)                # "(default: ...)" shown from Settings()
    args = parser.parse_args()
    settings = Settings(**given_values(args, Settings))      # only the flags given; the rest keep defaults
    parse_text(Settings, "steps", "20")                      # 20: the same parsing for a REPL command

Flags that were not given are absent from the namespace (argparse.SUPPRESS), so a caller can lay them over a
preset or a saved run. A parser takes (field name, text) and raises BytelmError with one line; argparse then
reports it as a usage error naming the flag. Range checks belong in the dataclass's own validate().
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Iterable

from bytelm.errors import BytelmError
from bytelm.settings import Parser, flags_of, parser_of


def _shown(value: Any) -> str:
    return "none" if value is None else "on" if value is True else "off" if value is False else str(value)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any = None, *,
                            group_title: str = "", exclude: Iterable[str] = ()) -> None:
    """One option per field of dataclass `cls` (but `exclude`), in argument groups by the fields' `group`
    metadata; fields without one go to `group_title` (or the parser's own options when that is empty too).
    `defaults` (an instance of cls) supplies the defaults shown in --help; nothing is set when a flag is not
    given. A bool field becomes --name / --no-name."""
    defaults = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    skip = set(exclude)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        title = f.metadata.get("group") or group_title
        if title not in groups:
            groups[title] = parser.add_argument_group(title) if title else parser
        target = groups[title]
        default, help_ = getattr(defaults, f.name), f.metadata["help"]
        if default != "":
            help_ = f"{help_} (default: {_shown(default)})"
        if hints[f.name] is bool:
            target.add_argument(*flags_of(f), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_)
            continue
        choices = f.metadata.get("choices")
        metavar = f.metadata.get("metavar") or ("{" + ",".join(choices) + "}" if choices else f.name.upper())
        target.add_argument(*flags_of(f), dest=f.name, type=_argparse_type(f.name, parser_of(cls, f)),
                            default=argparse.SUPPRESS, metavar=metavar, choices=choices, help=help_)


def _argparse_type(name: str, parse: Parser) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(name, text)
        except BytelmError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = name  # argparse names the type in some messages
    return convert


def given_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """{field: value} for the fields of `cls` whose flags were given."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}

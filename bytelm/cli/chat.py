"""The interactive prompt: type a prompt, watch the continuation stream; /commands change the settings.

    python inference.py [MODEL] [--temp 0.7 ...]      (same as `bytelm chat MODEL`)
    printf 'Once upon a time\nROMEO:\n' | python inference.py MODEL --seed 1   # pipe: one generation per line

On a terminal: line editing and history (readline, where Python has it), Ctrl-C stops a generation and
returns to the prompt, Ctrl-C or Ctrl-D at the prompt exits. With standard input not a terminal each line
is a prompt and only the generations go to stdout (one per line); command replies go to stderr. Every
setting command validates its value: a bad one prints why and leaves the setting unchanged.
"""
from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from typing import BinaryIO, Callable, Sequence, TextIO

from bytelm.checkpoint import DEFAULT_PATH
from bytelm.cli.generate import STREAM_LIMIT, add_config_arguments, add_runtime_arguments, config_from_args, open_generator
from bytelm.cli.terminal import binary_stdin, terminal_text, text_stdout
from bytelm.errors import BytelmError
from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig

PROMPT = "> "


@dataclass(frozen=True)
class Command:
    usage: str
    help: str
    run: Callable[["Repl", str], bool]  # (repl, argument text) -> False to quit
    setting: str | None = None  # the InferenceConfig field a setting command changes


def _setting_command(name: str, usage: str) -> Command:
    def run(repl: "Repl", arg: str) -> bool:
        repl.set_setting(name, arg)
        return True
    return Command(usage, InferenceConfig.help_for(name), run, setting=name)


def _help(repl: "Repl", arg: str) -> bool:
    repl.say("commands:")
    for name, cmd in COMMANDS.items():
        repl.say(f"  {cmd.usage:<20} {cmd.help}")
    repl.say("  (a setting command without a value shows the current value)")
    repl.say("anything else is a prompt; start it with // to send a prompt that begins with /")
    return True


def _config(repl: "Repl", arg: str) -> bool:
    repl.show_config()
    return True


def _reset(repl: "Repl", arg: str) -> bool:
    repl.gen.config = repl.startup_config
    repl.say("settings reset to their startup values")
    return True


def _quit(repl: "Repl", arg: str) -> bool:
    return False


# The table of commands: name -> Command. Setting commands map to InferenceConfig fields.
COMMANDS: dict[str, Command] = {
    "/help": Command("/help", "this list", _help),
    "/config": Command("/config", "show the current settings", _config),
    "/temp": _setting_command("temperature", "/temp X"),
    "/topk": _setting_command("top_k", "/topk K"),
    "/topp": _setting_command("top_p", "/topp P"),
    "/minp": _setting_command("min_p", "/minp P"),
    "/rep": _setting_command("repetition_penalty", "/rep X"),
    "/replast": _setting_command("repeat_last_n", "/replast N"),
    "/length": _setting_command("max_new_bytes", "/length N"),
    "/seed": _setting_command("seed", "/seed N|random"),
    "/stop": _setting_command("stop_at_separator", "/stop on|off"),
    "/reset": Command("/reset", "restore the settings the session started with", _reset),
    "/quit": Command("/quit", "leave (also /exit, Ctrl-D)", _quit),
}
ALIASES = {"/exit": "/quit", "/q": "/quit", "/?": "/help", "/h": "/help", "/settings": "/config",
           "/temperature": "/temp", "/top_k": "/topk", "/top_p": "/topp", "/min_p": "/minp",
           "/repeat_penalty": "/rep", "/repeat_last_n": "/replast", "/len": "/length", "/n": "/length"}


class Repl:
    """Reads prompts and commands, streams generations. `out` gets generations; `info` gets everything else."""

    def __init__(self, gen: ByteLevelGenerator, interactive: bool, out: TextIO, info: TextIO, model_name: str = ""):
        self.gen = gen
        self.interactive = interactive
        self.out = out
        self.info = info
        self.model_name = model_name
        self.startup_config = gen.config

    def say(self, message: str) -> None:
        print(message, file=self.info, flush=True)

    # -- commands -------------------------------------------------------------------------------------------
    def handle_command(self, line: str) -> bool:
        """Run one /command line. Returns False when the session should end."""
        name, _, arg = line.strip().partition(" ")
        name = ALIASES.get(name.lower(), name.lower())
        cmd = COMMANDS.get(name)
        if cmd is None:
            self.say(f"unknown command {line.split()[0]!r}; /help lists the commands")
            return True
        return cmd.run(self, arg.strip())

    def set_setting(self, name: str, arg: str) -> None:
        current = getattr(self.gen.config, name)
        if not arg:
            self.say(f"{name} = {self._show(current)}  ({InferenceConfig.help_for(name)})")
            return
        try:
            value = InferenceConfig.parse_value(name, arg)
            self.gen.config = self.gen.config.replace(**{name: value})
        except BytelmError as e:
            self.say(f"error: {e}; {name} stays {self._show(current)}")
            return
        self.say(f"{name} = {self._show(value)}")

    @staticmethod
    def _show(value) -> str:
        if value is None:
            return "random"
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    def show_config(self) -> None:
        c, g = self.gen.config, self.gen
        commands = {cmd.setting: cmd.usage for cmd in COMMANDS.values() if cmd.setting}
        for name in InferenceConfig.__dataclass_fields__:
            self.say(f"  {name:<20} {self._show(getattr(c, name)):<8} {commands.get(name, '')}")
        params = sum(p.numel() for p in g.model.parameters())
        self.say(f"  model: {self.model_name or 'in memory'}, {params:,} parameters, context {g.block_size} bytes, "
                 f"device {g.device}" + (f", last seed {g.last_seed}" if g.last_seed is not None else "")
                 + (f", decode step {g.last_stats['step']}" if "step" in g.last_stats else ""))

    # -- generation -----------------------------------------------------------------------------------------
    def generate(self, prompt: str | bytes) -> None:
        """Stream one generation to `out`; Ctrl-C stops it and returns normally."""
        stopped, piece = False, ""
        try:
            for piece in self.gen.stream(prompt):
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            stopped = True
        if self.interactive:
            s = self.gen.last_stats
            end = "stopped (Ctrl-C)" if stopped else (
                "end of document" if s.get("stopped_by") == "separator" else "length reached")
            newline = "" if piece.endswith("\n") and not stopped else "\n"
            self.out.write(f"{newline}[{s.get('new_bytes', 0)} bytes, {s.get('bytes_per_s', 0):.0f} B/s, {end}]\n")
        else:
            self.out.write("\n")
        self.out.flush()
        if stopped and not self.interactive:
            raise KeyboardInterrupt  # in a pipe, Ctrl-C ends the whole run (exit 130)

    def feed(self, line: str | bytes) -> bool:
        """One input line: a command, a prompt, or nothing. Returns False when the session should end."""
        slash = b"/" if isinstance(line, bytes) else "/"
        if not line:
            return True
        if line[:2] == slash * 2:  # an escaped prompt that begins with /
            line = line[1:]
        elif line[:1] == slash:
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            return self.handle_command(text)
        self.generate(line)
        return True

    # -- the two loops --------------------------------------------------------------------------------------
    def run_interactive(self) -> int:
        try:
            import readline  # noqa: F401  -- gives input() line editing and history
        except ImportError:
            pass
        # input() decodes what is typed with stdin's error handler, "strict" in most UTF-8 locales: one invalid
        # byte (pasted binary, a Latin-1 terminal) raised UnicodeDecodeError and ended the session with a
        # traceback. surrogateescape keeps such bytes; prompt_to_bytes turns them back into the bytes typed.
        if getattr(sys.stdin, "errors", None) == "strict" and hasattr(sys.stdin, "reconfigure"):
            try:
                sys.stdin.reconfigure(errors="surrogateescape")
            except (ValueError, OSError):
                pass
        params = sum(p.numel() for p in self.gen.model.parameters())
        self.say(f"bytelm chat: {self.model_name} ({params:,} parameters, context {self.gen.block_size} bytes, "
                 f"{self.gen.device})")
        self.say("Type a prompt and press Enter. /help lists commands; Ctrl-C stops a generation; "
                 "Ctrl-D or /quit leaves.")
        while True:
            try:
                line = input(PROMPT)
            except (EOFError, KeyboardInterrupt):
                self.out.write("\n")
                self.out.flush()
                return 0
            if not self.feed(line):
                return 0

    def run_lines(self, lines: BinaryIO) -> int:
        """One prompt or command per line; a line longer than STREAM_LIMIT (/dev/zero has no newline) is
        refused once that much is read, rather than read on into all of memory."""
        number = 0
        while raw := lines.readline(STREAM_LIMIT + 1):
            number += 1
            if len(raw) > STREAM_LIMIT:
                raise BytelmError(f"line {number} of standard input is longer than {STREAM_LIMIT >> 20} MiB; "
                                  "a prompt is read one line at a time")
            line = raw[:-1] if raw.endswith(b"\n") else raw
            line = line[:-1] if line.endswith(b"\r") else line
            if not self.feed(line):
                break
        return 0


def main(argv: Sequence[str] | None = None, prog: str = "python inference.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Interactive prompt for a trained bytelm model. With standard input not a "
        "terminal, each line is a prompt and only the generations are printed.")
    parser.add_argument("model", nargs="?", default=DEFAULT_PATH, help=f"checkpoint (default: {DEFAULT_PATH})")
    add_runtime_arguments(parser)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    stdin, out = binary_stdin(), text_stdout()  # closed ones are refused before the model loads
    gen = open_generator(args, config)
    interactive = stdin.isatty()
    # Pipe mode: command replies to stderr (shown safely if that is a terminal), or nowhere if it is closed.
    info = out if interactive else terminal_text(sys.stderr) if sys.stderr is not None else io.StringIO()
    repl = Repl(gen, interactive, out=out, info=info, model_name=str(args.model))
    return repl.run_interactive() if interactive else repl.run_lines(stdin)


if __name__ == "__main__":
    from bytelm.cli.run import run_cli
    sys.exit(run_cli(main))

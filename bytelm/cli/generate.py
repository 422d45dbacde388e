"""`bytelm generate` and `python demo_inference.py`: generations printed to stdout; the flags and streams that
`bytelm chat` (bytelm/cli/chat.py) shares with them.

    bytelm generate MODEL -p "Once upon a time" -n 256 --temp 0.8 --seed 1   # one generation to stdout
    bytelm generate MODEL -f notes.txt                                       # the prompt from a file ('-': stdin)
    python demo_inference.py [MODEL]                                         # five prompts, streamed

Only generated text goes to stdout (exactly its bytes to a pipe or file; control characters shown as `cat -v`
does on a terminal); notices go to stderr. The generation settings' flags come from InferenceConfig's fields.
"""
from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import BinaryIO, Sequence

from bytelm.checkpoint import DEFAULT_PATH
from bytelm.config import MAX_CONTEXT
from bytelm.errors import BytelmError
from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig, prompt_to_bytes
from bytelm.cli.args import add_dataclass_arguments, given_values
from bytelm.cli.terminal import binary_stdin, text_stdout

# A prompt read from a pipe or a device is read to its end, keeping only its last MAX_CONTEXT bytes (the most
# any model reads), and refused past this many bytes: /dev/zero never ends. A regular file is read from its
# tail alone, whatever its size.
STREAM_LIMIT = 64 << 20


def add_config_arguments(parser: argparse.ArgumentParser, defaults: InferenceConfig | None = None) -> None:
    """One flag (plus llama.cpp aliases) per InferenceConfig field; the defaults shown come from `defaults`."""
    add_dataclass_arguments(parser, InferenceConfig, defaults, group_title="generation settings")
    parser.add_argument("--ignore-eos", dest="stop_at_separator", action="store_false", default=argparse.SUPPRESS,
                        help="same as --no-stop-at-separator (llama.cpp name)")


def config_from_args(args: argparse.Namespace, base: InferenceConfig | None = None) -> InferenceConfig:
    """The settings given on the command line applied over `base` (validated)."""
    return (base or InferenceConfig()).replace(**given_values(args, InferenceConfig))


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --threads and --exact, shared by `bytelm generate`, `bytelm chat` and the demo."""
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads, 1 to the number of CPUs (default: 1; one-byte steps are too small to "
                             "share out, and a thread whose core is busy stalls the others)")
    parser.add_argument("--exact", action="store_true",
                        help="run each step with the fp32 weights, as ByteLM.forward to float rounding (default: "
                             "the C step reads half-precision copies, 2-3x faster, logits within ~1e-3)")


def open_generator(args: argparse.Namespace, config: InferenceConfig) -> ByteLevelGenerator:
    """The generator the CLI flags ask for, with torch's CPU threads set from --threads."""
    from bytelm.device import set_threads

    set_threads(args.threads)  # one-byte steps: 1 unless --threads says otherwise (see the flag's help)
    return ByteLevelGenerator(args.model, config, device=args.device, decode_step="exact" if args.exact else "auto")


def read_tail(stream: BinaryIO, name: str, keep: int = MAX_CONTEXT) -> bytes:
    """The last `keep` bytes of `stream`: from the tail alone for a regular file, else read to the end (memory
    stays `keep` bytes), refused past STREAM_LIMIT bytes."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        mode = 0
    if stat.S_ISREG(mode) and stream.seekable():
        size = stream.seek(0, os.SEEK_END)
        stream.seek(max(0, size - keep))
        return stream.read(keep)
    tail, total = b"", 0
    while chunk := stream.read(1 << 16):
        total += len(chunk)
        if total > STREAM_LIMIT:
            raise BytelmError(f"{name} gave more than {STREAM_LIMIT >> 20} MiB for the prompt; a model reads at "
                              f"most its last {keep:,} bytes: pass those alone (tail -c {keep}) or a regular file")
        tail = (tail + chunk)[-keep:]
    return tail


def read_prompt(args: argparse.Namespace) -> bytes:
    """--prompt's text or --file's bytes (at most the last MAX_CONTEXT of them: see read_tail)."""
    if args.file is None:
        return prompt_to_bytes(args.prompt)
    if args.prompt:
        raise BytelmError("give either --prompt or --file, not both")
    if args.file == "-":
        return read_tail(binary_stdin(), "standard input")
    try:
        with open(args.file, "rb") as f:
            return read_tail(f, args.file)
    except OSError as e:
        raise BytelmError(f"cannot read prompt file {args.file}: {e.strerror or e}") from None


def main(argv: Sequence[str] | None = None, prog: str = "bytelm generate") -> int:
    """Print one generation: only the generated text on stdout (a newline is added on a terminal)."""
    parser = argparse.ArgumentParser(prog=prog, description="Print one generation for a prompt. Only the "
                                     "generated text goes to stdout; notices go to stderr.")
    parser.add_argument("model", nargs="?", default=DEFAULT_PATH, help=f"checkpoint (default: {DEFAULT_PATH})")
    parser.add_argument("-p", "--prompt", default="", help="text to continue (default: empty = a new document)")
    parser.add_argument("-f", "--file", help="read the prompt's bytes from a file ('-' = standard input); a pipe "
                        f"or device may give at most {STREAM_LIMIT >> 20} MiB")
    add_runtime_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="print speed and settings to stderr")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    out = text_stdout()
    prompt = read_prompt(args)
    gen = open_generator(args, config)
    if len(prompt) > gen.block_size - 1:
        more = "at least " if len(prompt) == MAX_CONTEXT and args.file is not None else ""
        print(f"note: the prompt has {more}{len(prompt)} bytes; the model sees the last {gen.block_size - 1}",
              file=sys.stderr)
    for piece in gen.stream(prompt):
        out.write(piece)
        out.flush()
    if out.isatty():
        out.write("\n")
    if args.verbose:
        import torch
        s = gen.last_stats
        print(f"{s['new_bytes']} bytes in {s['seconds']:.2f} s ({s['bytes_per_s']:.0f} B/s) on {gen.device}; "
              f"stopped by {s['stopped_by']}; seed {gen.last_seed}; {torch.get_num_threads()} thread(s) (--threads); "
              f"decode step {s['step']}", file=sys.stderr)
    return 0


DEMO_PROMPTS = (
    "The future of AI is",
    "Once upon a time",
    "ROMEO:\n",
    "def fibonacci(n):\n",
    "Dear Sir or Madam,\n\nI am writing to",
)


def demo_main(argv: Sequence[str] | None = None, prog: str = "demo_inference.py") -> int:
    """Generate from five varied prompts, streaming each."""
    parser = argparse.ArgumentParser(prog=prog, description="Generate from five varied prompts.")
    parser.add_argument("model", nargs="?", default=DEFAULT_PATH, help=f"checkpoint (default: {DEFAULT_PATH})")
    add_runtime_arguments(parser)
    add_config_arguments(parser, InferenceConfig(max_new_bytes=200))
    args = parser.parse_args(argv)
    config = config_from_args(args, InferenceConfig(max_new_bytes=200))
    if not os.path.exists(args.model):
        raise BytelmError(f"no model at {args.model}: train one first with `python train.py`, "
                          f"or pass a checkpoint: {prog} MODEL")
    out = text_stdout()
    gen = open_generator(args, config)
    for i, prompt in enumerate(DEMO_PROMPTS, 1):
        out.write(f"--- {i}/{len(DEMO_PROMPTS)}: {prompt!r}\n{prompt}")
        for piece in gen.stream(prompt):
            out.write(piece)
            out.flush()
        s = gen.last_stats
        out.write(f"\n({s['new_bytes']} bytes, {s['bytes_per_s']:.0f} B/s)\n\n")
    return 0

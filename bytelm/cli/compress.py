"""`bytelm compress MODEL IN [-o OUT]` and `bytelm decompress MODEL IN [-o OUT]`: lossless, with the model.

    bytelm compress model.pt notes.txt               # writes notes.txt.blz; notes.txt is kept
    bytelm decompress model.pt notes.txt.blz         # writes notes.txt (refused if it exists; -f overwrites)
    cat notes.txt | bytelm compress model.pt - > notes.blz
    bytelm decompress model.pt notes.blz -o -        # to stdout

As gzip and zstd do: `-` reads stdin, `-o -` writes stdout (the default when the input is stdin), the input
is always kept, an existing output is refused without -f, and a file is written atomically: a temporary file
renamed into place once complete and, when decompressing, once the original's SHA-256 has been checked, so a
failure at any point leaves no partial output. Input and output go a block at a time (memory does not grow
with the file); to stdout, each decoded block is written once its CRC-32 has passed. decompress refuses to
write more than --max-output bytes (default 4 GiB). docs/compression.md has the format and the guarantees.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from bytelm.errors import BytelmError
from bytelm.cli.score import add_thread_argument, input_size, read_chunks, set_threads
from bytelm.cli.terminal import text_stdout


def _parser(prog: str, decompress: bool) -> argparse.ArgumentParser:
    verb = "decompress" if decompress else "compress"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("model", help="checkpoint file; decompress with the same one that compressed")
    parser.add_argument("input", metavar="IN", help=f"file to {verb}; - for stdin")
    from bytelm.codec.container import SUFFIX
    default = f"IN without {SUFFIX}" if decompress else f"IN{SUFFIX}"
    parser.add_argument("-o", "--output", metavar="OUT", help=f"output file, - for stdout (default: {default}; "
                        "stdout when IN is -)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    add_thread_argument(parser)
    if decompress:
        parser.add_argument("--max-output", type=_size, default=None, metavar="BYTES",
                            help="refuse to write more than this (a decompression bomb); K, M, G or T suffixes; "
                            "0: no limit (default: 4G)")
    else:
        parser.add_argument("--stride", type=int, default=None, metavar="N",
                            help="bytes each window of the model's context moves on (default: 3/4 of the context; "
                            "smaller predicts from more context, more slowly)")
    return parser


def _output_path(args, decompress: bool) -> Path | None:
    """Where to write (None: stdout), refusing what gzip refuses."""
    from bytelm.codec.container import SUFFIX
    out = args.output
    if out is None:
        if args.input == "-":
            out = "-"
        elif not decompress:
            out = args.input + SUFFIX
        elif args.input.endswith(SUFFIX) and len(Path(args.input).name) > len(SUFFIX):
            out = args.input[:-len(SUFFIX)]
        else:
            raise BytelmError(f"{args.input}: no {SUFFIX} suffix to remove; name the output with -o")
    if out == "-":
        text_stdout()  # a closed stdout (`>&-`) is one line, before any work
        if not decompress and sys.stdout.isatty():
            raise BytelmError("compressed data not written to a terminal; use -o FILE or redirect stdout")
        return None
    path = Path(out)
    if args.input != "-" and path.exists() and path.resolve() == Path(args.input).resolve():
        raise BytelmError(f"{out}: the output would overwrite the input")
    if path.is_dir():
        raise BytelmError(f"{out} is a folder; name an output file")
    if path.exists() and not path.is_file():
        return path  # a device or a pipe (/dev/null): written to like stdout, never renamed over
    if path.exists() and not args.force:
        raise BytelmError(f"{out} already exists; use -f to overwrite it")
    return path


def _size(text: str) -> int:
    """'4G', '512M', '1000' -> bytes (K, M, G, T are powers of 1024)."""
    import re
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4G, 512M or 1000000")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def main(argv: Sequence[str] | None = None, prog: str = "bytelm compress") -> int:
    decompressing = prog.endswith("decompress")
    args = _parser(prog, decompressing).parse_args(argv)
    out_path = _output_path(args, decompressing)
    chunks = read_chunks(args.input)

    from bytelm.checkpoint import load_model
    from bytelm.codec.compress import DEFAULT_MAX_OUTPUT, compress_stream, decompress_stream
    from bytelm.files import atomic_write
    set_threads(args.threads)
    model, _ = load_model(args.model)
    progress = not args.quiet
    stream = out_path is None or not out_path.is_file() and out_path.exists()  # stdout, a device or a pipe
    sizes = [0, 0]

    def run(write) -> None:
        if decompressing:
            limit = DEFAULT_MAX_OUTPUT if args.max_output is None else args.max_output or None
            reader = ChunkReader(chunks)
            sizes[1] = decompress_stream(model, reader.read, write, max_output=limit, progress=progress)
            sizes[0] = reader.consumed
        else:
            sizes[:] = compress_stream(model, chunks, write, stride=args.stride, progress=progress,
                                       total=input_size(args.input))

    try:
        if out_path is None:
            # Streamed: compressed blocks as they are made; decoded blocks once their CRC-32 passes (the SHA-256
            # of the whole, checked at the end, can't take back what was written).
            run(_stdout_write)
        elif stream:
            with open(out_path, "wb") as f:
                run(f.write)
        else:
            # Into a temporary file renamed into place only if everything passed: nothing is published otherwise.
            atomic_write(out_path, lambda f: run(f.write))
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        raise BytelmError(f"cannot write {out_path or 'to stdout'}: {e.strerror or e}"
                          + ("" if stream else "; nothing was written")) from None
    if not args.quiet and not stream:
        original, packed = (sizes[1], sizes[0]) if decompressing else sizes
        bpb = 8 * packed / original if original else 0.0
        print(f"{args.input} -> {out_path}: {original:,} bytes <-> {packed:,} bytes ({bpb:.3f} bits per byte)",
              file=sys.stderr)
    return 0


def _stdout_write(part: bytes) -> None:
    sys.stdout.buffer.write(part)


class ChunkReader:
    """read(n) over an iterator of chunks (bytelm.cli.score.read_chunks), counting the bytes it handed out."""

    def __init__(self, chunks) -> None:
        self.chunks, self.buf, self.consumed = iter(chunks), bytearray(), 0

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.consumed += len(out)
        return out

"""`bytelm compress MODEL IN [-o OUT]` and `bytelm decompress MODEL IN [-o OUT]`: lossless, with the model.

    bytelm compress model.pt notes.txt               # writes notes.txt.blz; notes.txt is kept
    bytelm decompress model.pt notes.txt.blz         # writes notes.txt (refused if it exists; -f overwrites)
    cat notes.txt | bytelm compress model.pt - > notes.blz
    bytelm decompress model.pt notes.blz -o -        # to stdout

As gzip and zstd do: `-` reads stdin, `-o -` writes stdout (the default when the input is stdin), the input
is always kept, an existing output is refused without -f, and a file is written atomically: a temporary file
renamed into place once complete and, when decompressing, once the original's SHA-256 has been checked, so a
failure at any point leaves no partial output. docs/compression.md has the format and the guarantees.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from bytelm.errors import BytelmError
from bytelm.cli.score import add_thread_argument, read_input, set_threads


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
        parser.add_argument("--any-encoder", action="store_true",
                            help="decode a file encoded with another torch version or CPU kind (the SHA-256 check "
                            "still refuses a wrong result)")
    else:
        parser.add_argument("--segment-len", type=int, default=None, metavar="N",
                            help="bytes per independently coded segment (default: the model's context)")
        parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                            help="segments coded side by side (default: as many as 256 MiB of cache allows)")
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


def _write_stream(path: Path | None, parts: list[bytes]) -> None:
    """Write to stdout (path None) or to a device or pipe, which can hold no temporary file to rename."""
    if path is None:
        for part in parts:
            sys.stdout.buffer.write(part)
        sys.stdout.buffer.flush()
        return
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)


def main(argv: Sequence[str] | None = None, prog: str = "bytelm compress") -> int:
    decompressing = prog.endswith("decompress")
    args = _parser(prog, decompressing).parse_args(argv)
    out_path = _output_path(args, decompressing)
    data = read_input(args.input)

    from bytelm.checkpoint import load_model
    from bytelm.codec.compress import compress_bytes, decompress_into
    from bytelm.files import atomic_write
    set_threads(args.threads)
    model, _ = load_model(args.model)
    progress = not args.quiet
    stream = out_path is None or not out_path.is_file() and out_path.exists()  # stdout, a device or a pipe
    try:
        if not decompressing:
            blob = compress_bytes(model, data, segment_len=args.segment_len, batch_size=args.batch_size,
                                  progress=progress)
            if stream:
                _write_stream(out_path, [blob])
            else:
                atomic_write(out_path, lambda f: f.write(blob))
            sizes = (len(data), len(blob))
        elif stream:
            parts: list[bytes] = []  # a stream can't be taken back: hold everything until the checksum passes
            n = decompress_into(model, data, parts.append, any_encoder=args.any_encoder, progress=progress)
            _write_stream(out_path, parts)
            sizes = (len(data), n)
        else:
            # Written as decoded into the temporary file; decompress_into raises before returning if the
            # checksum fails, and atomic_write then removes the temporary file: nothing is published.
            atomic_write(out_path, lambda f: decompress_into(model, data, f.write, any_encoder=args.any_encoder,
                                                             progress=progress))
            sizes = (len(data), out_path.stat().st_size)
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

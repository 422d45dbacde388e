"""`bytelm score MODEL FILE...`: bits per byte of each file under the model, beside zlib, bz2 and lzma.

    bytelm score model.pt notes.txt                    # a table: bytes, bits per byte, the stdlib compressors
    bytelm score model.pt a.txt b.txt --json           # for scripts
    cat x | bytelm score model.pt -                    # stdin
    bytelm score model.pt notes.txt --per-byte notes.jsonl --top-k 3 --patches

--per-byte writes every byte's surprisal, entropy and rank (bits; rank 1 = the most likely byte), and the top
alternatives with --top-k: .jsonl (one object per byte), .npz (named arrays) or .npy (one structured array).
--patches adds Byte Latent Transformer entropy patches (bytelm.codec.score.entropy_patches).

Every input is read and scored in blocks: memory does not grow with its size, and .jsonl rows are written as
they come. Only .npz/.npy per-byte output and --patches with the default (mean-entropy) threshold hold every
byte's scores, refused in one line when they would not fit in memory.
"""
from __future__ import annotations

import argparse
import bz2
import io
import json
import lzma
import stat
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from bytelm.errors import BytelmError
from bytelm.cli.terminal import binary_stdin, text_stdout

BASELINES = {  # name -> a streaming compressor; the strongest settings of the standard library's compressors
    "zlib-9": lambda: zlib.compressobj(9),
    "bz2-9": lambda: bz2.BZ2Compressor(9),
    "lzma-9e": lambda: lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME),
}
CHUNK = 1 << 20  # bytes read at a time: what memory holds of an input, whatever its size


def read_input(name: str) -> bytes:
    """The bytes of a file, or of stdin for '-'; one clear line when it can't be read."""
    return b"".join(read_chunks(name))


def read_chunks(name: str, size: int = CHUNK) -> Iterator[bytes]:
    """A file's bytes, or stdin's for '-', `size` at a time; one clear line when it can't be read."""
    try:
        f = binary_stdin() if name == "-" else open(name, "rb")
    except OSError as e:
        raise BytelmError(f"cannot read {name}: {e.strerror or e}") from None
    try:
        while True:
            try:
                chunk = f.read(size)
            except OSError as e:
                raise BytelmError(f"cannot read {name}: {e.strerror or e}") from None
            if not chunk:
                return
            yield chunk
    finally:
        if name != "-":
            f.close()


def input_size(name: str) -> int | None:
    """Bytes of a regular file (for a progress bar), None for stdin, a pipe or a device."""
    try:
        st = Path(name).stat() if name != "-" else None
    except OSError:
        return None
    return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None


def add_thread_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads for torch (default 0: every core that other processes leave free, "
                        "all of them on an idle machine)")


def set_threads(n: int) -> tuple[int, str]:
    """--threads: n, or for 0 the cores other processes leave free (bytelm.device.thread_choice: a thread
    sharing a busy core stalls every other thread at each parallel region)."""
    from bytelm.device import set_threads as set_torch_threads
    return set_torch_threads(n, zero_is_automatic=True)


class Tally:
    """Bits, entropy and the standard library's compressed sizes of a stream, fed piece by piece."""

    def __init__(self) -> None:
        self.bytes, self.bits, self.entropy = 0, 0.0, 0.0
        self.compressors = {k: make() for k, make in BASELINES.items()}
        self.sizes = dict.fromkeys(BASELINES, 0)

    def add(self, data: bytes, scores=None) -> None:
        self.bytes += len(data)
        if scores is not None:
            self.bits += scores.total_bits
            self.entropy += float(scores.entropy.sum(dtype=np.float64))
        for k, c in self.compressors.items():
            self.sizes[k] += len(c.compress(data))

    def summary(self, name: str) -> dict:
        for k, c in self.compressors.items():
            self.sizes[k] += len(c.flush())
        n = max(1, self.bytes)
        return {"file": name, "bytes": self.bytes, "bits_per_byte": self.bits / n, "bits": self.bits,
                "mean_entropy": self.entropy / n, "baselines": {k: 8 * v / n for k, v in self.sizes.items()}}


class PatchCutter:
    """Entropy patch starts (bytelm.codec.score.entropy_patches with an explicit threshold and/or relative
    rise), cut piece by piece as the scores stream in."""

    def __init__(self, threshold: float | None, relative: float | None, max_len: int | None) -> None:
        self.threshold, self.relative, self.max_len = threshold, relative, max_len
        self.prev, self.run, self.count = None, 0, 0  # previous entropy, bytes since the last start, starts

    def cut(self, entropy: np.ndarray) -> np.ndarray:
        """bool (N,): which of these bytes start a patch."""
        h = entropy.astype(np.float64)
        starts = np.zeros(len(h), bool)
        if self.threshold is not None:
            starts |= h > self.threshold
        if self.relative is not None:
            prev = np.concatenate([[h[0] if self.prev is None else self.prev], h[:-1]])
            starts |= h - prev > self.relative
        if self.prev is None and len(h):
            starts[0] = True
        if self.max_len is not None:  # a patch reaching max_len bytes is cut there
            for i in range(len(h)):
                self.run = 0 if starts[i] else self.run + 1
                if self.run == self.max_len:
                    starts[i], self.run = True, 0
        if len(h):
            self.prev = h[-1]
        self.count += int(starts.sum())
        return starts


def _jsonl_rows(name: str | None, offset: int, data: bytes, scores, is_start: np.ndarray | None) -> bytes:
    text = io.StringIO()
    for i in range(len(data)):
        row = {"pos": offset + i, "byte": data[i], "surprisal": round(float(scores.surprisal[i]), 5),
               "entropy": round(float(scores.entropy[i]), 5), "rank": int(scores.rank[i])}
        if name is not None:
            row = {"file": name, **row}
        if scores.top_bytes.shape[1]:
            row["top"] = [[int(b), round(float(p), 6)] for b, p in zip(scores.top_bytes[i], scores.top_probs[i])]
        if is_start is not None:
            row["patch_start"] = bool(is_start[i])
        text.write(json.dumps(row) + "\n")
    return text.getvalue().encode()


def _write_arrays(f, suffix: str, held: list[tuple[bytes, object]], offsets: list[int],
                  starts: list[np.ndarray] | None) -> None:
    """Every byte's scores, held in memory, as .npz (named arrays) or .npy (one structured array)."""
    cat = lambda key: np.concatenate([getattr(s, key) for _, s in held])  # noqa: E731
    arrays = {"byte": np.frombuffer(b"".join(d for d, _ in held), np.uint8), "surprisal": cat("surprisal"),
              "entropy": cat("entropy"), "rank": cat("rank"), "top_bytes": cat("top_bytes"),
              "top_probs": cat("top_probs"), "file_offsets": np.array(offsets, np.int64)}
    if starts is not None:  # patch starts, as positions in the concatenation
        arrays["patch_starts"] = np.concatenate([np.zeros(0, np.int64), *starts])
    if suffix == ".npz":
        np.savez(f, **arrays)
        return
    k = arrays["top_bytes"].shape[1]
    fields = [("byte", "u1"), ("surprisal", "f4"), ("entropy", "f4"), ("rank", "i2")]
    fields += [("top_bytes", "u1", (k,)), ("top_probs", "f4", (k,))] if k else []
    table = np.zeros(len(arrays["byte"]), dtype=fields)
    for name, *_ in fields:
        table[name] = arrays[name]
    np.save(f, table)


def _hold(held: list, piece: tuple[bytes, object], total: list[int]) -> None:
    """Keep a piece of scores in memory (for .npz/.npy or the mean-entropy patch threshold), checking first
    that what is held, and its concatenation at the end, fit in memory: an endless stdin ends in one line."""
    from bytelm.device import require_memory
    data, s = piece
    total[0] += len(data) + sum(getattr(s, f).nbytes for f in s.__dataclass_fields__)
    require_memory([("per-byte scores held for --per-byte .npz/.npy or --patches' mean threshold, twice for "
                     "their concatenation", 2 * total[0])])
    held.append(piece)


def _score_files(model, args, out) -> list[dict]:
    """Score every file, streaming: per-byte rows go to `out` (a .jsonl file or None) as they come."""
    from bytelm.codec.score import entropy_patches, score_stream
    suffix = args.per_byte.suffix.lower() if args.per_byte else None
    mean_threshold = args.patches and args.patch_threshold is None and args.patch_relative is None
    several = len(args.files) > 1
    summaries, everything = [], Tally() if several else None
    held, held_bytes, offsets, all_starts = [], [0], [0], [] if args.patches else None
    for name in args.files:
        tally = Tally()
        cutter = PatchCutter(args.patch_threshold, args.patch_relative, args.patch_max_len) if args.patches else None
        mine: list[tuple[bytes, object]] = []  # this file's pieces, when they must be held
        offset = 0
        for data, scores in score_stream(model, read_chunks(name), stride=args.stride, top_k=args.top_k,
                                         batch_size=args.batch_size, progress=True, total=input_size(name)):
            tally.add(data, scores)
            if everything is not None:
                everything.add(data)
            if mean_threshold or suffix in (".npz", ".npy"):
                _hold(mine, (data, scores), held_bytes)
            elif out is not None or cutter is not None:
                is_start = cutter.cut(scores.entropy) if cutter is not None else None
                if out is not None:
                    out.write(_jsonl_rows(name if several else None, offset, data, scores, is_start))
                if all_starts is not None:
                    all_starts.append(offsets[-1] + offset + np.flatnonzero(is_start))
            offset += len(data)
        summary = tally.summary(name)
        if mine and mean_threshold:
            starts = entropy_patches(np.concatenate([s.entropy for _, s in mine]), max_len=args.patch_max_len)
            all_starts.append(offsets[-1] + starts)
            if out is not None:
                is_start = np.zeros(offset, bool)
                is_start[starts] = True
                at = 0
                for data, scores in mine:
                    out.write(_jsonl_rows(name if several else None, at, data, scores, is_start[at:at + len(data)]))
                    at += len(data)
        if args.patches:
            count = len(all_starts[-1]) if mean_threshold else cutter.count
            summary["patches"] = count
            summary["mean_patch_len"] = offset / count if count else 0.0
        summaries.append(summary)
        offsets.append(offsets[-1] + offset)
        if suffix in (".npz", ".npy"):
            held.extend(mine)
    if suffix in (".npz", ".npy"):
        from bytelm.files import atomic_write
        atomic_write(args.per_byte, lambda f: _write_arrays(f, suffix, held, offsets, all_starts))
    if everything is not None:
        total = everything.summary("(all)")
        total["bits"] = sum(s["bits"] for s in summaries)
        total["bits_per_byte"] = total["bits"] / max(1, total["bytes"])
        if args.patches:
            total["patches"] = sum(s["patches"] for s in summaries)
            total["mean_patch_len"] = total["bytes"] / max(1, total["patches"])
        summaries.append(total)
    return summaries


def _print_table(summaries: list[dict], total: dict | None) -> None:
    names = list(BASELINES)
    patches = "mean_patch_len" in summaries[0]
    width = max(12, *(len(s["file"]) for s in summaries))
    head = f"{'file':<{width}} {'bytes':>12} {'bits/byte':>10}" + "".join(f" {n:>9}" for n in names)
    print(head + (f" {'patch len':>9}" if patches else ""))
    for s in summaries + ([total] if total else []):
        line = f"{s['file']:<{width}} {s['bytes']:>12,} {s['bits_per_byte']:>10.4f}"
        line += "".join(f" {s['baselines'][n]:>9.4f}" for n in names)
        print(line + (f" {s['mean_patch_len']:>9.2f}" if patches else ""))
    print(f"(bits per byte; {', '.join(names)}: the same bytes through Python's zlib, bz2 and lzma)")


def main(argv: Sequence[str] | None = None, prog: str = "bytelm score") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("model", help="checkpoint file, e.g. byte_llm_model.pt")
    parser.add_argument("files", nargs="+", metavar="FILE", help="files to score; - for stdin")
    parser.add_argument("--stride", type=int, default=None,
                        help="bytes each window of the model's context moves on (default: half the context)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: ~4,096 bytes)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--per-byte", type=Path, metavar="OUT", help="write every byte's scores to OUT "
                        "(.jsonl, .npz or .npy)")
    parser.add_argument("--top-k", type=int, default=0, help="with --per-byte: keep the K most likely bytes too")
    parser.add_argument("--patches", action="store_true", help="cut entropy patches; report the mean patch length")
    parser.add_argument("--patch-threshold", type=float, default=None, metavar="BITS",
                        help="a patch starts where the entropy exceeds this (default: the mean entropy, unless "
                        "--patch-relative is given)")
    parser.add_argument("--patch-relative", type=float, default=None, metavar="BITS",
                        help="a patch starts where the entropy rises by more than this over the previous byte's")
    parser.add_argument("--patch-max-len", type=int, default=None, metavar="N", help="cut patches at N bytes")
    add_thread_argument(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    args = parser.parse_args(argv)
    if args.files.count("-") > 1:
        raise BytelmError("stdin (-) can be scored only once")

    text_stdout()  # a closed stdout (`>&-`) is one line now, not a table lost at the end
    if args.per_byte and args.per_byte.suffix.lower() not in (".jsonl", ".npz", ".npy"):
        raise BytelmError(f"--per-byte {args.per_byte}: the name must end in .jsonl, .npz or .npy")

    from bytelm.checkpoint import load_model
    from bytelm.device import pick_device
    from bytelm.files import atomic_write
    set_threads(args.threads)
    model, _ = load_model(args.model, pick_device(args.device))
    if args.per_byte and args.per_byte.suffix.lower() == ".jsonl":  # streamed into the file, published whole
        summaries: list[dict] = []
        atomic_write(args.per_byte, lambda f: summaries.extend(_score_files(model, args, f)))
    else:
        summaries = _score_files(model, args, None)
    total = summaries.pop() if len(summaries) > 1 else None
    if args.json:
        print(json.dumps({"model": args.model, "files": summaries, "total": total or summaries[0]}, indent=2))
    else:
        _print_table(summaries, total)
    return 0

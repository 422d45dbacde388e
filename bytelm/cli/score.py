"""`bytelm score MODEL FILE...`: bits per byte of each file under the model, beside zlib, bz2 and lzma.

    bytelm score model.pt notes.txt                    # a table: bytes, bits per byte, the stdlib compressors
    bytelm score model.pt a.txt b.txt --json           # for scripts
    cat x | bytelm score model.pt -                    # stdin
    bytelm score model.pt notes.txt --per-byte notes.jsonl --top-k 3 --patches

--per-byte writes every byte's surprisal, entropy and rank (bits; rank 1 = the most likely byte), and the top
alternatives with --top-k: .jsonl (one object per byte), .npz (named arrays) or .npy (one structured array).
--patches adds Byte Latent Transformer entropy patches (bytelm.codec.score.entropy_patches).
"""
from __future__ import annotations

import argparse
import bz2
import io
import json
import lzma
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from bytelm.errors import BytelmError
from bytelm.cli.terminal import binary_stdin

BASELINES = {  # name -> compress(bytes) -> bytes; the strongest settings of the standard library's compressors
    "zlib-9": lambda b: zlib.compress(b, 9),
    "bz2-9": lambda b: bz2.compress(b, 9),
    "lzma-9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
}


def read_input(name: str) -> bytes:
    """The bytes of a file, or of stdin for '-'; one clear line when it can't be read."""
    if name == "-":
        return binary_stdin().read()
    try:
        return Path(name).read_bytes()
    except OSError as e:
        raise BytelmError(f"cannot read {name}: {e.strerror or e}") from None


def add_thread_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads for torch (default 0: every core that other processes leave free, "
                        "all of them on an idle machine)")


def set_threads(n: int) -> None:
    """--threads: n, or for 0 the cores other processes leave free (bytelm.train.distributed.auto_threads: a thread
    sharing a busy core stalls every other thread at each parallel region)."""
    from bytelm.train.distributed import set_threads as set_torch_threads
    set_torch_threads(n, zero_is_automatic=True)


def _patch_starts(scores, args) -> np.ndarray | None:
    from bytelm.codec.score import entropy_patches
    if not args.patches:
        return None
    return entropy_patches(scores.entropy, threshold=args.patch_threshold, relative=args.patch_relative,
                           max_len=args.patch_max_len)


def _summary(name: str, data: bytes, scores, starts: np.ndarray | None) -> dict:
    out = {"file": name, "bytes": len(data), "bits_per_byte": scores.bits_per_byte, "bits": scores.total_bits,
           "mean_entropy": float(scores.entropy.mean()) if len(data) else 0.0,
           "baselines": {k: 8 * len(f(data)) / len(data) if data else 0.0 for k, f in BASELINES.items()}}
    if starts is not None:
        out["patches"] = int(len(starts))
        out["mean_patch_len"] = len(data) / len(starts) if len(starts) else 0.0
    return out


def _per_byte_jsonl(f, name: str | None, data: bytes, scores, starts) -> None:
    is_start = np.zeros(len(data), bool)
    if starts is not None:
        is_start[starts] = True
    text = io.StringIO()
    for i in range(len(data)):
        row = {"pos": i, "byte": data[i], "surprisal": round(float(scores.surprisal[i]), 5),
               "entropy": round(float(scores.entropy[i]), 5), "rank": int(scores.rank[i])}
        if name is not None:
            row = {"file": name, **row}
        if scores.top_bytes.shape[1]:
            row["top"] = [[int(b), round(float(p), 6)] for b, p in zip(scores.top_bytes[i], scores.top_probs[i])]
        if starts is not None:
            row["patch_start"] = bool(is_start[i])
        text.write(json.dumps(row) + "\n")
    f.write(text.getvalue().encode())


def write_per_byte(path: Path, results: list[tuple[str, bytes, object, np.ndarray | None]]) -> None:
    """Every byte's scores of every file, concatenated in order, written atomically to .jsonl, .npz or .npy."""
    from bytelm.files import atomic_write
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".npz", ".npy"):
        raise BytelmError(f"--per-byte {path}: the name must end in .jsonl, .npz or .npy")
    if suffix == ".jsonl":
        several = len(results) > 1
        atomic_write(path, lambda f: [_per_byte_jsonl(f, name if several else None, data, s, st)
                                      for name, data, s, st in results])
        return
    cat = lambda key: np.concatenate([getattr(s, key) for _, _, s, _ in results])  # noqa: E731
    arrays = {"byte": np.frombuffer(b"".join(d for _, d, _, _ in results), np.uint8),
              "surprisal": cat("surprisal"), "entropy": cat("entropy"), "rank": cat("rank"),
              "top_bytes": cat("top_bytes"), "top_probs": cat("top_probs"),
              "file_offsets": np.cumsum([0] + [len(d) for _, d, _, _ in results]).astype(np.int64)}
    if results[0][3] is not None:  # patch starts, as positions in the concatenation
        arrays["patch_starts"] = np.concatenate([st + off for (_, _, _, st), off
                                                 in zip(results, arrays["file_offsets"])])
    if suffix == ".npz":
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return
    k = arrays["top_bytes"].shape[1]
    fields = [("byte", "u1"), ("surprisal", "f4"), ("entropy", "f4"), ("rank", "i2")]
    fields += [("top_bytes", "u1", (k,)), ("top_probs", "f4", (k,))] if k else []
    table = np.zeros(len(arrays["byte"]), dtype=fields)
    for name, *_ in fields:
        table[name] = arrays[name]
    atomic_write(path, lambda f: np.save(f, table))


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

    from bytelm.checkpoint import load_model
    from bytelm.device import pick_device
    from bytelm.codec.score import score_bytes
    set_threads(args.threads)
    model, _ = load_model(args.model, pick_device(args.device))
    results, summaries = [], []
    for name in args.files:
        data = read_input(name)
        scores = score_bytes(model, data, stride=args.stride, top_k=args.top_k, batch_size=args.batch_size,
                             progress=True)
        starts = _patch_starts(scores, args)
        results.append((name, data, scores, starts))
        summaries.append(_summary(name, data, scores, starts))
    total = None
    if len(results) > 1:
        all_bytes = b"".join(d for _, d, _, _ in results)
        n = max(1, len(all_bytes))
        total = {"file": "(all)", "bytes": len(all_bytes), "bits": sum(s["bits"] for s in summaries),
                 "baselines": {k: 8 * len(f(all_bytes)) / n for k, f in BASELINES.items()}}
        total["bits_per_byte"] = total["bits"] / n
        if args.patches:
            total["patches"] = sum(s["patches"] for s in summaries)
            total["mean_patch_len"] = len(all_bytes) / max(1, total["patches"])
    if args.per_byte:
        write_per_byte(args.per_byte, results)
    if args.json:
        print(json.dumps({"model": args.model, "files": summaries, "total": total or summaries[0]}, indent=2))
    else:
        _print_table(summaries, total)
    return 0

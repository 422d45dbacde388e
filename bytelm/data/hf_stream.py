"""HuggingFace `datasets` streaming: a dataset's records -> this rank's documents, and a fast check that the hub
can be reached before `datasets` spends minutes retrying.

    from bytelm.data.hf_stream import open_stream, stream_documents
    dataset = open_stream("parquet", data_files="docs.parquet")      # or ("HuggingFaceTB/smollm-corpus", ...)
    for doc in stream_documents(dataset, "text", rank=0, world_size=1, max_bytes=10_000): ...

bytelm.data.corpus.load_stream splits and caches what this yields; tests drive the same code on local files.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

from bytelm.data.documents import check_rank, text_bytes, within
from bytelm.errors import DataError

HUB_TIMEOUT_S = 3.0  # connectivity probe before streaming: fail in seconds, not after minutes of retries


def have_datasets() -> bool:
    return importlib.util.find_spec("datasets") is not None


def _probe(host: str, port: int, timeout: float) -> None:
    socket.create_connection((host, port), timeout=timeout).close()


def hub_unreachable_reason(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the HuggingFace hub cannot be reached (offline setting, no DNS, no route), or None if it can."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    target = urlsplit(url if "://" in url else f"http://{url}")
    host, port = target.hostname or "huggingface.co", target.port or (443 if target.scheme == "https" else 80)
    result: list[str | None] = []

    def run() -> None:
        try:
            _probe(host, port, timeout)
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e.strerror or e}")

    # In a thread because name resolution ignores the socket timeout and can hang for much longer.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout + 2)
    return result[0] if result else f"{host}:{port}: no answer in {timeout + 2:.0f} s"


def open_stream(path: str, name: str | None = None, *, data_files=None, split: str = "train"):
    """`datasets.load_dataset(..., streaming=True)`: the hub for cosmopedia, "parquet"/"json" in tests."""
    import datasets
    return datasets.load_dataset(path, name, data_files=data_files, split=split, streaming=True)


def stream_documents(dataset: Iterable, text_field: str = "text", rank: int = 0, world_size: int = 1,
                     max_bytes: int | None = None) -> Iterator[bytes]:
    """This rank's documents from a stream of records, as UTF-8 bytes, stopping once max_bytes are taken.

    A `datasets.IterableDataset` is split with `split_dataset_by_node` (whole shards per rank when the shard
    count divides by world_size, else every world_size-th record); any other iterable gives rank the records
    i with i % world_size == rank. Either way the ranks' documents are disjoint.
    """
    check_rank(rank, world_size)
    hf = sys.modules.get("datasets")
    if world_size > 1:
        if hf is not None and isinstance(dataset, hf.IterableDataset):
            from datasets.distributed import split_dataset_by_node
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        else:
            dataset = itertools.islice(dataset, rank, None, world_size)

    def records() -> Iterator[bytes]:
        i = 0
        try:
            for i, record in enumerate(dataset):
                yield text_bytes(record, text_field, f"record {i}")
        except DataError:
            raise
        except Exception as e:  # network drops, auth, schema changes: the user's to see, in one line
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"reading the stream failed after {i} records: {msg}") from None

    yield from within(records(), max_bytes)

"""ONNX export of a bytelm model's forward: input_ids (batch, time) int64 byte values -> logits (batch, time, 256).

    from bytelm.export.onnx import write_onnx
    write_onnx(model, "model.onnx")     # then: onnxruntime.InferenceSession("model.onnx").run(None, {...})

torch.onnx.export's dynamo exporter (needs the `onnx` and `onnxscript` packages: `pip install bytelm[onnx]`),
with the batch and the time dimension dynamic (time up to the model's context). No KV cache: each call reads
the whole window. Written to a temporary file beside `out` and renamed into place.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from bytelm.errors import BytelmError
from bytelm.model import ByteLM


class _Logits(torch.nn.Module):
    """ByteLM.forward without targets or cache, returning the logits alone: the graph ONNX holds."""

    def __init__(self, model: ByteLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 256)
        return self.model(input_ids)[0]


def write_onnx(model: ByteLM, out: str | os.PathLike) -> None:
    """Write `model`'s forward (an fp32 CPU copy of it; the model itself is left as it is) to `out`."""
    for needed in ("onnx", "onnxscript"):
        try:
            __import__(needed)
        except ImportError:
            raise BytelmError(f"ONNX export needs the {needed} package: pip install 'bytelm[onnx]'") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    example = torch.zeros(1, min(8, model.config.block_size), dtype=torch.long)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("time", max=model.config.block_size)}
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    try:
        # The exporter reports each stage on stdout and warns about optional packages (torchvision): noise here.
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            onnx_log.setLevel(logging.ERROR)
            torch.onnx.export(_Logits(copy.deepcopy(model).cpu().float()).eval(), (example,), tmp, dynamo=True,
                              dynamic_shapes=(dims,), input_names=["input_ids"], output_names=["logits"],
                              external_data=False, verbose=False)
        os.replace(tmp, out)
    except OSError as e:
        raise BytelmError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        onnx_log.setLevel(level)
        with contextlib.suppress(OSError):
            os.unlink(tmp)

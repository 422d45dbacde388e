"""Causal self-attention for training, evaluation and prefill: the C kernel (bytelm/csrc/attention.c) where it
applies, torch's scaled_dot_product_attention everywhere else.

    y = causal_attention(q, k, v)   # q, k, v: (B, T, H, D), any row stride -> y: (B, T, H, D) contiguous

The kernel runs on CPUs with AVX2 and FMA, for fp32 tensors and head sizes that are a multiple of 8 (24 in the
default model, 40 in 4x4x160); it is a torch custom op with its own backward, so torch.compile and autograd
treat it as one opaque call. Where no gradient is wanted it is called directly instead, which spares the first
generation in a process the import of torch._dynamo (about 2 s). Why it exists: at the shapes trained here
torch's CPU attention runs at a fraction of the machine's peak (docs/training.md, "Attention"). `kernel_ready()`
resolves, once per process and outside any compiled code, whether the C library is there (ByteLM's constructor
calls it); BYTELM_NATIVE=0 turns it off with the rest of the C code. tests/test_attention.py checks outputs and
gradients against torch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .native import library

_lib = None
_ready = False  # read by the model's forward: a plain global, so compiled code sees a constant


def kernel_ready() -> bool:
    """Whether the attention kernel is available in this process (builds the C library on first use)."""
    global _lib, _ready
    if _lib is None:
        lib = library()
        if lib is not None and hasattr(lib, "bytelm_attention_supported") and lib.bytelm_attention_supported():
            _lib, _ready = lib, True
    return _ready


def uses_kernel(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether causal_attention takes the C kernel for these q, k, v (B, T, H, D). All three must be fp32 on the
    CPU: under bf16 autocast the values come straight from a bf16 matmul while the normalised queries are fp32."""
    return (_ready and q.shape[-1] % 8 == 0
            and all(x.device.type == "cpu" and x.dtype == torch.float32 for x in (q, k, v)))


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D), causal) v for q, k, v (B, T, H, D): (B, T, H, D)."""
    if uses_kernel(q, k, v):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                           or v.requires_grad)):
            return torch.ops.bytelm.causal_attention(q, k, v)[0]
        # No gradient wanted (evaluation, prefill): the kernel directly. The custom op's first call in a process
        # imports torch._dynamo, about 2 s on this machine, which every generation CLI would wait for.
        return _kernel_forward(q, k, v)[0]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return y.transpose(1, 2)


def _rows(x: Tensor) -> Tensor:
    """x (B, T, H, D) as the kernel reads it: element (b, t, h, d) at (b T + t) rs + h D + d for some row stride
    rs (a slice of a fused (B, T, 3, H, D) projection qualifies); a copy only when x is laid out otherwise."""
    B, T, H, D = x.shape
    if x.stride(3) == 1 and x.stride(2) == D and x.stride(0) == T * x.stride(1):
        return x
    return x.contiguous()


def _check(code: int) -> None:
    if code == 1:
        raise MemoryError("out of memory in the attention kernel")
    if code:
        raise RuntimeError("the attention kernel does not support these tensors")


def _kernel_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out (B, T, H, D), lse (B, H, T)): lse is each query's log softmax normaliser, for the backward."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, T, H, D = q.shape
    out, lse = q.new_empty(B, T, H, D), q.new_empty(B, H, T)
    _check(_lib.bytelm_attention_forward(B, T, H, D, D ** -0.5, torch.get_num_threads(),
                                         q.data_ptr(), q.stride(1), k.data_ptr(), k.stride(1),
                                         v.data_ptr(), v.stride(1), out.data_ptr(), lse.data_ptr()))
    return out, lse


@torch.library.custom_op("bytelm::causal_attention", mutates_args=(), device_types="cpu")
def _attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's forward as an op that autograd and torch.compile see as one call."""
    return _kernel_forward(q, k, v)


@_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, T, H, D = q.shape
    return q.new_empty(B, T, H, D), q.new_empty(B, H, T)


@torch.library.custom_op("bytelm::causal_attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each (B, T, H, D), from the forward's inputs and outputs and the gradient of out."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    out, lse, dout = out.contiguous(), lse.contiguous(), dout.contiguous()
    B, T, H, D = q.shape
    dq, dk, dv = (q.new_empty(B, T, H, D) for _ in range(3))
    _check(_lib.bytelm_attention_backward(B, T, H, D, D ** -0.5, torch.get_num_threads(),
                                          q.data_ptr(), q.stride(1), k.data_ptr(), k.stride(1),
                                          v.data_ptr(), v.stride(1), out.data_ptr(), lse.data_ptr(),
                                          dout.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr()))
    return dq, dk, dv


@_attention_backward.register_fake
def _(q, k, v, out, lse, dout):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, dout: Tensor, _dlse: Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    return torch.ops.bytelm.causal_attention_backward(q, k, v, out, lse, dout)


_attention.register_autograd(_backward, setup_context=_setup_context)


"""Causal attention (bytelm/attention.py): the C kernel (bytelm/csrc/attention.c) against torch's
scaled_dot_product_attention, outputs and gradients, on the layouts the model hands it; the model's loss and
gradients the same either way, eager and compiled; and torch's path wherever the kernel does not apply."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bytelm.attention as attention
from bytelm.config import ModelConfig
from bytelm.model import ByteLM

REPO = Path(__file__).resolve().parents[1]
KERNEL = attention.kernel_ready()
needs_kernel = pytest.mark.skipif(not KERNEL, reason="no attention kernel here (no C compiler, or no AVX2)")


def reference(q, k, v):
    """torch's attention on (B, T, H, D) tensors"""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def fused_qkv(B, T, H, D, seed):
    """q, k, v as the model makes them: views of one (B, T, 3, H, D) projection, so rows are 3 H D apart"""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, 3, H, D, generator=g) * 2).unbind(2)


@needs_kernel
@pytest.mark.parametrize("B, T, H, D", [(1, 1, 1, 8), (1, 9, 1, 8), (2, 37, 3, 16), (2, 64, 2, 24), (3, 50, 2, 40),
                                        (1, 130, 1, 72)])
def test_kernel_matches_torch_outputs_and_gradients(B, T, H, D):
    """Partial tiles of query rows (T not a multiple of 4) and of keys (not of 16), column chunks of 8-24."""
    q, k, v = (t.clone().requires_grad_() for t in fused_qkv(B, T, H, D, seed=T))
    q0, k0, v0 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    assert attention.uses_kernel(q, k, v)
    out, want = attention.causal_attention(q, k, v), reference(q0, k0, v0)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    grad = torch.randn(B, H, T, D).transpose(1, 2)  # not contiguous, as autograd may hand it over
    out.backward(grad)
    want.backward(grad)
    for got, ref in ((q.grad, q0.grad), (k.grad, k0.grad), (v.grad, v0.grad)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


@needs_kernel
@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_kernel_without_autograd_gives_the_same_output(no_grad):
    """Evaluation and prefill call the kernel directly, not through the custom op: the same numbers."""
    q, k, v = fused_qkv(2, 37, 3, 16, seed=1)
    want = attention.causal_attention(*(t.clone().requires_grad_() for t in (q, k, v)))
    with no_grad():
        got = attention.causal_attention(q, k, v)
    torch.testing.assert_close(got, want.detach(), atol=0, rtol=0)
    torch.testing.assert_close(got, reference(q, k, v), atol=2e-5, rtol=1e-4)


@needs_kernel
def test_kernel_under_torch_library_checks():
    """The custom op's registration (fake tensors for compile, autograd, schemas) is consistent."""
    q, k, v = (t.contiguous().requires_grad_() for t in fused_qkv(2, 12, 2, 8, seed=0))
    torch.library.opcheck(torch.ops.bytelm.causal_attention.default, (q, k, v))


@pytest.mark.parametrize("dtypes, D", [((torch.float64,) * 3, 8), ((torch.float32,) * 3, 12),
                                       ((torch.float32, torch.float32, torch.bfloat16), 8)],
                         ids=["fp64", "head-size-12", "bf16-values"])
def test_other_tensors_take_torch_attention(dtypes, D):
    """Other dtypes and head sizes, and the mix bf16 autocast makes (fp32 normalised q and k, bf16 v)."""
    q, k, v = (t.to(dtype) for t, dtype in zip(fused_qkv(2, 10, 2, D, seed=1), dtypes))
    assert not attention.uses_kernel(q, k, v)
    if v.dtype != q.dtype:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attention.causal_attention(q, k, v)
        torch.testing.assert_close(got.float(), reference(q, k, v.float()), atol=0.05, rtol=0.05)
    else:
        torch.testing.assert_close(attention.causal_attention(q, k, v), reference(q, k, v))


@needs_kernel
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_model_trains_the_same_with_the_kernel(compiled, monkeypatch):
    """One training step's loss and every gradient, kernel against torch's attention (head size 8)."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=24))
    if compiled:
        model.compile_blocks()
    x, y = torch.randint(0, 256, (3, 24)), torch.randint(0, 256, (3, 24))
    results = []
    for ready in (True, False):
        monkeypatch.setattr(attention, "_ready", ready)
        model.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_k, grads_k), (loss_t, grads_t) = results
    torch.testing.assert_close(loss_k, loss_t)
    for a, b in zip(grads_k, grads_t):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_without_the_c_library_the_model_uses_torch_attention(tmp_path):
    code = ("import torch\nimport bytelm.attention as a\nfrom bytelm.config import ModelConfig\n"
            "from bytelm.model import ByteLM\n"
            "m = ByteLM(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))\n"
            "_, loss = m(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))\n"
            "loss.backward()\nprint(a.kernel_ready(), round(loss.item(), 1))\n")
    env = dict(os.environ, BYTELM_CACHE=str(tmp_path), BYTELM_NATIVE="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    ready, loss = done.stdout.split()
    assert ready == "False" and 4.0 < float(loss) < 7.0


@pytest.mark.skipif(not shutil.which("gcc") or not hasattr(os, "getuid"), reason="needs gcc and a POSIX shell")
def test_a_compiler_without_openmp_still_builds_the_kernel(tmp_path):
    """The library is built with -fopenmp where the compiler can link it, else without: the kernel then runs on
    one thread and gives the same results."""
    fake = tmp_path / "cc-no-openmp"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "no libgomp" >&2; exit 1; }; done\n'
                    'exec gcc "$@"\n')
    fake.chmod(0o755)
    code = ("import torch, torch.nn.functional as F\nimport bytelm.attention as a\n"
            "q, k, v = torch.randn(2, 20, 3, 2, 8).unbind(2)\n"
            "ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)\n"
            "print(a.kernel_ready(), (a.causal_attention(q, k, v) - ref.transpose(1, 2)).abs().max().item())\n")
    env = dict(os.environ, BYTELM_CACHE=str(tmp_path / "cache"), CC=str(fake))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    ready, worst = done.stdout.split()
    assert ready == "True" and float(worst) < 1e-5

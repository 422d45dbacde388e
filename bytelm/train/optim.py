"""Optimizer setup: Muon (torch.optim.Muon) for the hidden weight matrices, AdamW for everything else.

    from bytelm.train.optim import build_optimizers
    optimizers = build_optimizers(model, muon_lr=0.01, adam_lr=0.001)   # [Muon, AdamW]

Which parameter goes where is decided by role (its name), not by shape: the byte embedding is 2-D too,
and the output head is the same Parameter as the embedding when tied. Every parameter lands in exactly
one group, and `split_params` asserts it.

Why a subclass of torch.optim.Muon: torch runs the Newton-Schulz orthogonalisation in bf16. On a CPU
without bf16 dot products that is ~20x slower than fp32 (measured on the 2-core AVX2 EPYC, one thread,
5 NS steps: 576x192 138 ms bf16 vs 8 ms fp32; 192x768 295 ms vs 9.5 ms; the six-layer default model
spent 4.5 s per step in bf16 NS against ~0.2 s in fp32). So where bf16 is slow, `Muon` does the same
update with the iteration in fp32; where bf16 is fast it calls torch's own step unchanged. The state
layout (one `momentum_buffer` per matrix) is torch's, so checkpoints move between the two.

The subclass also adds NorMuon (`normuon=True`, what training uses unless --no-normuon): after the
orthogonalisation each neuron's step is divided by a running RMS of its own past steps, then the whole
update is scaled back to its norm (`normalize_neurons`). It keeps one more small tensor per matrix in the
state (`second_moment`); with it, the step always takes this subclass's loop, with the iteration in fp32 or
bf16 as above.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from bytelm.device import cpu_has_fast_bf16

# Hidden matrices by role: attention (qkv, proj) and MLP (fc, proj) weights inside the transformer blocks.
_MUON_NAME = re.compile(r"^blocks\.\d+\.(attn|mlp)\.[A-Za-z_]\w*\.weight$")

# Torch's defaults for Muon (Keller Jordan's quintic coefficients), repeated here for the fp32 path.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5

# Muon's momentum (torch's default, with Nesterov), and where the training loop's warmup of it starts
# (bytelm.train.schedule.muon_momentum; modded-nanogpt's schedule).
MOMENTUM = 0.95
MOMENTUM_START = 0.85

# NorMuon's decay for the running second moment of each neuron's orthogonalised update (the paper's beta2).
NEURON_BETA2 = 0.95


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  steps: int = NS_STEPS, eps: float = 1e-7, dtype: torch.dtype = torch.float32,
                  gram: bool | None = None) -> torch.Tensor:
    """Approximately orthogonalise a matrix (U S V^T -> U S' V^T, S' ~ 1), computing in `dtype`.

    grad: (rows, cols), or a stack (n, rows, cols) of same-shape matrices, each orthogonalised on its own: one
    batched product per iteration instead of n small ones. The same quintic iteration as torch.optim.Muon;
    for one matrix with dtype=torch.bfloat16 it is bit-identical to it.

    gram: run the iteration on the small Gram matrix (see below); None picks it where it does less arithmetic
    (fp32 or fp64, and a long side at least 1.5x the short one). Never in bf16: its rounding compounds there.
    """
    if grad.ndim not in (2, 3):
        raise ValueError("newton_schulz needs a matrix or a stack of matrices")
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(-2) > grad.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix x @ x.T is the smaller one
        x = x.mT
    norm = x.norm() if x.ndim == 2 else x.norm(dim=(-2, -1), keepdim=True)
    x = x.div(norm.clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    fma = torch.addmm if x.ndim == 2 else torch.baddbmm  # out = beta * input + alpha * (m1 @ m2)
    r, n = x.shape[-2:]  # r <= n
    if gram is None:
        gram = dtype in (torch.float32, torch.float64) and 2 * n >= 3 * r
    if not gram:
        for _ in range(steps):
            g = x @ x.mT  # (r, r)
            poly = fma(g, g, g, beta=b, alpha=c)  # b*G + c*G^2
            x = fma(x, poly, x, beta=a)  # a*X + (b*G + c*G^2) X
        return x.mT if tall else x
    # Each step is X <- P X with P = a I + b G + c G^2 a polynomial of G = X X^T (r x r, symmetric), so after k
    # steps X_k = Q X_0 with Q = P_k ... P_1, and G_{k+1} = P G_k P. Carrying Q and G (r x r products only) and
    # forming Q X_0 once costs 2 r^2 n + 17 r^3 multiply-adds for 5 steps against 10 r^2 n + 5 r^3: equal at
    # n = 1.5 r, 44% fewer at n = 4 r (the MLP's matrices; measured 12.2 -> 7.4 ms for four 160x640, 2 threads).
    # It agrees with the direct iteration to ~1e-4 in fp32 (tests/test_optim.py); torch's Muon rounds to bf16.
    g = x @ x.mT  # (r, r)
    q = None
    for i in range(steps):
        poly = fma(g, g, g, beta=b, alpha=c)  # b*G + c*G^2
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # + a*I
        q = poly if q is None else poly @ q
        if i < steps - 1:
            g = poly @ (poly @ g)
    x = q @ x
    return x.mT if tall else x


def _neuron_axis(shape: torch.Size) -> int:
    """The axis NorMuon averages over: the shorter side's, so there is one statistic per index of the longer."""
    return -1 if shape[-2] >= shape[-1] else -2


def normalize_neurons(update: torch.Tensor, second_moment: torch.Tensor, beta2: float = NEURON_BETA2,
                      eps: float = 1e-10) -> torch.Tensor:
    """NorMuon's step after the orthogonalisation (Li et al. 2025, arXiv 2510.05491): divide each neuron's slice of
    the update by the root of a running mean of its squares, then rescale to the update's own Frobenius norm.

    update: an orthogonalised (rows, cols) update. second_moment: this matrix's running mean square per index of
    the longer side, (rows, 1) if rows >= cols else (1, cols), updated in place. An orthogonalised update has
    (nearly) equal singular values, but its rows need not have equal norms, so some neurons get much larger
    steps than others; this evens them out over time. The norm is kept, so the learning rate means what it
    meant for Muon.
    """
    second_moment.lerp_(update.square().mean(dim=_neuron_axis(update.shape), keepdim=True), 1 - beta2)
    scaled = update / (second_moment.sqrt() + eps)
    return scaled.mul_(update.norm() / scaled.norm().clamp(min=eps))


def muon_lr_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's per-matrix learning-rate factor (keeps update RMS comparable across shapes)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls beat fp32 on `device` (decides the Newton-Schulz precision)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


class Muon(torch.optim.Muon):
    """torch.optim.Muon with a choice of Newton-Schulz precision (`ns_dtype`), and optionally NorMuon.

    ns_dtype=torch.bfloat16 is torch's own step; torch.float32 is the same update computed in fp32.
    normuon=True evens out the neurons' step sizes after the orthogonalisation (`normalize_neurons`), keeping a
    `second_moment` tensor per matrix in the optimizer state beside torch's `momentum_buffer`.
    """

    def __init__(self, params, *args, ns_dtype: torch.dtype = torch.bfloat16, normuon: bool = False, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype
        self.normuon = normuon

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16 and not self.normuon:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)  # torch's: creates momentum buffers lazily
            lr, momentum, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
            # Matrices of one shape (e.g. every layer's qkv) are orthogonalised together, as one stack: at
            # this model's sizes the iteration is many small products, and batching them saves dispatches.
            by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                by_shape.setdefault(tuple(p.shape), []).append((p, update))
            for shape, pairs in by_shape.items():
                updates = [u for _, u in pairs]
                stacked = updates[0] if len(updates) == 1 else torch.stack(updates)
                ortho = newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      self.ns_dtype)
                ortho = [ortho] if len(updates) == 1 else ortho.unbind(0)
                scale = muon_lr_scale(torch.Size(shape), group["adjust_lr_fn"])
                for (p, _), update in zip(pairs, ortho):
                    if self.normuon:
                        state = self.state[p]
                        update = update.float()  # the running statistics stay fp32 whatever ns_dtype is
                        if "second_moment" not in state:  # a new run, or one resumed from a save without NorMuon
                            shape = list(update.shape)
                            shape[_neuron_axis(update.shape)] = 1
                            state["second_moment"] = update.new_zeros(shape)
                        update = normalize_neurons(update, state["second_moment"])
                    p.mul_(1 - lr * wd)
                    p.add_(update.to(p.dtype), alpha=-lr * scale)
        return loss


def split_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(muon, adamw) lists of (name, parameter) for a plain (unwrapped) ByteLM.

    Muon gets the attention and MLP weight matrices of every block; AdamW gets the embedding (and so the
    tied head), the untied head if any, and the norm gains. named_parameters() lists a tied Parameter once.
    """
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _MUON_NAME.match(name):
            assert p.ndim == 2, f"{name} is a hidden matrix by name but has shape {tuple(p.shape)}"
            muon.append((name, p))
        else:
            adamw.append((name, p))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    muon_ids, adamw_ids = {id(p) for _, p in muon}, {id(p) for _, p in adamw}
    assert not muon_ids & adamw_ids, "a parameter is in both optimizer groups"
    assert muon_ids | adamw_ids == trainable, "a parameter is in no optimizer group"
    assert len(muon) + len(adamw) == len(trainable), "a parameter is listed twice"
    assert muon, "no hidden matrices found for Muon: did the model's parameter names change?"
    return muon, adamw


def build_optimizers(model: nn.Module, *, muon_lr: float, adam_lr: float, muon_weight_decay: float = 0.1,
                     adam_weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.9, 0.95),
                     momentum: float = MOMENTUM, ns_dtype: torch.dtype | None = None,
                     normuon: bool = True) -> list[torch.optim.Optimizer]:
    """[Muon over the hidden matrices, AdamW over the rest]. ns_dtype None: bf16 where it is fast, else fp32.
    normuon: Muon with NorMuon's per-neuron normalisation (`normalize_neurons`), as training uses by default."""
    muon_params, adamw_params = split_params(model)
    if ns_dtype is None:
        device = next(model.parameters()).device
        ns_dtype = torch.bfloat16 if bf16_is_fast(device) else torch.float32
    muon = Muon([p for _, p in muon_params], lr=muon_lr, momentum=momentum, nesterov=True,
                weight_decay=muon_weight_decay, ns_dtype=ns_dtype, normuon=normuon)
    adamw = torch.optim.AdamW([p for _, p in adamw_params], lr=adam_lr, betas=adam_betas,
                              weight_decay=adam_weight_decay, eps=1e-8)
    return [muon, adamw]

"""A ByteLM's weights folded for decoding, built once and read by every decode step.

    w = FoldedWeights(model)                 # copies; rebuild it if the model's weights change
    x = w.embed[byte]                        # (C,)
    h = w.norm(x)                            # RMSNorm without its gain: the gain is inside w.w_qkv[i] / w.w_fc[i]
    qkv = w.w_qkv[i] @ h                     # (3C,)
    half = w.half_matrices()                 # fp16 copies of the five matrices, or None where they do not fit

The same arithmetic as ByteLM.forward, in fewer operations, because what can be computed once is:
  * each RMSNorm's gain is folded into the matrix that follows the norm (W @ (g * x) = (W * g) @ x), so a
    norm inside a step is x * rsqrt(mean(x^2) + eps) with no multiply by the gain (norm_f into the head);
  * the attention scale 1/sqrt(D) is folded into the queries' rotary tables;
  * rotary is x * cos + roll(x, D/2) * sin, with the signs in the sin table: two ops instead of six.

Readers: the lean torch step and the C step (bytelm/infer/step.py FastDecoder, which passes these tensors'
addresses to bytelm/infer/csrc/decode_step.c) and the batched step (bytelm/infer/batch_step.py BatchStep).
Every tensor is a copy, on the model's device and in its dtype; the matrices are stacked over layers so the C
step takes one pointer per kind.
"""
from __future__ import annotations

import math

import torch

from bytelm.config import ModelConfig
from bytelm.model import ByteLM, weight_count

HALF_MAX = 60000  # fp16's largest finite value is 65504; a matrix with a weight above this stays fp32


class FoldedWeights:
    """Folded copies of a ByteLM's weights. Attributes (L layers, C width, F = mlp_ratio * C, V = 256 bytes,
    T = block_size, H heads of D = C / H):

        embed (V, C)          value_embed (V, L, C) or None (ModelConfig.value_embeds: added to each layer's values)
        w_qkv (L, 3C, C)      norm1's gain folded in; rows: queries, keys, values
        w_proj (L, C, C)      attention output projection
        w_fc (L, F, C)        norm2's gain folded in
        w_out (L, C, F)       MLP output projection
        head (V, C)           norm_f's gain folded in (a copy even where the embedding is tied)
        cos, sin (T, 2, 1, D) rotary rows for (queries, keys) at each position; the query row carries 1/sqrt(D)
        eps, qk_eps           the RMSNorms' epsilon; the QK-norm's (the dtype's machine epsilon, as F.rms_norm)
    """

    def __init__(self, model: ByteLM):
        cfg = self.config = model.config
        self.n_layer, self.n_head, self.head_dim = cfg.n_layer, cfg.n_head, cfg.head_dim
        self.n_embd, self.hidden, self.block_size = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, cfg.block_size
        self.eps = cfg.norm_eps
        p = model.embed.weight
        self.qk_eps = torch.finfo(p.dtype).eps  # F.rms_norm without eps (the QK-norm) uses the dtype's epsilon
        with torch.no_grad():
            self.embed = p.detach().clone()
            ve = model.value_embed
            self.value_embed = (ve.weight.detach().view(cfg.vocab_size, cfg.n_layer, cfg.n_embd).clone()
                                if ve is not None else None)
            blocks = model.blocks
            self.w_qkv = torch.stack([b.attn.qkv.weight * b.norm1.weight for b in blocks])
            self.w_proj = torch.stack([b.attn.proj.weight for b in blocks])
            self.w_fc = torch.stack([b.mlp.fc.weight * b.norm2.weight for b in blocks])
            self.w_out = torch.stack([b.mlp.proj.weight for b in blocks])
            self.head = (model.head.weight * model.norm_f.weight).contiguous()
            # x1' = x1 cos + x2 sin, x2' = x2 cos - x1 sin  ==  x * cos2 + roll(x) * sin2 with
            # cos2 = [cos, cos], sin2 = [sin, -sin] and roll(x) = [x2, x1].
            cos = model.rope_cos[:, 0, 0]  # (T, D/2)
            sin = model.rope_sin[:, 0, 0]
            cos2 = torch.cat((cos, cos), -1)  # (T, D)
            sin2 = torch.cat((sin, -sin), -1)
            scale = torch.tensor([1.0 / math.sqrt(self.head_dim), 1.0], dtype=cos.dtype,
                                 device=cos.device).view(1, 2, 1, 1)
            self.cos = (cos2[:, None, None, :] * scale).contiguous()
            self.sin = (sin2[:, None, None, :] * scale).contiguous()

    def matrices(self) -> list[torch.Tensor]:
        """[w_qkv, w_proj, w_fc, w_out, head]: what a step reads most (its memory bound), in the C step's order."""
        return [self.w_qkv, self.w_proj, self.w_fc, self.w_out, self.head]

    def half_matrices(self) -> list[torch.Tensor] | None:
        """fp16 copies of matrices() (round to nearest even, as F16C converts back), halving what a step reads;
        None where a weight is beyond fp16's range. Built on each call: keep the result while it is used."""
        matrices = self.matrices()
        if not all(_largest_magnitude(m) < HALF_MAX for m in matrices):
            return None
        return [m.half() for m in matrices]

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dimension without its gain (folded into the next matrix): (..., C) -> (..., C)."""
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(self.eps))

    @staticmethod
    def memory(config: ModelConfig) -> list[tuple[str, int]]:
        """What FoldedWeights(ByteLM(config)) and a C step's fp16 copies allocate, in bytes, as (what, bytes)
        for bytelm.memory's gate: the weights (fp32, plus fp16 copies of the matrices) and the rotary tables:
        two (T, 2, 1, D) fp32 tables and the two (T, D) temporaries they are built from."""
        weights = (weight_count(config) + config.vocab_size * config.n_embd) * 4  # the head is copied even if tied
        return [(f"the decode step's copy of the weights (n_layer {config.n_layer} x n_embd {config.n_embd})",
                 weights * 3 // 2),
                (f"the decode step's rotary tables (block_size {config.block_size} x head_dim {config.head_dim})",
                 6 * config.block_size * config.head_dim * 4)]


def _largest_magnitude(t: torch.Tensor) -> float:
    """max |t| in one pass without a temporary (t.abs() would allocate, and page-fault, a copy of t)."""
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))

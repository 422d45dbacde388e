"""The batched one-byte step: B independent sequences each advance by one byte, all at the same position.

    step = BatchStep(model, batch=64)
    logits = step(torch.zeros(64, dtype=torch.long))     # (64, 256): what follows byte 0 in every row
    logits = step(next_bytes)                             # and so on, up to the model's context

The same arithmetic as ByteLM.forward(idx (B, 1), cache) (tests/test_compress.py checks the logits agree to
float rounding), written for one job: compress and decompress must compute bit-identical probabilities on
both sides, whatever torch's thread count. ByteLM's cached path attends with scaled_dot_product_attention,
whose CPU kernel gives results that differ in the last bit between 1 and 2 threads; here attention is two
batched matrix products and a softmax, and every other op is a row-wise reduction or a matrix product
(thread-invariant in torch's CPU kernels; tests/test_compress.py checks 1 against 2 threads). The weights are
the folded copies every decode step reads (bytelm/infer/weights.py: RMSNorm gains inside the matrices, the
attention scale in the rotary table), which also makes each step fewer operations.
"""
from __future__ import annotations

import torch

from bytelm.device import require_memory
from bytelm.infer.weights import FoldedWeights
from bytelm.model import ByteLM, cache_memory


class BatchStep:
    """Folded weights and a KV cache for `batch` rows. Call it with one byte per row; reset() to start over.

    Keys and values: (L, B, H, context, D), fp32, preallocated once.
    """

    def __init__(self, model: ByteLM, batch: int):
        cfg = model.config
        require_memory([cache_memory(cfg, batch, cfg.block_size), *FoldedWeights.memory(cfg)],
                       model.embed.weight.device)
        w = self.weights = FoldedWeights(model)
        self.batch, self.context = batch, cfg.block_size
        self.layers = list(zip(w.w_qkv, w.w_proj, w.w_fc, w.w_out))
        shape = (cfg.n_layer, batch, cfg.n_head, cfg.block_size, cfg.head_dim)
        self.k = torch.zeros(shape, device=w.embed.device)
        self.v = torch.zeros(shape, device=w.embed.device)
        self.pos = 0

    @staticmethod
    def cache_bytes(model: ByteLM, batch: int) -> int:
        """Memory the keys and values of `batch` rows take."""
        return cache_memory(model.config, batch, model.config.block_size)[1]

    def reset(self) -> None:
        self.pos = 0

    @torch.inference_mode()
    def __call__(self, byte: torch.Tensor) -> torch.Tensor:
        """byte: (B,) int64, each row's next byte. Returns logits (B, 256) fp32 for the byte after it."""
        pos = self.pos
        if pos >= self.context:
            raise ValueError(f"BatchStep is full: {self.context} bytes, the model's context")
        w, B, H, D = self.weights, self.batch, self.weights.n_head, self.weights.head_dim
        end = pos + 1
        x = w.embed[byte]  # (B, C)
        for i, (w_qkv, w_proj, w_fc, w_out) in enumerate(self.layers):
            qkv = (w.norm(x) @ w_qkv.t()).view(B, 3, H, D)
            qk = qkv[:, :2]  # (B, 2, H, D)
            qk = qk * torch.rsqrt(qk.square().mean(-1, keepdim=True).add_(w.qk_eps))  # QK-norm
            qk = torch.addcmul(qk * w.cos[pos], qk.roll(D // 2, -1), w.sin[pos])  # rotary; q scaled
            v = qkv[:, 2] if w.value_embed is None else qkv[:, 2] + w.value_embed[byte, i].view(B, H, D)
            self.k[i, :, :, pos] = qk[:, 1]
            self.v[i, :, :, pos] = v
            # (B, H, 1, D) @ (B, H, D, end): the scores come out with positions last, so the softmax runs
            # over contiguous memory; reading the cache once per step is what bounds the step (memory).
            scores = qk[:, 0].unsqueeze(2) @ self.k[i, :, :, :end].transpose(2, 3)  # (B, H, 1, end)
            y = scores.softmax(-1) @ self.v[i, :, :, :end]  # (B, H, 1, D)
            x = torch.addmm(x, y.view(B, H * D), w_proj.t())
            x = torch.addmm(x, (w.norm(x) @ w_fc.t()).relu_().square_(), w_out.t())  # ReLU^2 MLP
        self.pos = end
        return w.norm(x) @ w.head.t()  # (B, V)

"""The one-byte decode step, lean: the same arithmetic as ByteLM.forward(idx (1, 1), cache), in fewer tensor ops.

At batch 1 a step is a few hundred small operations whose cost is mostly the ~2-5 us each one takes to
dispatch, not arithmetic (docs/generation.md has the profile). So this module precomputes what it can once,
when the decoder is built, and runs each step on flat vectors:

  * the RMSNorm weights are folded into the matrix that follows each norm (W @ (w * x) = (W * w) @ x);
  * the attention scale 1/sqrt(D) is folded into the queries' rotary tables;
  * rotary is x * cos + roll(x, D/2) * sin, with the signs in the sin table: two ops instead of six;
  * attention of one query over the cache is two batched matrix products and a softmax (no mask needed);
  * residual projections are one fused multiply-add (addmv) each.

ByteLM.forward stays the reference; tests/test_decode.py checks that the logits agree to float rounding
and the generator uses this step only for batch-1 single-byte steps on a real ByteLM.
"""
from __future__ import annotations

import ctypes
import math

import torch

from bytelm.config import ModelConfig
from bytelm.model import ByteLM, KVCache, weight_count
from bytelm.infer.native import DecodeRow, DecodeStep, library as native_library


def _largest_magnitude(t: torch.Tensor) -> float:
    """max |t| in one pass without a temporary (t.abs() would allocate, and page-fault, a copy of t)."""
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


class FastDecoder:
    """Precomputed weights of a ByteLM for one-byte steps. Rebuild it if the model's weights change.

    step(byte, cache) -> logits (256,): feeds one byte at position cache.pos, writes its keys and values
    into `cache` (the same KVCache ByteLM.forward fills, so prefill can use the reference path) and
    advances cache.pos, exactly as ByteLM.forward(byte.view(1, 1), cache, last_only=True) would.
    """

    def __init__(self, model: ByteLM, native: bool = True, half: bool = False):
        cfg = model.config
        self.n_head, self.head_dim, self.block_size = cfg.n_head, cfg.head_dim, cfg.block_size
        self.eps = cfg.norm_eps  # the RMSNorm modules' epsilon
        # F.rms_norm without eps (the QK-norm in CausalSelfAttention) uses the dtype's machine epsilon.
        p = model.embed.weight
        self.qk_eps = torch.finfo(p.dtype).eps
        with torch.no_grad():
            self.embed = p.detach().clone()  # (V, C)
            # Value embeddings (ModelConfig.value_embeds), (V, L, C): each layer's row is added to its values.
            ve = model.value_embed
            self.value_embed = (ve.weight.detach().view(cfg.vocab_size, cfg.n_layer, cfg.n_embd).clone()
                                if ve is not None else None)  # a copy, like every other weight here
            blocks = model.blocks
            # Stacked over layers, so the C step takes one pointer per kind: (L, rows, cols) each.
            self.w_qkv = torch.stack([b.attn.qkv.weight * b.norm1.weight for b in blocks])  # (L, 3C, C)
            self.w_proj = torch.stack([b.attn.proj.weight for b in blocks])  # (L, C, C)
            self.w_fc = torch.stack([b.mlp.fc.weight * b.norm2.weight for b in blocks])  # (L, F, C)
            self.w_out = torch.stack([b.mlp.proj.weight for b in blocks])  # (L, C, F)
            self.head = (model.head.weight * model.norm_f.weight).contiguous()  # (V, C), norm_f folded in
            # Rotary for queries and keys together: rows (2, 1, D) per position; the query row carries the
            # attention scale. x1' = x1 cos + x2 sin, x2' = x2 cos - x1 sin  ==  x * cos2 + roll(x) * sin2
            # with cos2 = [cos, cos], sin2 = [sin, -sin] and roll(x) = [x2, x1].
            cos = model.rope_cos[:, 0, 0]  # (T, D/2)
            sin = model.rope_sin[:, 0, 0]
            cos2 = torch.cat((cos, cos), -1)  # (T, D)
            sin2 = torch.cat((sin, -sin), -1)
            scale = torch.tensor([1.0 / math.sqrt(self.head_dim), 1.0], dtype=cos.dtype,
                                 device=cos.device).view(1, 2, 1, 1)
            self.cos = (cos2[:, None, None, :] * scale).contiguous()  # (T, 2, 1, D)
            self.sin = (sin2[:, None, None, :] * scale).contiguous()
        self.n_layer, self.n_embd, self.hidden = cfg.n_layer, cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
        # The C step (bytelm/infer/native.py) where it applies: fp32 weights on the CPU and a compiler present.
        self._kernel = None
        self.half = False
        if native and p.device.type == "cpu" and p.dtype == torch.float32:
            lib = native_library()
            if lib is not None:
                self._kernel = lib.bytelm_decode_step
                self._rows_kernel, self._max_rows = lib.bytelm_decode_rows, lib.bytelm_decode_max_rows()
                self._batch = None  # step_rows' buffers, grown to the largest batch seen
                self._scratch = torch.empty(5 * cfg.n_embd + max(self.hidden, cfg.block_size))
                self._logits = torch.empty(cfg.vocab_size)
                matrices = [self.w_qkv, self.w_proj, self.w_fc, self.w_out, self.head]
                # Half-precision copies of the matrices halve what each step reads (the step's bound); only
                # where the build converts them in hardware (F16C) and every weight fits fp16's range.
                if half and lib.bytelm_half_supported() and all(_largest_magnitude(m) < 60000 for m in matrices):
                    matrices = [m.half() for m in matrices]  # round to nearest even, as F16C converts back
                    self.half = True
                self._matrices = matrices  # kept alive: the kernel reads them by address
                # The C step's arguments, filled once; each step sets the cache and passes the position and byte.
                args = self._args = DecodeStep(
                    n_layer=self.n_layer, C=self.n_embd, H=self.n_head, F=self.hidden, V=cfg.vocab_size,
                    rope_len=self.cos.size(0), half=int(self.half), eps=self.eps, qk_eps=self.qk_eps)
                args.set_buffers(embed=self.embed, **dict(zip(("w_qkv", "w_proj", "w_fc", "w_out", "head"), matrices)),
                                 rope_cos=self.cos, rope_sin=self.sin, value_embed=self.value_embed,
                                 scratch=self._scratch, logits=self._logits)
                self._args_ref = ctypes.byref(args)

    @property
    def native(self) -> bool:
        """True when steps run in the C kernel, False when they run as torch operations."""
        return self._kernel is not None

    def step(self, byte: torch.Tensor | int, cache: KVCache, copy: bool = True) -> torch.Tensor:
        """byte: an int, or a 0-dim or 1-element int64 tensor. Returns logits (256,) in the weights' dtype.
        copy=False may return a buffer the next step overwrites (the generator reads it at once)."""
        byte, pos = self._check(byte, cache), cache.pos
        if self._kernel is not None and all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
                                            for t in (cache.k, cache.v)):
            return self._step_native(byte, cache, copy)
        H, D = self.n_head, self.head_dim
        end = pos + 1
        cos, sin = self.cos[pos], self.sin[pos]  # (2, 1, D)
        x = self.embed[byte]  # (C,)
        for i, (w_qkv, w_proj, w_fc, w_out) in enumerate(zip(self.w_qkv, self.w_proj, self.w_fc, self.w_out)):
            h = x * torch.rsqrt(x.square().mean().add_(self.eps))  # RMSNorm without its weight (folded)
            qkv = torch.mv(w_qkv, h).view(3, H, D)
            qk = qkv[:2]  # (2, H, D)
            qk = qk * torch.rsqrt(qk.square().mean(-1, keepdim=True).add_(self.qk_eps))  # QK-norm
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)  # rotary; q also scaled by 1/sqrt(D)
            k_layer, v_layer = cache.k[i, 0], cache.v[i, 0]  # (H, max_len, D)
            k_layer[:, pos] = qk[1]
            v_layer[:, pos] = qkv[2] if self.value_embed is None else qkv[2] + self.value_embed[byte, i].view(H, D)
            att = torch.bmm(k_layer[:, :end], qk[0].unsqueeze(-1)).softmax(1)  # (H, end, 1)
            y = torch.bmm(att.transpose(1, 2), v_layer[:, :end])  # (H, 1, D)
            x = torch.addmv(x, w_proj, y.view(-1))
            h = x * torch.rsqrt(x.square().mean().add_(self.eps))
            x = torch.addmv(x, w_out, torch.mv(w_fc, h).relu_().square_())  # ReLU^2 MLP
        cache.pos = end
        h = x * torch.rsqrt(x.square().mean().add_(self.eps))
        return torch.mv(self.head, h)  # (V,)

    def _check(self, byte: int, cache: KVCache) -> int:
        """The byte as an int, if it and the cache's position fit (checked here too: ctypes would wrap a huge
        int silently)."""
        pos = cache.pos
        if not 0 <= pos < min(self.block_size, cache.k.size(3)) or cache.k.size(1) != 1:
            raise ValueError(f"FastDecoder.step needs a batch-1 cache with room (pos {pos}, "
                             f"context {self.block_size}, cache {cache.k.size(3)})")
        byte = int(byte)
        if not 0 <= byte < self.embed.size(0):
            raise ValueError(f"FastDecoder.step: byte {byte} is outside 0..{self.embed.size(0) - 1}")
        return byte

    def step_rows(self, bytes_: list[int], caches: list[KVCache]) -> torch.Tensor:
        """One step for each of several sequences at once: feeds bytes_[i] into caches[i] at its own position
        and advances it. Returns logits (n, V), a buffer the next step overwrites; row i is bitwise what
        step(bytes_[i], caches[i]) returns. The C step reads each weight once for all rows (see
        bytelm/infer/csrc/matvec.h); without it, the rows are stepped one by one. A refused call (ValueError) advances
        no cache: what it wrote lies past each cache's position, where the next step writes again."""
        if len(bytes_) != len(caches) or not caches:
            raise ValueError(f"FastDecoder.step_rows needs one byte per cache ({len(bytes_)} bytes, "
                             f"{len(caches)} caches, at least 1)")
        checked = [self._check(b, c) for b, c in zip(bytes_, caches)]
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("FastDecoder.step_rows: the same cache twice (each row needs its own)")
        if self._kernel is None or not all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
                                           for c in caches for t in (c.k, c.v)):
            return torch.stack([self.step(b, c) for b, c in zip(checked, caches)])
        if len(caches) == 1:  # the same kernel either way; the single step's arguments are already filled
            return self._step_native(checked[0], caches[0], copy=False).view(1, -1)
        rows, scratch, logits = self._batch_buffers(len(caches), max(c.k.size(3) for c in caches))
        args, V = self._args, logits.size(1)
        single_scratch = args.scratch, args.scratch_size
        args.scratch, args.scratch_size = scratch.data_ptr(), scratch.numel()
        try:
            for start in range(0, len(caches), self._max_rows):  # the C step takes at most _max_rows at once
                chunk = caches[start:start + self._max_rows]
                for i, cache in enumerate(chunk):
                    r = rows[i]
                    r.byte, r.pos, r.max_len = checked[start + i], cache.pos, cache.k.size(3)
                    r.k_cache, r.k_cache_size = cache.k.data_ptr(), cache.k.numel()
                    r.v_cache, r.v_cache_size = cache.v.data_ptr(), cache.v.numel()
                    r.logits, r.logits_size = logits.data_ptr() + (start + i) * V * 4, V  # row start + i, fp32
                if self._rows_kernel(self._args_ref, rows, len(chunk)):
                    raise ValueError(f"the C decode step refused a batch of {len(chunk)} rows: "
                                     f"{args.error.decode(errors='replace')}")
        finally:
            args.scratch, args.scratch_size = single_scratch
        for cache in caches:  # only now: a refused chunk leaves every cache where it was
            cache.pos += 1
        return logits[:len(caches)]

    def _batch_buffers(self, n: int, max_len: int):
        """DecodeRow array, scratch and logits (n, V) for step_rows, kept and grown as batches grow. Each row's
        scratch is the single step's, rounded up to 64 bytes (see bytelm_decode_rows)."""
        stride = -(-(5 * self.n_embd + max(self.hidden, max_len)) // 16) * 16
        rows_cap = min(n, self._max_rows)
        floats = rows_cap * stride
        have = self._batch
        if have is None or len(have[0]) < rows_cap or have[1].numel() < floats or have[2].size(0) < n:
            have = self._batch = ((DecodeRow * rows_cap)(), torch.empty(floats, dtype=torch.float32),
                                  torch.empty(n, self.embed.size(0), dtype=torch.float32))
        return have

    def _step_native(self, byte: int, cache: KVCache, copy: bool) -> torch.Tensor:
        args = self._args
        args.max_len = cache.k.size(3)
        args.set_buffers(k_cache=cache.k, v_cache=cache.v)  # the C step checks their sizes against the model's
        if self._kernel(self._args_ref, cache.pos, byte):
            raise ValueError(f"the C decode step refused position {cache.pos}, byte {byte}: "
                             f"{args.error.decode(errors='replace')}")
        cache.pos += 1
        return self._logits.clone() if copy else self._logits  # the buffer is reused by the next step


def decoder_memory(config: ModelConfig) -> list[tuple[str, int]]:
    """What FastDecoder(ByteLM(config)) allocates, in bytes, for device.require_memory: copies of the weights
    (fp32, plus fp16 copies of the matrices for the default C step) and its rotary tables: two (T, 2, 1, D) fp32
    tables and the two (T, D) temporaries they are built from."""
    weights = (weight_count(config) + config.vocab_size * config.n_embd) * 4  # the head is copied even if tied
    return [(f"the decode step's copy of the weights (n_layer {config.n_layer} x n_embd {config.n_embd})",
             weights * 3 // 2),
            (f"the decode step's rotary tables (block_size {config.block_size} x head_dim {config.head_dim})",
             6 * config.block_size * config.head_dim * 4)]

"""The one-byte decode step: FastDecoder, the same arithmetic as ByteLM.forward(idx (1, 1), cache), fewer ops.

    dec = FastDecoder(model)                 # native=True: the C step where it builds; half=True: fp16 matrices
    logits = dec.step(byte, cache)           # (256,), feeds `byte` at cache.pos and advances it
    logits = dec.step_rows(bytes_, caches)   # (n, 256), one step for n sequences, each in its own cache

At batch 1 a step is a few hundred small operations whose cost is mostly dispatch, not arithmetic
(docs/generation.md has the profile). So the step runs on weights folded once (bytelm/infer/weights.py:
RMSNorm gains inside the matrices, the attention scale in the rotary table) and, in two ways:
  * the C step (bytelm/infer/csrc/decode_step.c through bytelm/infer/native.py): the default where the library
    builds and the weights are fp32 on the CPU; with half=True it reads fp16 copies of the matrices (half the
    memory traffic; logits within ~1e-3 of fp32). step_rows reads each weight once for all rows (the serving
    engine's batched step);
  * the lean torch step, otherwise: attention of one query over the cache as two batched matrix products and a
    softmax (no mask), each residual projection one fused multiply-add (addmv).

ByteLM.forward stays the reference: tests/test_decode.py checks that the logits agree to float rounding, and
tests/test_golden.py that every step reproduces the pinned bytes. The per-row decode state
(bytelm/infer/row.py) chooses which step a generation uses.
"""
from __future__ import annotations

import ctypes

import torch

from bytelm.model import ByteLM, KVCache
from bytelm.infer.native import DecodeRow, DecodeStep, library as native_library
from bytelm.infer.weights import FoldedWeights


class FastDecoder:
    """One-byte steps over a ByteLM's folded weights (bytelm/infer/weights.py). Rebuild it if the model's
    weights change.

    step(byte, cache) -> logits (256,): feeds one byte at position cache.pos, writes its keys and values
    into `cache` (the same KVCache ByteLM.forward fills, so prefill can use the reference path) and
    advances cache.pos, exactly as ByteLM.forward(byte.view(1, 1), cache, last_only=True) would.
    """

    def __init__(self, model: ByteLM, native: bool = True, half: bool = False):
        w = self.weights = FoldedWeights(model)
        cfg = model.config
        self.n_head, self.head_dim, self.block_size = w.n_head, w.head_dim, w.block_size
        # The C step (bytelm/infer/native.py) where it applies: fp32 weights on the CPU and a compiler present.
        self._kernel = None
        self.half = False
        if native and w.embed.device.type == "cpu" and w.embed.dtype == torch.float32:
            lib = native_library()
            if lib is not None:
                self._kernel = lib.bytelm_decode_step
                self._rows_kernel, self._max_rows = lib.bytelm_decode_rows, lib.bytelm_decode_max_rows()
                self._batch = None  # step_rows' buffers, grown to the largest batch seen
                self._scratch = torch.empty(5 * w.n_embd + max(w.hidden, w.block_size))
                self._logits = torch.empty(cfg.vocab_size)
                # Half-precision copies halve what each step reads (the step's bound); only where the build
                # converts them in hardware (F16C) and every weight fits fp16's range.
                matrices = (w.half_matrices() if half and lib.bytelm_half_supported() else None) or w.matrices()
                self.half = matrices[0].dtype == torch.float16
                self._matrices = matrices  # kept alive: the kernel reads them by address
                # The C step's arguments, filled once; each step sets the cache and passes the position and byte.
                args = self._args = DecodeStep(
                    n_layer=w.n_layer, C=w.n_embd, H=w.n_head, F=w.hidden, V=cfg.vocab_size,
                    rope_len=w.cos.size(0), half=int(self.half), eps=w.eps, qk_eps=w.qk_eps)
                args.set_buffers(embed=w.embed, **dict(zip(("w_qkv", "w_proj", "w_fc", "w_out", "head"), matrices)),
                                 rope_cos=w.cos, rope_sin=w.sin, value_embed=w.value_embed,
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
        w, H, D = self.weights, self.n_head, self.head_dim
        end = pos + 1
        cos, sin = w.cos[pos], w.sin[pos]  # (2, 1, D)
        x = w.embed[byte]  # (C,)
        for i, (w_qkv, w_proj, w_fc, w_out) in enumerate(zip(w.w_qkv, w.w_proj, w.w_fc, w.w_out)):
            qkv = torch.mv(w_qkv, w.norm(x)).view(3, H, D)
            qk = qkv[:2]  # (2, H, D)
            qk = qk * torch.rsqrt(qk.square().mean(-1, keepdim=True).add_(w.qk_eps))  # QK-norm
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)  # rotary; q also scaled by 1/sqrt(D)
            k_layer, v_layer = cache.k[i, 0], cache.v[i, 0]  # (H, max_len, D)
            k_layer[:, pos] = qk[1]
            v_layer[:, pos] = qkv[2] if w.value_embed is None else qkv[2] + w.value_embed[byte, i].view(H, D)
            att = torch.bmm(k_layer[:, :end], qk[0].unsqueeze(-1)).softmax(1)  # (H, end, 1)
            y = torch.bmm(att.transpose(1, 2), v_layer[:, :end])  # (H, 1, D)
            x = torch.addmv(x, w_proj, y.view(-1))
            x = torch.addmv(x, w_out, torch.mv(w_fc, w.norm(x)).relu_().square_())  # ReLU^2 MLP
        cache.pos = end
        return torch.mv(w.head, w.norm(x))  # (V,)

    def _check(self, byte: int, cache: KVCache) -> int:
        """The byte as an int, if it and the cache's position fit (checked here too: ctypes would wrap a huge
        int silently)."""
        pos = cache.pos
        if not 0 <= pos < min(self.block_size, cache.k.size(3)) or cache.k.size(1) != 1:
            raise ValueError(f"FastDecoder.step needs a batch-1 cache with room (pos {pos}, "
                             f"context {self.block_size}, cache {cache.k.size(3)})")
        byte = int(byte)
        if not 0 <= byte < self.weights.embed.size(0):
            raise ValueError(f"FastDecoder.step: byte {byte} is outside 0..{self.weights.embed.size(0) - 1}")
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
        w = self.weights
        stride = -(-(5 * w.n_embd + max(w.hidden, max_len)) // 16) * 16
        rows_cap = min(n, self._max_rows)
        floats = rows_cap * stride
        have = self._batch
        if have is None or len(have[0]) < rows_cap or have[1].numel() < floats or have[2].size(0) < n:
            have = self._batch = ((DecodeRow * rows_cap)(), torch.empty(floats, dtype=torch.float32),
                                  torch.empty(n, w.embed.size(0), dtype=torch.float32))
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


"""Sampling: pure functions from next-byte logits to the next byte, with HuggingFace `generate()` semantics.

    from bytelm.infer.sampling import SamplingSettings, sample_next
    g = torch.Generator().manual_seed(0)
    byte = sample_next(logits, SamplingSettings(temperature=0.8, top_k=50), recent_bytes, g)

Every function takes logits of shape (V,) or (B, V) (V = 256) and returns a new tensor; nothing is modified in
place and nothing depends on hidden state, so each step can be tested alone. The order is HuggingFace's:
repetition penalty, temperature, top-k, top-p, min-p, then one draw from the explicit `torch.Generator`
(one uniform per byte, inverse CDF: see draw; `CSampler` does the same in C for the generator's fast path).
Temperature 0 means greedy (argmax after the repetition penalty, as HF applies processors before greedy).
Filtered-out bytes get -inf, so they can never be drawn. Scores that are NaN or infinite are a BytelmError
(require_finite), on both samplers.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from bytelm.errors import BytelmError

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingSettings:
    """The knobs sample_next reads. `bytelm.infer.generation.InferenceConfig` has the same fields (validated)."""
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely bytes; 0 or >= 256 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1.0 = off
    min_p: float = 0.0  # drop bytes less likely than min_p x the most likely one; 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL penalty on the recent bytes; 1.0 = off


def apply_repetition_penalty(logits: torch.Tensor, recent: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL / HuggingFace repetition penalty over `recent` bytes only (the caller picks the window).

    A byte that occurs in `recent` has its logit divided by `penalty` if positive, multiplied if negative,
    once however often it occurs (HF semantics). logits: (V,) or (B, V); recent: (N,) or (B, N) int64.
    Bytes outside `recent` keep their logits exactly.
    """
    if penalty == 1.0 or recent is None or recent.numel() == 0:
        return logits
    scores = logits.gather(-1, recent)  # (N,) or (B, N)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, recent, scores)  # duplicate indices write the same value


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by temperature (> 0). Temperature 0 (greedy) is handled by sample_next, not here."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 here; temperature 0 means greedy (see sample_next)")
    return logits if temperature == 1.0 else logits / temperature


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th are kept, as in HF); k <= 0 or k >= V is a no-op."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (1,) or (B, 1)
    return logits.masked_fill(logits < kth, _NEG_INF)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (HF TopPLogitsWarper): keep the most likely bytes until their total probability
    reaches p; the most likely byte is always kept. p >= 1 is a no-op (and skips the sort)."""
    if p >= 1.0:
        return logits
    # Ascending, as HF; stable, so tied bytes are cut in index order on every device (and as the C sampler does).
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False, stable=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1.0 - p)  # the low tail whose total mass is at most 1 - p
    remove_sorted[..., -1:] = False  # always keep the argmax
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """min-p (HF MinPLogitsWarper): drop bytes whose probability is below min_p x the top probability.
    min_p <= 0 is a no-op. The most likely byte always survives."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, _NEG_INF)


def filter_logits(logits: torch.Tensor, settings, recent: torch.Tensor | None = None) -> torch.Tensor:
    """All of the processing before the draw, in HF order. Temperature must be > 0 here."""
    logits = apply_repetition_penalty(logits, recent, settings.repetition_penalty)
    logits = apply_temperature(logits, settings.temperature)
    logits = filter_top_k(logits, settings.top_k)
    logits = filter_top_p(logits, settings.top_p)
    return filter_min_p(logits, settings.min_p)


def sample_next(logits: torch.Tensor, settings, recent: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the next byte. logits: (V,) or (B, V) float; settings: SamplingSettings or InferenceConfig;
    recent: the bytes the repetition penalty applies to, (N,) or (B, N) int64, or None.

    Returns int64 of shape () for (V,) logits, (B,) for (B, V). Temperature 0 is argmax (no draw, no RNG use).
    """
    logits = logits.float()  # sampling maths in fp32 even if the model ran in bf16
    require_finite(logits)
    if settings.temperature == 0:
        return apply_repetition_penalty(logits, recent, settings.repetition_penalty).argmax(dim=-1)
    probs = filter_logits(logits, settings, recent).softmax(dim=-1)
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, dtype=torch.float64, device=probs.device)
    return draw(probs, u).squeeze(-1)


def require_finite(logits: torch.Tensor) -> None:
    """Raise BytelmError if any score is NaN or infinite. Choosing from such scores is undefined (the draw below
    returned index V from NaN, an IndexError for its caller, where the C sampler returned byte 0), so both
    samplers refuse them alike (the C sampler checks each score as it copies them)."""
    if not bool(torch.isfinite(logits).all()):
        raise BytelmError("the model's next-byte scores are not finite numbers (its weights overflow float32 "
                          "arithmetic); generation stopped")


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row, the first byte whose cumulative probability exceeds u x the total.
    probs: (V,) or (B, V), non-negative; u: (1,) or (B, 1) float64 uniforms in [0, 1). Returns (1,) or (B, 1).

    One uniform per byte, drawn by the caller from its generator: the C sampler (bytelm/infer/csrc/sample.c) draws
    the same way from the same uniform, so a seed gives the same bytes on either path. A byte of probability 0
    is never chosen: the cumulative sum (in double, as torch sums float) rises at the chosen byte.
    """
    cum = probs.double().cumsum(-1)  # (..., V)
    total = cum[..., -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # u * total < total
    return torch.searchsorted(cum, target, right=True)


class CSampler:
    """sample_next for one row of fp32 CPU logits, in C (bytelm/infer/csrc/sample.c): the same filters and the same
    draw from the same generator, without ~20 torch dispatches per byte. Built by CSampler.create, which
    returns None where the C library is unavailable (callers then use sample_next).

        sampler = CSampler.create(settings)
        byte = sampler(logits, recent_address, n_recent, generator)   # recent: n_recent uint8 at that address
    """

    def __init__(self, fn, settings):
        self._fn = fn
        s = settings
        self.greedy = s.temperature == 0
        # The fixed arguments, converted to their C types once rather than per byte.
        self._args = (ctypes.c_float(s.repetition_penalty), ctypes.c_float(s.temperature), ctypes.c_int(s.top_k),
                      ctypes.c_double(s.top_p), ctypes.c_double(s.min_p))

    @classmethod
    def create(cls, settings) -> "CSampler | None":
        from bytelm.infer.native import library
        lib = library()
        return None if lib is None else cls(lib.bytelm_sample, settings)

    def __call__(self, logits: torch.Tensor, recent_address: int, n_recent: int,
                 generator: torch.Generator | None) -> int:
        """logits: (V,) contiguous float32 on the CPU. Draws one uniform from `generator` unless greedy, exactly
        as sample_next does, so the generator's state after each byte is the same on both paths.
        recent_address: n_recent bytes the caller owns. Raises ValueError for logits or settings the C code
        refuses."""
        if not (logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.is_contiguous()
                and 0 < logits.numel() <= 256 and 0 <= n_recent < 2 ** 31):
            raise ValueError("CSampler needs 1 to 256 contiguous float32 CPU logits and 0 <= n_recent < 2**31, got "
                             f"{tuple(logits.shape)} {logits.dtype} on {logits.device}, n_recent {n_recent}")
        u = 0.0 if self.greedy else torch.rand((1,), generator=generator, dtype=torch.float64).item()
        byte = self._fn(logits.data_ptr(), logits.numel(), recent_address, n_recent, *self._args, u)
        if byte == -5:  # non-finite scores: the same error as sample_next gives
            require_finite(logits)
        if byte < 0:
            from bytelm.infer.native import SAMPLE_ERRORS
            raise ValueError(f"the C sampler refused the call: {SAMPLE_ERRORS.get(byte, byte)}")
        return byte

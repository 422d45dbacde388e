"""Sampling filters on crafted logits: HF semantics for temperature, top-k, top-p, min-p and the windowed
repetition penalty; greedy at temperature 0; the same generator seed gives the same draws; the inverse-CDF
draw; the C sampler choosing the same bytes as sample_next."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bytelm.infer.sampling import (CSampler, SamplingSettings, apply_repetition_penalty, apply_temperature, draw,
                             filter_logits, filter_min_p, filter_top_k, filter_top_p, sample_next)

# Probabilities 0.5, 0.3, 0.15, 0.05 as logits: boundaries for top-p / min-p are easy to reason about.
PROBS = torch.tensor([0.3, 0.05, 0.5, 0.15])
LOGITS = PROBS.log()  # indices by probability: 2 > 0 > 3 > 1


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_temperature_zero_is_greedy_and_draws_nothing():
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    logits = torch.randn(256, generator=torch.Generator().manual_seed(1))
    out = sample_next(logits, SamplingSettings(temperature=0, top_k=5, top_p=0.5), None, g)
    assert out.item() == logits.argmax().item()
    assert torch.equal(g.get_state(), before)  # greedy does not consume randomness


def test_temperature_divides_logits_and_rejects_zero():
    torch.testing.assert_close(apply_temperature(LOGITS, 0.5), LOGITS / 0.5)
    assert apply_temperature(LOGITS, 1.0) is LOGITS
    with pytest.raises(ValueError):
        apply_temperature(LOGITS, 0.0)


def test_top_k_keeps_exactly_the_k_most_likely():
    assert kept(filter_top_k(LOGITS, 1)) == {2}
    assert kept(filter_top_k(LOGITS, 2)) == {2, 0}
    assert kept(filter_top_k(LOGITS, 3)) == {2, 0, 3}
    out = filter_top_k(LOGITS, 2)
    assert torch.equal(out[[2, 0]], LOGITS[[2, 0]])  # survivors unchanged


def test_top_k_keeps_ties_with_the_kth_and_full_k_is_a_no_op():
    tied = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0])
    assert kept(filter_top_k(tied, 2)) == {1, 2, 3}  # HF: `scores < kth` removes, ties survive
    logits = torch.randn(256)
    assert filter_top_k(logits, 256) is logits


@pytest.mark.parametrize("p, expected", [
    (0.45, {2}),          # 0.5 alone already reaches 0.45
    (0.6, {2, 0}),        # 0.5 + 0.3 = 0.8 >= 0.6
    (0.9, {2, 0, 3}),     # 0.95 >= 0.9; the 0.05 tail goes
    (0.99, {2, 0, 3, 1}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(filter_top_p(LOGITS, p)) == expected


def test_top_p_always_keeps_the_most_likely_byte_and_one_is_a_no_op():
    flat = torch.zeros(256)  # each byte has probability 1/256 < p
    assert len(kept(filter_top_p(flat, 0.001))) >= 1
    assert filter_top_p(LOGITS, 1.0) is LOGITS


@pytest.mark.parametrize("min_p, expected", [
    (0.05, {2, 0, 3, 1}),  # threshold 0.025: everything stays
    (0.2, {2, 0, 3}),      # threshold 0.1: the 0.05 byte goes
    (0.5, {2, 0}),         # threshold 0.25
    (0.9, {2}),            # threshold 0.45
])
def test_min_p_drops_bytes_below_a_fraction_of_the_top(min_p, expected):
    assert kept(filter_min_p(LOGITS, min_p)) == expected
    assert filter_min_p(LOGITS, 0.0) is LOGITS


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    recent = torch.tensor([0, 1, 1, 1])  # byte 1 three times: still penalised once (HF)
    out = apply_repetition_penalty(logits, recent, 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0, -1.0, 0.5]))
    assert torch.equal(logits, torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5]))  # pure: input untouched


def test_repetition_penalty_leaves_bytes_outside_its_window_alone():
    torch.manual_seed(0)
    logits = torch.randn(256)
    history = torch.tensor(list(b"abcdefgh xyz"))
    window = history[-3:]  # "xyz": the caller passes only the last N bytes (llama.cpp repeat_last_n)
    out = apply_repetition_penalty(logits, window, 1.5)
    changed = set(torch.nonzero(out != logits).flatten().tolist())
    assert changed == set(b"xyz")
    assert torch.equal(out[list(b"abcdefgh ")], logits[list(b"abcdefgh ")])


def test_repetition_penalty_of_one_or_empty_window_is_a_no_op():
    logits = torch.randn(256)
    assert apply_repetition_penalty(logits, torch.tensor([1, 2]), 1.0) is logits
    assert apply_repetition_penalty(logits, torch.tensor([], dtype=torch.long), 1.3) is logits
    assert apply_repetition_penalty(logits, None, 1.3) is logits


def test_filters_run_in_hf_order_penalty_then_temperature_then_top_k_top_p_min_p():
    torch.manual_seed(0)
    logits, recent = torch.randn(256) * 3, torch.tensor(list(b"etaoin "))
    s = SamplingSettings(temperature=0.7, top_k=40, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    expected = filter_min_p(filter_top_p(filter_top_k(apply_temperature(
        apply_repetition_penalty(logits, recent, 1.3), 0.7), 40), 0.8), 0.05)
    assert torch.equal(filter_logits(logits, s, recent), expected)


def test_greedy_applies_the_repetition_penalty_first():
    logits = torch.full((256,), -5.0)
    logits[ord("a")], logits[ord("b")] = 3.0, 2.0
    s = SamplingSettings(temperature=0, repetition_penalty=2.0)
    assert sample_next(logits, s, torch.tensor([ord("a")])).item() == ord("b")
    assert sample_next(logits, s, torch.tensor([ord("z")])).item() == ord("a")


def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.zeros(256)
    s = SamplingSettings(temperature=1.0)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_next(logits, s, None, g).item() for _ in range(32)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sampling_never_draws_a_filtered_byte():
    g = torch.Generator().manual_seed(0)
    s = SamplingSettings(temperature=1.0, top_k=3)
    logits = torch.arange(256, dtype=torch.float32) / 50  # top 3 are 253, 254, 255
    assert {sample_next(logits, s, None, g).item() for _ in range(200)} <= {253, 254, 255}


def test_batched_logits_give_one_byte_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 256)
    s = SamplingSettings(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    out = sample_next(logits, s, torch.randint(0, 256, (3, 16)), g)
    assert out.shape == (3,) and out.dtype == torch.int64
    greedy = sample_next(logits, SamplingSettings(temperature=0), None, g)
    assert torch.equal(greedy, logits.argmax(-1))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 256), p=st.floats(0.1, 1.0), min_p=st.floats(0.0, 1.0),
       temperature=st.floats(0.1, 2.0), penalty=st.floats(1.0, 2.0))
def test_any_settings_keep_the_top_byte_and_give_a_valid_distribution(seed, k, p, min_p, temperature, penalty):
    logits = torch.randn(256, generator=torch.Generator().manual_seed(seed)) * 4
    recent = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(seed + 1))
    s = SamplingSettings(temperature=temperature, top_k=k, top_p=p, min_p=min_p, repetition_penalty=penalty)
    out = filter_logits(logits, s, recent)
    top = apply_repetition_penalty(logits, recent, penalty).argmax().item()
    assert math.isfinite(out[top].item())  # the most likely byte always survives every filter
    assert 1 <= len(kept(out)) <= k or (k == 256)
    probs = out.softmax(-1)
    assert torch.isfinite(probs).all() and abs(probs.sum().item() - 1) < 1e-4


def test_draw_is_the_inverse_cdf_and_never_picks_a_zero_probability_byte():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    picks = [draw(probs, torch.tensor([u], dtype=torch.float64)).item()
             for u in (0.0, 0.1, 0.2499, 0.25, 0.6, 1 - 2**-53)]
    assert picks == [1, 1, 1, 3, 3, 3]  # the zero bytes (0, 2, 4: first, middle, last) are never chosen


def test_sampled_bytes_follow_the_filtered_distribution():
    """Inverse-CDF draws from the generator: frequencies match the probabilities after filtering."""
    g = torch.Generator().manual_seed(0)
    s = SamplingSettings(temperature=1.0, top_k=3)  # keeps 0.5, 0.3, 0.15 -> renormalised
    draws = [sample_next(LOGITS, s, None, g).item() for _ in range(4000)]
    for byte, p in ((2, 0.5 / 0.95), (0, 0.3 / 0.95), (3, 0.15 / 0.95)):
        assert abs(draws.count(byte) / len(draws) - p) < 0.03
    assert draws.count(1) == 0


C_SAMPLER = CSampler.create(SamplingSettings())


@pytest.mark.skipif(C_SAMPLER is None, reason="no C compiler: the C sampler is not built here")
@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([1, 2, 5, 50, 200, 256]),
       p=st.sampled_from([0.1, 0.5, 0.9, 0.95, 1.0]), min_p=st.sampled_from([0.0, 0.02, 0.1, 0.5]),
       temperature=st.sampled_from([0.0, 0.3, 0.8, 1.0, 1.7]), penalty=st.sampled_from([1.0, 1.1, 1.8]),
       n_recent=st.sampled_from([0, 1, 64]), scale=st.sampled_from([0.5, 3.0, 10.0]), ties=st.booleans())
def test_c_sampler_chooses_the_same_byte_as_sample_next(seed, k, p, min_p, temperature, penalty, n_recent, scale,
                                                        ties):
    """The generator's C path (bytelm/infer/csrc/sample.c) and sample_next agree byte for byte for one seed, and
    leave the generator in the same state; also where many logits tie (rounded to a few values), so that
    which tied bytes top-k keeps and top-p cuts must agree too."""
    logits = torch.randn(256, generator=torch.Generator().manual_seed(seed)) * scale
    if ties:
        logits = logits.round()  # about 2 * scale + 1 distinct values
    recent = torch.randint(0, 256, (n_recent,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed + 1))
    s = SamplingSettings(temperature=temperature, top_k=k, top_p=p, min_p=min_p, repetition_penalty=penalty)
    g_torch, g_c = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(3):
        want = sample_next(logits, s, recent.long() if n_recent else None, g_torch).item()
        got = CSampler.create(s)(logits, recent.data_ptr(), n_recent, g_c)
        assert got == want
    assert torch.equal(g_torch.get_state(), g_c.get_state())

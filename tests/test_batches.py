"""Batches: windows with targets shifted by one byte, training passes that are reproducible, resumable and
shared between ranks, fixed validation batches, and sliding windows that score every byte once.

    pytest tests/test_batches.py
"""
import numpy as np
import pytest
import torch

from bytelm.data.batches import IGNORE, BatchSampler, SlidingBatches, eval_batches
from bytelm.errors import DataError


def raw(arr) -> bytes:
    return np.asarray(arr).tobytes()


DATA = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)


def take(sampler, k):
    return [sampler.next_batch() for _ in range(k)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def test_batches_are_windows_with_targets_shifted_by_one():
    x, y = BatchSampler(DATA, batch_size=8, seq_len=32, seed=0).next_batch()
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x[:, 0] + 1) % 256, y[:, 0])  # DATA counts upwards, so the next byte is +1


def test_sampler_is_reproducible_and_resumes_exactly(tmp_path):
    run = take(BatchSampler(DATA, 4, 16, seed=7), 6)
    assert_same_batches(take(BatchSampler(DATA, 4, 16, seed=7), 6), run)

    first = BatchSampler(DATA, 4, 16, seed=7)
    assert_same_batches(take(first, 3), run[:3])
    torch.save({"sampler": first.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["sampler"]  # plain data only
    resumed = BatchSampler(DATA, 4, 16, seed=123)  # the state brings the seed back
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 3), run[3:])


def test_ranks_draw_different_windows_and_resume_from_rank0_state():
    r0 = BatchSampler(DATA, 4, 16, seed=0, rank=0, world_size=2)
    r1 = BatchSampler(DATA, 4, 16, seed=0, rank=1, world_size=2)
    b0, b1 = take(r0, 2), take(r1, 2)
    assert not torch.equal(b0[0][0], b1[0][0])
    assert not torch.equal(take(BatchSampler(DATA, 4, 16, seed=1), 1)[0][0], b0[0][0])  # seeds differ too
    resumed = BatchSampler(DATA, 4, 16, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(r0.state_dict())  # one checkpoint (rank 0's) restores every rank's own stream
    assert_same_batches(take(resumed, 2), take(r1, 2))


def window_starts(data, batches):
    """Where in `data` each window of (x, y) batches starts (data is random bytes: every 17-byte run is unique)."""
    at = {bytes(data[i:i + 17]): i for i in range(len(data) - 16)}
    assert len(at) == len(data) - 16
    return [at[bytes(torch.cat([x_row, y_row[-1:]]).to(torch.uint8).numpy())]
            for x, y in batches for x_row, y_row in zip(x, y)]


RANDOM_DATA = np.random.default_rng(0).integers(0, 256, 1937, dtype=np.uint8)  # 120 windows of 16 per pass


def test_each_pass_makes_every_byte_a_target_once_in_a_new_order():
    sampler = BatchSampler(RANDOM_DATA, 3, 16, seed=5)
    assert sampler.windows_per_pass == 120
    passes = [window_starts(RANDOM_DATA, take(sampler, 40)) for _ in range(3)]  # 40 x 3 windows: one pass
    for starts in passes:
        offset = min(starts)
        assert 0 <= offset < 16 and sorted(starts) == [offset + 16 * i for i in range(120)]  # tiled, no gaps
    assert len({tuple(p) for p in passes}) == 3  # each pass in its own order (and offset)
    assert len({min(p) for p in passes}) > 1


def test_ranks_share_each_pass_out_between_them():
    r0 = BatchSampler(RANDOM_DATA, 3, 16, seed=5, rank=0, world_size=2)
    r1 = BatchSampler(RANDOM_DATA, 3, 16, seed=5, rank=1, world_size=2)
    s0, s1 = window_starts(RANDOM_DATA, take(r0, 20)), window_starts(RANDOM_DATA, take(r1, 20))
    assert not set(s0) & set(s1)
    offset = min(s0 + s1)
    assert sorted(s0 + s1) == [offset + 16 * i for i in range(120)]  # together, exactly one pass


def test_the_window_order_is_pinned_so_saved_runs_resume_exactly():
    """The 41st batch of seed 5 (in the second pass): a change here breaks every resume of a saved run."""
    sampler = BatchSampler(RANDOM_DATA, 3, 16, seed=5)
    for _ in range(41):
        x, _ = sampler.next_batch()
    assert x[:, 0].tolist() == [237, 236, 205]
    assert sampler._order[1] == 8 and sampler._order[2][:5].tolist() == [20, 34, 66, 89, 51]


@pytest.mark.parametrize("state, field", [
    ({"version": 1, "seed": 7, "batches": 2}, "version 2"),  # the independent-windows sampler: never released
    ([("version", 2)], "version 2"),
    ({"version": 2, "seed": "7", "batches": 2}, "seed"),
    ({"version": 2, "seed": 10**30, "batches": 2}, "seed"),
    ({"version": 2, "seed": 7, "batches": -1}, "batches"),
    ({"version": 2, "seed": 7, "batches": 10**19}, "batches"),  # past int64 window positions
    ({"version": 2, "seed": 7, "batches": True}, "batches"),
])
def test_a_damaged_or_unknown_sampler_state_is_refused_naming_the_field(state, field):
    sampler = BatchSampler(DATA, 4, 16, seed=0)
    with pytest.raises(DataError, match=f"invalid batch sampler state.*{field}"):
        sampler.load_state_dict(state)
    assert sampler.batches == 0 and sampler.seed == 0  # unchanged


def test_eval_batches_are_deterministic_and_cover_the_split():
    data = np.frombuffer(bytes(range(256)) * 3 + b"tail", dtype=np.uint8)  # 772 bytes: 24 windows of 32
    full = eval_batches(data, batch_size=5, seq_len=32)
    assert len(full) == 5 and full[-1][0].shape == (4, 32)  # 24 windows: the last batch has 4
    assert_same_batches(list(full), list(eval_batches(data, 5, 32)))
    xs = torch.cat([x for x, _ in full]).flatten()
    assert raw(data[:768]) == bytes(xs.tolist())  # consecutive, non-overlapping, in order
    assert int(full[-1][1][-1, -1]) == data[768]

    few = eval_batches(data, batch_size=2, seq_len=32, max_batches=2)
    assert len(few) == 2
    starts = [int(x[i, 0]) for x, _ in few for i in range(2)]  # DATA-like bytes: the first byte is the offset
    assert starts == [0, (6 * 32) % 256, (12 * 32) % 256, (18 * 32) % 256]  # spread over the split


@pytest.mark.parametrize("n, seq_len, stride", [(772, 32, 16), (772, 32, 32), (771, 32, 7), (33, 32, 8)])
def test_sliding_batches_score_every_byte_once_with_context(n, seq_len, stride):
    data = np.random.default_rng(n + stride).integers(0, 256, n, dtype=np.uint8)
    batches = SlidingBatches(data, batch_size=3, seq_len=seq_len, stride=stride)
    scored, row = [], 0
    for x, y in batches:
        for i in range(x.shape[0]):
            start = int(batches.starts[row])
            assert bytes(x[i].tolist()) == raw(data[start:start + seq_len])  # the window's bytes
            for p in torch.nonzero(y[i] != IGNORE).flatten().tolist():
                assert int(y[i, p]) == data[start + p + 1]
                assert row == 0 or p + 1 >= seq_len - stride  # at least T - stride bytes of context
                scored.append(start + p + 1)
            row += 1
    assert scored == list(range(1, n))  # each target once, in order, none missed
    with pytest.raises(DataError, match="stride must be"):
        SlidingBatches(data, 3, seq_len, seq_len + 1)
    with pytest.raises(DataError, match="one window"):
        SlidingBatches(data[:seq_len], 3, seq_len, stride)


def test_too_little_data_says_how_much_there_is_and_is_needed():
    small = np.zeros(10, dtype=np.uint8)
    with pytest.raises(DataError, match="the train split has 10 bytes but .* 17 bytes is needed"):
        BatchSampler(small, 2, 16, seed=0)
    with pytest.raises(DataError, match="the validation split has 10 bytes"):
        eval_batches(small, 2, 16)


@pytest.mark.parametrize("kwargs, field", [(dict(batch_size=0), "batch_size"), (dict(seq_len=-1), "seq_len"),
                                           (dict(batch_size=True), "batch_size"), (dict(seq_len=2.0), "seq_len")])
def test_bad_shapes_are_data_errors(kwargs, field):
    args = {"batch_size": 2, "seq_len": 8, **kwargs}
    for make in (lambda: BatchSampler(DATA, seed=0, **args), lambda: eval_batches(DATA, **args),
                 lambda: SlidingBatches(DATA, stride=1, **args)):
        with pytest.raises(DataError, match=f"{field} must be a positive integer"):
            make()

"""bnlib.measure: the interleaved timer (on a fake clock), saved bytes, full-size passes, NumPy peaks."""
import numpy as np
import pytest
import torch

from bnlib import functional as BF
from bnlib import measure
from bnlib.measure import (MIN_SAMPLE_SECONDS, FullSizePasses, calls_per_sample, peak_in_tensors,
                           saved_extra_bytes, time_calls)


class FakeClock:
    """A clock that advances only when a timed function says it took `seconds`."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def take(self, seconds):
        self.now += seconds


# The timer runs on a fake clock here: real sleeps overshoot on a loaded machine (a CI run saw a
# 0.5 ms sleep measured long enough to halve the calls per sample), and these tests check the
# timer's logic, not the machine's scheduler.
@pytest.fixture
def fake_clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(measure, "clock", fake)
    return fake


def test_time_calls_interleaves_and_rejects_no_repeats(fake_clock):
    calls = []

    def slow(name):  # slower than a sample's minimum, so one call per sample
        return lambda: (calls.append(name), fake_clock.take(1.5 * MIN_SAMPLE_SECONDS))

    time_calls([slow("a"), slow("b")], repeats=2, warmup=1)
    # warm-up a, b; the calls that size the samples, a, b; then a b; then b a
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a"]
    with pytest.raises(ValueError, match="repeats"):
        time_calls([lambda: None], repeats=0)


def test_short_calls_are_repeated_within_a_sample_and_timed_per_call(fake_clock):
    assert calls_per_sample(1.0) == 1 and calls_per_sample(0.0) == 1
    assert calls_per_sample(MIN_SAMPLE_SECONDS / 4) == 4
    calls, durations = [], iter([9.0, 0.5e-3] + [0.5e-3, 0.5e-3, 0.5e-3, 1.3e-3] * 3)

    def fn():
        calls.append(1)
        fake_clock.take(next(durations))

    (t,) = time_calls([fn], repeats=3, warmup=1)
    # 1 warm-up (its 9 s is not timed) + 1 sizing call (0.5 ms: 4 per 2 ms sample) + 3 samples of 4
    assert len(calls) == 2 + 3 * 4
    # Per call, not per sample: each sample is 2.8 ms over 4 calls.
    assert t == pytest.approx(2.8e-3 / 4)


def test_time_calls_on_the_real_clock_returns_a_positive_time_per_call():
    (t,) = time_calls([lambda: sum(range(1000))], repeats=3, warmup=1)
    assert 0 < t < 1.0


def test_saved_extra_bytes_sees_full_size_saves_but_not_inputs():
    x = torch.randn(64, 8, requires_grad=True)
    # bnlib saves x (an input: free), the weight, and per-channel mean and invstd: 2 * 8 floats.
    assert saved_extra_bytes(lambda x: BF.batch_norm(x, None, None, training=True), [x]) == 64
    # exp saves its full-size result: 64 * 8 floats that are not an input.
    assert saved_extra_bytes(lambda x: (x * 2).exp(), [x]) == 64 * 8 * 4


def test_full_size_passes_counts_reads_and_writes_of_full_size_tensors():
    x, w = torch.randn(32, 4), torch.randn(4)
    with FullSizePasses(x.numel()) as log:
        y = x * w          # reads x (w is not full size), writes y
        z = y + y          # the same tensor twice is read once
        x.view(-1)         # a view moves nothing
    del z
    assert log.passes == [("mul.Tensor", 1, 1), ("add.Tensor", 1, 1)]
    assert log.calls == 3


def test_peak_in_tensors_measures_numpy_temporaries():
    n = 100_000
    def two_alive():  # a of n float64 values, then a * 2 while a is still referenced
        a = np.ones(n)
        return a * 2.0

    peak = peak_in_tensors(two_alive, n * 8)
    assert 1.9 < peak < 2.2
    assert peak_in_tensors(lambda: None, n * 8) < 0.01

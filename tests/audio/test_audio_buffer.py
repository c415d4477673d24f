"""PcmBuffer: absolute addressing, zero fill, trim, truncate, overflow policy, padding ranges, checked
operation by operation against a plain model that keeps everything in one concatenated array."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio.buffer import BufferOverflowError, OverflowPolicy, PcmBuffer


def ramp(start: int, n: int) -> np.ndarray:
    """Samples whose value is their absolute index (exact in float32 below 2**24)."""
    return np.arange(start, start + n, dtype=np.float32)


class Reference:
    """What a DROP_OLDEST PcmBuffer must hold, by concatenation."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.start, self.buf, self.dropped = capacity, 0, np.zeros(0, np.float32), 0

    @property
    def end(self) -> int:
        return self.start + self.buf.size

    def append(self, x: np.ndarray) -> None:
        self.buf = np.concatenate([self.buf, x])
        over = self.buf.size - self.capacity
        if over > 0:
            self.dropped += over
            self.trim(self.start + over)

    def trim(self, before: int) -> None:
        cut = min(max(0, before - self.start), self.buf.size)
        self.buf, self.start = self.buf[cut:], self.start + cut

    def truncate(self, end: int) -> int:
        keep = max(0, end - self.start)
        dropped = max(0, self.buf.size - keep)
        self.buf = self.buf[:keep]
        return dropped

    def read(self, a: int, b: int) -> np.ndarray:
        out = np.zeros(b - a, np.float32)
        lo, hi = max(a, self.start), min(b, self.end)
        if hi > lo:
            out[lo - a:hi - a] = self.buf[lo - self.start:hi - self.start]
        return out


def test_read_zero_fills_outside_the_held_samples():
    pcm = PcmBuffer(100)
    pcm.append(ramp(0, 60))
    np.testing.assert_array_equal(pcm.read(10, 15), ramp(10, 5))
    # before index 0 and beyond the newest sample: zeros
    np.testing.assert_array_equal(pcm.read(-3, 4), [0, 0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(pcm.read(58, 63), [58, 59, 0, 0, 0])
    assert pcm.read(5, 5).shape == (0,) and (pcm.start, pcm.end) == (0, 60)


def test_trim_and_truncate_keep_absolute_indices():
    pcm = PcmBuffer(50)
    pcm.append(ramp(0, 30))
    pcm.trim(10)
    assert (pcm.start, pcm.end) == (10, 30)
    np.testing.assert_array_equal(pcm.read(8, 12), [0, 0, 10, 11])
    pcm.trim(5)  # trimming backwards is a no-op
    assert pcm.start == 10
    assert pcm.truncate(25) == 5 and pcm.end == 25  # barge-in: the newest 5 samples go
    pcm.append(ramp(25, 5))
    np.testing.assert_array_equal(pcm.read(23, 28), [23, 24, 25, 26, 27])
    assert pcm.truncate(40) == 0 and pcm.truncate(0) == 20 and pcm.end == pcm.start == 10
    pcm.trim(10**9)
    assert pcm.end == pcm.start == 10 and pcm.dropped == 0


def test_drop_oldest_counts_what_it_drops():
    pcm = PcmBuffer(10)
    pcm.append(ramp(0, 8))
    pcm.append(ramp(8, 5))
    assert (pcm.start, pcm.end, pcm.dropped) == (3, 13, 3)
    np.testing.assert_array_equal(pcm.read(0, 13), np.where(np.arange(13) >= 3, np.arange(13), 0))
    pcm.append(ramp(13, 25))  # larger than the capacity: only its last 10 samples stay
    np.testing.assert_array_equal(pcm.read(28, 38), ramp(28, 10))
    assert (pcm.start, pcm.end, pcm.dropped) == (28, 38, 28)


def test_raise_policy_refuses_and_keeps_state():
    pcm = PcmBuffer(10, policy=OverflowPolicy.RAISE)
    pcm.append(ramp(0, 8))
    with pytest.raises(BufferOverflowError, match="exceeds capacity 10"):
        pcm.append(ramp(8, 3))
    assert pcm.end == 8 and pcm.dropped == 0
    pcm.trim(5)
    pcm.append(ramp(8, 7))
    np.testing.assert_array_equal(pcm.read(5, 15), ramp(5, 10))


def test_bad_input_is_a_clear_error():
    pcm = PcmBuffer(10)
    with pytest.raises(ValueError, match="mono"):
        pcm.append(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        pcm.append(np.array(["a"]))
    with pytest.raises(ValueError, match="start <= stop"):
        pcm.read(5, 4)
    with pytest.raises(ValueError, match="capacity"):
        PcmBuffer(0)
    with pytest.raises(ValueError, match="hole in its absolute sample indices"):
        PcmBuffer(10, policy=OverflowPolicy.DROP_NEWEST)
    pcm.append(np.zeros(0, dtype=np.float32))  # empty chunk is fine
    pcm.append(np.array([16384], dtype=np.int16))  # int16 is scaled
    assert pcm.read(0, 1)[0] == 0.5


def test_padding_ranges_follow_appends_trims_and_truncation():
    pcm = PcmBuffer(100)
    pcm.append(np.ones(10, np.float32))
    pcm.append(np.zeros(5, np.float32), padding=True)
    pcm.append(np.zeros(5, np.float32), padding=True)  # merged with the range before it
    assert pcm.is_padding(10, 20) and not pcm.is_padding(5, 12) and not pcm.is_padding(15, 21)
    pcm.append(np.ones(90, np.float32))  # 110 samples > 100: the oldest 10 are dropped
    assert pcm.start == 10 and pcm.dropped == 10 and pcm.is_padding(10, 20)
    pcm.trim(14)
    assert pcm.is_padding(14, 20) and not pcm.is_padding(12, 20)  # trimmed samples are not held
    pcm.truncate(17)
    pcm.append(np.ones(3, np.float32))
    assert pcm.is_padding(14, 17) and not pcm.is_padding(14, 18)


def test_long_random_sequences_match_the_model():
    """Thousands of mixed operations with packet-sized and larger appends (the store is moved and
    grown many times): contents, indices and drop counts always match the model."""
    rng = np.random.default_rng(0)
    pcm, ref = PcmBuffer(5000), Reference(5000)
    counter = 0
    for _ in range(3000):
        op = rng.integers(0, 10)
        if op < 6:
            n = int(rng.integers(0, 1500))
            x = ramp(counter, n)
            counter += n
            pcm.append(x, padding=bool(rng.integers(0, 2)))
            ref.append(x)
        elif op < 8:
            before = ref.start + int(rng.integers(-100, ref.buf.size + 100))
            pcm.trim(before)
            ref.trim(before)
        elif op < 9:
            end = ref.start + int(rng.integers(0, ref.buf.size + 50))
            assert pcm.truncate(end) == ref.truncate(end)
        a = ref.start + int(rng.integers(-200, ref.buf.size + 200))
        b = a + int(rng.integers(0, 3000))
        assert (pcm.start, pcm.end, pcm.dropped) == (ref.start, ref.end, ref.dropped)
        np.testing.assert_array_equal(pcm.read(a, b), ref.read(a, b))
        np.testing.assert_array_equal(pcm.read(ref.start, ref.end), ref.buf)


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 64), ops=st.lists(st.tuples(st.sampled_from("atwx"), st.integers(0, 80),
                                                           st.integers(-20, 80)), max_size=40))
def test_small_capacities_match_the_model(capacity, ops):
    """Random appends / trims / truncations / reads at tiny capacities (every chunk may overflow)."""
    pcm, ref = PcmBuffer(capacity), Reference(capacity)
    for op, a, b in ops:
        if op == "a":
            x = ramp(ref.end, a)
            pcm.append(x)
            ref.append(x)
        elif op == "t":
            pcm.trim(a)
            ref.trim(a)
        elif op == "x":
            assert pcm.truncate(a) == ref.truncate(a)
        else:
            lo, n = b, a % 20
            np.testing.assert_array_equal(pcm.read(lo - 2, lo + n + 3), ref.read(lo - 2, lo + n + 3))
        assert (pcm.start, pcm.end, pcm.dropped) == (ref.start, ref.end, ref.dropped)

"""SampleRing: absolute addressing, zero fill, trim, overflow policy, producer/consumer threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio.buffer import BufferOverflowError, OverflowPolicy, SampleRing


def ramp(start: int, n: int) -> np.ndarray:
    """Samples whose value is their absolute index (exact in float32 below 2**24)."""
    return np.arange(start, start + n, dtype=np.float32)


def expected_window(lo: int, hi: int, held: tuple[int, int]) -> np.ndarray:
    idx = np.arange(lo, hi)
    return np.where((idx >= held[0]) & (idx < held[1]), idx, 0).astype(np.float32)


def test_window_with_context_and_zero_fill():
    ring = SampleRing(100)
    ring.append(ramp(0, 60))
    np.testing.assert_array_equal(ring.window(10, 5), ramp(10, 5))
    np.testing.assert_array_equal(ring.window(10, 5, left_context=3, right_context=2), ramp(7, 10))
    # before index 0 and beyond the newest sample: zeros
    np.testing.assert_array_equal(ring.window(0, 4, left_context=3), [0, 0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(ring.window(58, 2, right_context=3), [58, 59, 0, 0, 0])
    assert ring.window(5, 0).shape == (0,)
    assert ring.holds(0, 60) and not ring.holds(0, 61)


def test_trim_and_clear_keep_absolute_indices():
    ring = SampleRing(50)
    ring.append(ramp(0, 30))
    assert ring.trim(10) == 10
    assert (ring.start_sample, ring.end_sample, len(ring)) == (10, 30, 20)
    np.testing.assert_array_equal(ring.window(8, 4), [0, 0, 10, 11])
    assert ring.trim(5) == 0  # trimming backwards is a no-op
    assert ring.clear() == 20
    ring.append(ramp(30, 5))
    np.testing.assert_array_equal(ring.window(28, 5), [0, 0, 30, 31, 32])
    assert ring.trim(10**9) == 5 and len(ring) == 0 and ring.end_sample == 35


def test_drop_oldest_counts_what_it_drops():
    ring = SampleRing(10)
    assert ring.append(ramp(0, 8)) == 0
    assert ring.append(ramp(8, 5)) == 3
    assert (ring.start_sample, ring.end_sample) == (3, 13)
    np.testing.assert_array_equal(ring.window(0, 13), expected_window(0, 13, (3, 13)))
    assert ring.append(ramp(13, 25)) == 25  # larger than capacity: only its last 10 samples stay
    np.testing.assert_array_equal(ring.window(28, 10), ramp(28, 10))
    s = ring.stats()
    assert (s.dropped_samples, s.overflow_events, s.start_sample, s.end_sample) == (28, 2, 28, 38)


def test_raise_policy_refuses_and_keeps_state():
    ring = SampleRing(10, policy=OverflowPolicy.RAISE)
    ring.append(ramp(0, 8))
    with pytest.raises(BufferOverflowError, match="exceeds capacity 10"):
        ring.append(ramp(8, 3))
    assert ring.end_sample == 8
    ring.trim(5)
    ring.append(ramp(8, 7))
    np.testing.assert_array_equal(ring.window(5, 10), ramp(5, 10))


def test_bad_input_is_a_clear_error():
    ring = SampleRing(10)
    with pytest.raises(ValueError, match="mono"):
        ring.append(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        ring.append(np.array(["a"]))
    with pytest.raises(ValueError, match=">= 0"):
        ring.window(0, -1)
    with pytest.raises(ValueError, match="capacity"):
        SampleRing(0)
    ring.append(np.zeros(0, dtype=np.float32))  # empty chunk is fine
    ring.append(np.array([16384], dtype=np.int16))  # int16 is scaled
    assert ring.window(0, 1)[0] == 0.5


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 64), ops=st.lists(st.tuples(st.sampled_from("atw"), st.integers(0, 80),
                                                           st.integers(-20, 80)), max_size=40))
def test_matches_a_plain_model(capacity, ops):
    """Random appends / trims / windows against a model that keeps everything."""
    ring = SampleRing(capacity)
    start, end = 0, 0
    for op, a, b in ops:
        if op == "a":
            ring.append(ramp(end, a))
            end += a
            start = max(start, end - capacity)
        elif op == "t":
            start = min(max(start, a), end)
            ring.trim(a)
        else:
            lo, n = b, a % 20
            np.testing.assert_array_equal(ring.window(lo, n, 2, 3), expected_window(lo - 2, lo + n + 3, (start, end)))
        assert (ring.start_sample, ring.end_sample) == (start, end)


def test_producer_thread_and_reader_thread():
    """An appending thread and a reading/trimming thread: every window read is consistent."""
    ring = SampleRing(4096)
    total = 200_000
    errors: list[str] = []

    def produce():
        rng = np.random.default_rng(0)
        i = 0
        while i < total:
            n = int(rng.integers(1, 960))
            n = min(n, total - i)
            ring.append(ramp(i, n))
            i += n

    def consume():
        pos = 0
        while pos < total:
            if not ring.wait_until(min(pos + 640, total), timeout_s=5.0):
                errors.append("timed out waiting for the producer")
                return
            n = min(640, total - pos)
            w = ring.window(pos, n, left_context=100)
            held_from = ring.start_sample
            idx = np.arange(pos - 100, pos + n)
            ok = (w == np.where(idx >= 0, idx, 0)) | ((w == 0) & (idx < held_from))
            if not ok.all():
                errors.append(f"inconsistent window at {pos}")
                return
            pos += n
            ring.trim(pos - 100)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert ring.end_sample == total

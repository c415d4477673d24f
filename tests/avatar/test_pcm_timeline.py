"""PcmTimeline against a plain reference model: every operation, random sequences."""

from __future__ import annotations

import numpy as np

from avatar.timeline import PcmTimeline


class Reference:
    def __init__(self, max_samples):
        self.max, self.start, self.buf, self.dropped = max_samples, 0, np.zeros(0, np.float32), 0

    def append(self, x):
        self.buf = np.concatenate([self.buf, x])
        over = self.buf.size - self.max
        if over > 0:
            self.dropped += over
            self.trim(self.start + over)

    def trim(self, before):
        cut = min(max(0, before - self.start), self.buf.size)
        self.buf, self.start = self.buf[cut:], self.start + cut

    def truncate(self, end):
        keep = max(0, end - self.start)
        dropped = max(0, self.buf.size - keep)
        self.buf = self.buf[:keep]
        return dropped

    def take(self, a, b):
        out = np.zeros(b - a, np.float32)
        lo, hi = max(a, self.start), min(b, self.start + self.buf.size)
        if hi > lo:
            out[lo - a:hi - a] = self.buf[lo - self.start:hi - self.start]
        return out


def test_timeline_matches_a_plain_concatenating_model():
    rng = np.random.default_rng(0)
    t, ref = PcmTimeline(5000), Reference(5000)
    counter = 0
    for _ in range(3000):
        op = rng.integers(0, 10)
        if op < 6:
            n = int(rng.integers(0, 1500))
            x = np.arange(counter, counter + n, dtype=np.float32)
            counter += n
            pad = bool(rng.integers(0, 2))
            t.append(x, padding=pad)
            ref.append(x)
        elif op < 8:
            before = ref.start + int(rng.integers(-100, ref.buf.size + 100))
            t.trim(before)
            ref.trim(before)
        elif op < 9:
            end = ref.start + int(rng.integers(0, ref.buf.size + 50))
            assert t.truncate(end) == ref.truncate(end)
        a = ref.start + int(rng.integers(-200, ref.buf.size + 200))
        b = a + int(rng.integers(0, 3000))
        assert t.start == ref.start and t.end == ref.start + ref.buf.size and t.dropped == ref.dropped
        np.testing.assert_array_equal(t.take(a, b), ref.take(a, b))
        np.testing.assert_array_equal(t.buf, ref.buf)


def test_padding_ranges_follow_appends_and_trims():
    t = PcmTimeline(100)
    t.append(np.ones(10, np.float32))
    t.append(np.zeros(5, np.float32), padding=True)
    t.append(np.zeros(5, np.float32), padding=True)
    assert t.is_padding(10, 20) and not t.is_padding(5, 12)
    t.append(np.ones(90, np.float32))  # 110 samples > 100: the oldest 10 are dropped
    assert t.start == 10 and t.dropped == 10 and t.is_padding(10, 20)
